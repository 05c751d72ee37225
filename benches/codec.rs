//! Wire codec benchmarks, no `server` feature needed:
//!
//! ```text
//! cargo bench --no-default-features --bench codec
//! ```
//!
//! - `decode`, `encode`: one MSG frame with a 64 B, 1 KiB or 64 KiB payload,
//!   in bytes/s of frame.
//! - `frames`: a stream of [`STREAM_FRAMES`] such frames read (`check` then
//!   `decode`, as a connection does) or written, in frames/s.
//! - `check`: the header check alone, on a header whose body has not arrived
//!   and on a whole frame.
//! - `deframe`: a [`DEFRAME_STREAM`]-byte stream of small MSG frames (64 B or
//!   1 KiB payload) fed to a `Deframer` in 64 KiB chunks (`64KiB_chunks`), as
//!   socket reads deliver it, so frames straddle chunk ends and nearly every
//!   chunk takes the copying path once; fed as one chunk (`whole`); and read
//!   by a bare `check` + `decode` loop (`in_place`), the floor. In bytes/s of
//!   stream.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::ops::ControlFlow;
use tern::wire::{
    check, decode, decode_frame, encode, flags, Deframer, Frame, Kind, Msg, HEADER_LEN,
};

/// Payload sizes, with their names in benchmark ids.
const PAYLOADS: [(&str, usize); 3] = [("64B", 64), ("1KiB", 1 << 10), ("64KiB", 64 << 10)];

/// The server's default `max_frame`.
const MAX_FRAME: u32 = 1 << 20;

/// Frames in one stream of the `frames` group.
const STREAM_FRAMES: usize = 256;

/// Bytes (at least) in one stream of the `deframe` group.
const DEFRAME_STREAM: usize = 1 << 20;

/// The chunk the `deframe` group feeds: one socket read of the server's loop.
const READ_CHUNK: usize = 64 << 10;

/// A MSG as the server writes it: every field present.
fn msg(payload: &[u8]) -> Frame<'_> {
    Frame::Msg(Msg {
        seq: Some((1 << 40) + 12_345),
        from: Some("alice@example.org"),
        group: None,
        id: Some(987_654_321),
        time: Some(1_700_000_000_000),
        msg_type: Some(1),
        priority: Some(0),
        flags: Some(flags::DELIVERY_RECEIPT | flags::READ_RECEIPT),
        payload: Some(payload),
    })
}

fn encoded(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out).expect("benchmark frame encodes");
    out
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, size) in PAYLOADS {
        let payload = vec![0xa5; size];
        let bytes = encoded(&msg(&payload));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("msg", name), &bytes, |b, bytes| {
            b.iter(|| decode_frame(black_box(bytes), MAX_FRAME))
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, size) in PAYLOADS {
        let payload = vec![0xa5; size];
        let frame = msg(&payload);
        let mut out = Vec::with_capacity(size + 128);
        group.throughput(Throughput::Bytes(encoded(&frame).len() as u64));
        group.bench_with_input(BenchmarkId::new("msg", name), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                encode(black_box(frame), &mut out)
            })
        });
    }
    group.finish();
}

fn bench_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(STREAM_FRAMES as u64));
    for (name, size) in PAYLOADS {
        let payload = vec![0xa5; size];
        let frame = msg(&payload);
        let stream = encoded(&frame).repeat(STREAM_FRAMES);
        group.bench_with_input(BenchmarkId::new("read", name), &stream, |b, stream| {
            b.iter(|| {
                let mut rest = black_box(&stream[..]);
                let mut frames = 0;
                while let Ok(total) = check(rest, MAX_FRAME) {
                    if decode(Kind(rest[0]), &rest[HEADER_LEN..total]).is_ok() {
                        frames += 1;
                    }
                    rest = &rest[total..];
                }
                frames
            })
        });
        let mut out = Vec::with_capacity(stream.len());
        group.bench_with_input(BenchmarkId::new("write", name), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                for _ in 0..STREAM_FRAMES {
                    let _ = encode(black_box(frame), &mut out);
                }
                out.len()
            })
        });
    }
    group.finish();
}

fn bench_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    let whole = encoded(&msg(&[0xa5; 64]));
    let header = &whole[..HEADER_LEN];
    group.bench_function("header_only", |b| {
        b.iter(|| check(black_box(header), MAX_FRAME))
    });
    group.bench_function("whole_frame", |b| {
        b.iter(|| check(black_box(&whole), MAX_FRAME))
    });
    group.finish();
}

fn bench_deframe(c: &mut Criterion) {
    let mut group = c.benchmark_group("deframe");
    for (name, size) in &PAYLOADS[..2] {
        let payload = vec![0xa5; *size];
        let frame = encoded(&msg(&payload));
        let stream = frame.repeat(DEFRAME_STREAM.div_ceil(frame.len()));
        let frames = stream.len() / frame.len();
        group.throughput(Throughput::Bytes(stream.len() as u64));
        // The floor: `check` and `decode` over the stream in one buffer, with the
        // frames handed on (black_box) as the deframer hands them on.
        group.bench_with_input(BenchmarkId::new("in_place", name), &stream, |b, stream| {
            b.iter(|| {
                let mut rest = black_box(&stream[..]);
                let mut seen = 0;
                while let Ok(total) = check(rest, MAX_FRAME) {
                    black_box(decode(Kind(rest[0]), &rest[HEADER_LEN..total]).ok());
                    rest = &rest[total..];
                    seen += 1;
                }
                assert_eq!(seen, frames);
            })
        });
        for (id, chunk_len) in [("whole", stream.len()), ("64KiB_chunks", READ_CHUNK)] {
            group.bench_with_input(BenchmarkId::new(id, name), &stream, |b, stream| {
                b.iter(|| {
                    let mut deframer = Deframer::new(MAX_FRAME);
                    let mut seen = 0;
                    for chunk in black_box(stream).chunks(chunk_len) {
                        let fed = deframer.feed(chunk, |frame| {
                            black_box(frame);
                            ControlFlow::Continue(())
                        });
                        seen += fed.expect("benchmark stream deframes");
                    }
                    assert_eq!(seen, frames);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_encode,
    bench_frames,
    bench_check,
    bench_deframe
);
criterion_main!(benches);
