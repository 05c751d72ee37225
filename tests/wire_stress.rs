//! Stress for the wire codec on the stable toolchain, with no `server` feature:
//! about 200k inputs made by a fixed PRNG from valid frames (bit flips,
//! truncations, length-field and varint mangling, splices, pure noise), held to
//! the same properties as the fuzz targets, whose code this file includes from
//! `fuzz/src/lib.rs`: the decode round trip, and `tern::wire::Deframer` fed any
//! chunking reads what `decode_frame` reads from the whole stream. Runs in a
//! few seconds, even unoptimized:
//!
//! ```text
//! cargo test --no-default-features --test wire_stress
//! ```
//!
//! It also pins the fuzz seed corpus to the encoder: after a codec change,
//! `TERN_BLESS_FUZZ_SEEDS=1` rewrites `fuzz/corpus/*/` from `seed_frames()`
//! and `seed_streams()`.

#[path = "../fuzz/src/lib.rs"]
mod props;

use props::{
    chunks, decode_round_trip, raw_frame, read_chunked, read_whole, seed_frames, seed_streams,
    split_chunked_input, Event, MAX_FRAME, SMALL_MAX_FRAME,
};
use std::collections::BTreeSet;
use std::path::Path;
use tern::wire::{check, decode_frame, CheckError, DecodeError, FrameError, Kind, Tag, HEADER_LEN};

/// How many generated inputs `mutated_inputs_never_panic_and_round_trip` runs.
const INPUTS: usize = 200_000;

/// xorshift64*: deterministic, so a failure names an iteration that reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`; `n` > 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// A byte that is often a boundary value.
    fn interesting_byte(&mut self) -> u8 {
        const EDGES: [u8; 6] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff];
        if self.below(2) == 0 {
            EDGES[self.below(EDGES.len())]
        } else {
            self.byte()
        }
    }

    /// `min..=max` random bytes.
    fn bytes(&mut self, min: usize, max: usize) -> Vec<u8> {
        let n = min + self.below(max - min + 1);
        (0..n).map(|_| self.byte()).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Rewrites the header's `len` to the body actually there, so that a mutation
/// inside the body reaches `decode` instead of stopping at `check`.
fn fix_len(frame: &mut [u8]) {
    if frame.len() >= HEADER_LEN {
        let body = (frame.len() - HEADER_LEN) as u32;
        frame[1..HEADER_LEN].copy_from_slice(&body.to_be_bytes());
    }
}

/// The byte ranges of a valid body's fields: (start of tag, start of value, end).
fn field_spans(frame: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut spans = Vec::new();
    let mut at = HEADER_LEN;
    while at < frame.len() {
        let mut p = at + 1;
        let mut flen = 0usize;
        let mut shift = 0;
        loop {
            let b = frame[p];
            p += 1;
            flen |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        spans.push((at, p, p + flen));
        at = p + flen;
    }
    spans
}

/// One input: a seed frame (or several) broken in one of a dozen ways.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = rng.pick(seeds).clone();
    let mut out = seed.clone();
    match rng.below(12) {
        // Pure noise, sometimes behind a plausible header.
        0 => {
            out = rng.bytes(0, 63);
            if rng.below(2) == 0 && out.len() >= HEADER_LEN {
                out[0] = rng.pick(Kind::ALL).0;
                fix_len(&mut out);
            }
        }
        // Bit flips anywhere, header included.
        1 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
        }
        // Bytes overwritten in the body, header kept right.
        2 => {
            if out.len() > HEADER_LEN {
                for _ in 0..1 + rng.below(4) {
                    let i = HEADER_LEN + rng.below(out.len() - HEADER_LEN);
                    out[i] = rng.interesting_byte();
                }
            }
        }
        // Truncated: the header promises more than there is (Incomplete)…
        3 => out.truncate(rng.below(out.len())),
        // …or the header is honest and a field runs off the body (Truncated).
        4 => {
            out.truncate(HEADER_LEN + rng.below(out.len() - HEADER_LEN + 1));
            fix_len(&mut out);
        }
        // The length field mangled: near the truth, near the limit, or anything.
        5 => {
            let real = (out.len() - HEADER_LEN) as u32;
            let len = match rng.below(4) {
                0 => real.wrapping_add(rng.below(17) as u32).wrapping_sub(8),
                1 => MAX_FRAME.wrapping_add(rng.below(3) as u32).wrapping_sub(1),
                2 => u32::MAX - rng.below(4) as u32,
                _ => rng.next() as u32,
            };
            out[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        }
        // One field's varint length replaced: any value, not minimal, 5 bytes.
        6 => {
            let spans = field_spans(&seed);
            if !spans.is_empty() {
                let (tag_at, value_at, _) = *rng.pick(&spans);
                let varint: Vec<u8> = match rng.below(4) {
                    0 => vec![rng.byte() & 0x7f],
                    1 => vec![rng.byte() | 0x80, rng.byte() & 0x7f],
                    2 => vec![rng.byte() | 0x80, 0x00],
                    _ => vec![0x80, 0x80, 0x80, 0x80, rng.byte()],
                };
                out = seed[..tag_at + 1].to_vec();
                out.extend_from_slice(&varint);
                out.extend_from_slice(&seed[value_at..]);
                fix_len(&mut out);
            }
        }
        // A field of a random tag and width inserted at a field boundary: wrong
        // widths, bad UTF-8, unknown tags, repeats.
        7 => {
            let mut at = HEADER_LEN;
            let spans = field_spans(&seed);
            if !spans.is_empty() && rng.below(2) == 0 {
                at = rng.pick(&spans).2;
            }
            let tag = if rng.below(4) == 0 {
                rng.byte()
            } else {
                rng.pick(Tag::ALL).0
            };
            let width = *rng.pick(&[0usize, 1, 2, 3, 4, 5, 8, 9, 130]);
            let mut value = rng.bytes(width, width);
            if rng.below(2) == 0 {
                value.iter_mut().for_each(|b| *b &= 0x7f);
            }
            let field = raw_frame(Kind::BYE, &[(Tag(tag), &value[..])]);
            out.splice(at..at, field[HEADER_LEN..].iter().copied());
            fix_len(&mut out);
        }
        // Random bytes inserted or removed inside the body.
        8 => {
            if out.len() > HEADER_LEN {
                let i = HEADER_LEN + rng.below(out.len() - HEADER_LEN);
                if rng.below(2) == 0 {
                    out.splice(i..i, rng.bytes(1, 4));
                } else {
                    let n = (1 + rng.below(4)).min(out.len() - i);
                    out.drain(i..i + n);
                }
                fix_len(&mut out);
            }
        }
        // Splice: the front of one frame, the back of another.
        9 => {
            let other = rng.pick(seeds);
            out.truncate(rng.below(out.len() + 1));
            out.extend_from_slice(&other[rng.below(other.len())..]);
            if rng.below(2) == 0 {
                fix_len(&mut out);
            }
        }
        // Body copied under another frame kind: known tags in unusual frames.
        10 => out[0] = rng.pick(Kind::ALL).0,
        // A stream of valid frames with one flipped byte somewhere.
        _ => {
            for _ in 0..rng.below(4) {
                out.extend_from_slice(rng.pick(seeds).as_slice());
            }
            let i = rng.below(out.len());
            out[i] = rng.interesting_byte();
        }
    }
    out
}

/// The name of the outcome of decoding the first frame, for the coverage tally.
fn outcome(data: &[u8]) -> &'static str {
    match decode_frame(data, MAX_FRAME) {
        Ok(_) => "ok",
        Err(FrameError::Check(e)) => match e {
            CheckError::Incomplete { .. } => "incomplete",
            CheckError::TooLarge { .. } => "too large",
            CheckError::UnknownKind(_) => "unknown kind (check)",
        },
        Err(FrameError::Decode(e)) => match e {
            DecodeError::UnknownKind(_) => "unknown kind (decode)",
            DecodeError::Truncated => "truncated",
            DecodeError::VarintTooLong => "varint too long",
            DecodeError::VarintNotMinimal => "varint not minimal",
            DecodeError::BadWidth { .. } => "bad width",
            DecodeError::BadUtf8(_) => "bad utf-8",
        },
    }
}

fn seeds() -> Vec<Vec<u8>> {
    seed_frames().into_iter().map(|(_, frame)| frame).collect()
}

#[test]
fn mutated_inputs_never_panic_and_round_trip() {
    let seeds = seeds();
    let mut rng = Rng(0x7e57_c0de_5eed_0001);
    let mut seen = BTreeSet::new();
    let mut frames = 0;
    for i in 0..INPUTS {
        let input = mutate(&mut rng, &seeds);
        seen.insert(outcome(&input));
        // The PRNG is fixed, so a failure reproduces; name it for the report.
        let decoded = std::panic::catch_unwind(|| decode_round_trip(&input, MAX_FRAME));
        frames += decoded.unwrap_or_else(|_| panic!("input {i} broke a property: {input:02x?}"));
        if i % 16 == 0 {
            let sizes = rng.bytes(1, 4);
            for max_frame in [MAX_FRAME, SMALL_MAX_FRAME] {
                let whole = read_whole(&input, max_frame);
                assert_eq!(
                    read_chunked(chunks(&sizes, &input), max_frame),
                    whole,
                    "input {i}, max_frame {max_frame}"
                );
            }
        }
    }
    // Every outcome the codec has must have been reached (`check` names an
    // unknown kind before `decode` can, so that one is never hit through here),
    // or the mutations have stopped exercising it.
    let expected = [
        "ok",
        "incomplete",
        "too large",
        "unknown kind (check)",
        "truncated",
        "varint too long",
        "varint not minimal",
        "bad width",
        "bad utf-8",
    ];
    for name in expected {
        assert!(seen.contains(name), "no input gave {name}; saw {seen:?}");
    }
    assert!(
        frames > INPUTS / 4,
        "only {frames} frames decoded from {INPUTS} inputs"
    );
}

#[test]
fn oversized_headers_are_refused_from_the_header() {
    let mut rng = Rng(0x0b16_f4a3_0000_0002);
    for &kind in Kind::ALL {
        for i in 0..2_000 {
            let max_frame = match i % 3 {
                0 => MAX_FRAME,
                1 => rng.below(1 << 16) as u32,
                _ => rng.next() as u32 >> 1,
            };
            let len = match i % 4 {
                0 => max_frame + 1,
                1 => u32::MAX,
                _ => max_frame + 1 + (rng.next() as u32) % (u32::MAX - max_frame),
            };
            // The header alone, then with some of the body: refused either way,
            // and without waiting for the rest.
            let mut buf = vec![kind.0];
            buf.extend_from_slice(&len.to_be_bytes());
            assert_eq!(check(&buf, max_frame), Err(CheckError::TooLarge { len }));
            buf.extend(rng.bytes(0, 31));
            assert_eq!(check(&buf, max_frame), Err(CheckError::TooLarge { len }));
            assert_eq!(
                decode_frame(&buf, max_frame).map(|(_, n)| n),
                Err(FrameError::Check(CheckError::TooLarge { len }))
            );
        }
        // At the limit exactly the frame is read.
        let mut buf = vec![kind.0];
        buf.extend_from_slice(&64u32.to_be_bytes());
        assert_eq!(check(&buf, 64), Err(CheckError::Incomplete { needed: 64 }));
        buf.resize(HEADER_LEN + 64, 0);
        assert_eq!(check(&buf, 64), Ok(HEADER_LEN + 64));
    }
}

#[test]
fn chunked_reading_matches_whole_on_valid_streams() {
    let seeds = seeds();
    let mut rng = Rng(0xc4a2_cced_0000_0003);
    for round in 0..200 {
        let count = 1 + rng.below(200);
        let mut stream = Vec::new();
        let mut last = 0;
        for _ in 0..count {
            let frame = rng.pick(&seeds);
            stream.extend_from_slice(frame);
            last = frame.len();
        }
        let whole = read_whole(&stream, MAX_FRAME);
        assert_eq!(whole.len(), count);
        assert!(whole.iter().all(|e| matches!(e, Event::Frame(_))));
        for _ in 0..10 {
            // Tiny chunks, chunks around a frame's size, or one big one.
            let sizes = match rng.below(3) {
                0 => vec![rng.below(8) as u8],
                1 => rng.bytes(1, 16),
                _ => Vec::new(),
            };
            assert_eq!(
                read_chunked(chunks(&sizes, &stream), MAX_FRAME),
                whole,
                "round {round}"
            );
        }
        // Cut inside the last frame: both readings end holding the same part.
        let cut = &stream[..stream.len() - 1 - rng.below(last - 1)];
        let whole = read_whole(cut, MAX_FRAME);
        assert!(matches!(whole.last(), Some(Event::Partial(n)) if *n < last));
        let sizes = rng.bytes(1, 8);
        assert_eq!(
            read_chunked(chunks(&sizes, cut), MAX_FRAME),
            whole,
            "round {round}"
        );
    }
}

/// The seed files under `fuzz/corpus/` are exactly what `seed_frames()` and
/// `seed_streams()` encode today, and every seed is valid.
#[test]
fn fuzz_seed_corpus_is_up_to_date() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let bless = std::env::var_os("TERN_BLESS_FUZZ_SEEDS").is_some();
    let sets = [("decode", seed_frames()), ("chunked", seed_streams())];
    for (target, seeds) in sets {
        for (name, bytes) in seeds {
            let (_, stream) = if target == "chunked" {
                split_chunked_input(&bytes)
            } else {
                (&[][..], &bytes[..])
            };
            let valid = read_whole(stream, MAX_FRAME)
                .iter()
                .all(|e| matches!(e, Event::Frame(_) | Event::Partial(_)));
            assert!(
                valid,
                "seed {target}/{name} has a frame that does not decode"
            );
            let path = corpus.join(target).join(name);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e}; run with TERN_BLESS_FUZZ_SEEDS=1", path.display())
                });
                assert_eq!(
                    on_disk,
                    bytes,
                    "{} is stale; run with TERN_BLESS_FUZZ_SEEDS=1",
                    path.display()
                );
            }
        }
    }
}
