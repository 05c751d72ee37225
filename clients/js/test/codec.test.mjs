// Codec tests: the byte examples of docs/protocol.md §2 and §11 (produced by
// tern's own Rust encoder), malformed input, and streaming.
// Run: node --test clients/js/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Kind, Flags, StatusCode, ErrorCode, encodeFrame, decodeFrames, decodeBody, frameLength,
  FrameDecoder, TernProtocolError, kindName, statusName, errorName, HEADER_LEN,
} from '../tern.js';

/** '01 00 00 00 08 0e…' → bytes */
const hex = (s) => Uint8Array.from(s.replace(/\s+/g, '').match(/../g) ?? [], (b) => parseInt(b, 16));
const utf8 = (s) => new TextEncoder().encode(s);

/** Asserts that decoding `bytes` fails with a TernProtocolError of `code`. */
function rejects(bytes, code, options) {
  assert.throws(() => decodeFrames(bytes, options), (e) => {
    assert.ok(e instanceof TernProtocolError, `not a TernProtocolError: ${e}`);
    assert.equal(e.code, code, e.message);
    return true;
  });
}

// --- docs/protocol.md §11, worked examples --------------------------------

const HELLO = hex('01 00000008  0e 01 01  0d 03 61 62 63');
const WELCOME = hex(`81 00000020  0e 01 01  15 05 61 6c 69 63 65  0b 08 0000018bcfe56800
  11 04 00100000  14 04 0000003c`);
const SEND = hex('02 00 00 00 19 01 08 00 00 00 00 00 00 00 07 02 03 62 6f 62 05 04 00 00 0e 10 09 02 68 69');
const STATUS_SENT = hex('82 0000001c  01 08 0000000000000007  02 03 62 6f 62  0c 01 01  0b 08 0000018bcfe5687b');
const MSG = hex(`83 00 00 00 38 0a 08 00 00 01 00 00 00 00 00 04 05 61 6c 69 63 65 01 08 00 00 00 00 00 00 00
  07 0b 08 00 00 01 8b cf e5 68 7b 06 04 00 00 00 00 07 01 00 08 04 00 00 00 03 09 02 68 69`);
const ACK = hex('03 00 00 00 14 0a 08 00 00 01 00 00 00 00 00 0a 08 00 00 01 00 00 00 00 01');
const ERROR_REPLACED = hex('84 0000000e  0f 02 0007  10 08 72 65 70 6c 61 63 65 64');
const PING = hex('05 00 00 00 00');

test('HELLO example: encode and decode', () => {
  assert.deepEqual(encodeFrame({ kind: Kind.HELLO, version: 1, token: 'abc' }), HELLO);
  assert.deepEqual(decodeFrames(HELLO), [{ kind: Kind.HELLO, version: 1, token: 'abc' }]);
  assert.equal(HELLO.length, 13);
});

test('WELCOME example', () => {
  const frame = { kind: Kind.WELCOME, version: 1, address: 'alice', time: 1700000000000n, maxFrame: 1048576, keepalive: 60 };
  assert.deepEqual(decodeFrames(WELCOME), [frame]);
  assert.deepEqual(encodeFrame(frame), WELCOME);
  assert.equal(WELCOME.length, 37);
});

test('SEND example: ID 7 to bob, EXPIRY 3600, payload "hi", no FLAGS field', () => {
  const bytes = encodeFrame({ kind: Kind.SEND, id: 7n, to: 'bob', expiry: 3600, payload: 'hi' });
  assert.deepEqual(bytes, SEND);
  assert.equal(bytes.length, 30);
  // A Number ID encodes the same as the bigint.
  assert.deepEqual(encodeFrame({ kind: Kind.SEND, id: 7, to: 'bob', expiry: 3600, payload: utf8('hi') }), SEND);
  const [f] = decodeFrames(SEND);
  assert.equal(f.id, 7n);
  assert.equal(f.to, 'bob');
  assert.equal(f.expiry, 3600);
  assert.equal(f.flags, undefined);
  assert.deepEqual(f.payload, utf8('hi'));
});

test('STATUS SENT example (no SEQ)', () => {
  const frame = { kind: Kind.STATUS, id: 7n, to: 'bob', status: StatusCode.SENT, time: 1700000000123n };
  assert.deepEqual(decodeFrames(STATUS_SENT), [frame]);
  assert.deepEqual(encodeFrame(frame), STATUS_SENT);
});

test('MSG example with SEQ 2^40', () => {
  const frame = {
    kind: Kind.MSG, seq: 1n << 40n, from: 'alice', id: 7n, time: 1700000000123n, type: 0, priority: 0,
    flags: Flags.DELIVERY_RECEIPT | Flags.READ_RECEIPT, payload: utf8('hi'),
  };
  assert.deepEqual(decodeFrames(MSG), [frame]);
  assert.deepEqual(encodeFrame(frame), MSG);
  assert.equal(MSG.length, 61);
});

test('ACK example: SEQ repeats', () => {
  const frame = { kind: Kind.ACK, seqs: [1099511627776n, 1099511627777n] };
  assert.deepEqual(encodeFrame(frame), ACK);
  assert.deepEqual(decodeFrames(ACK), [frame]);
  assert.deepEqual(encodeFrame({ kind: Kind.ACK, seqs: [] }), hex('03 00000000'));
});

test('ERROR REPLACED example', () => {
  const frame = { kind: Kind.ERROR, code: ErrorCode.REPLACED, reason: 'replaced' };
  assert.deepEqual(decodeFrames(ERROR_REPLACED), [frame]);
  assert.deepEqual(encodeFrame(frame), ERROR_REPLACED);
  assert.equal(errorName(7), 'REPLACED');
});

test('PING without TIME is just the header; BYE too', () => {
  assert.deepEqual(encodeFrame({ kind: Kind.PING }), PING);
  assert.deepEqual(encodeFrame({ kind: Kind.BYE }), hex('06 00000000'));
  assert.deepEqual(decodeFrames(PING), [{ kind: Kind.PING }]);
});

test('a 200-byte payload has the two-byte varint c8 01', () => {
  const bytes = encodeFrame({ kind: Kind.SEND, to: 'bob', payload: new Uint8Array(200).fill(0x41) });
  assert.deepEqual(bytes.subarray(0, 13), hex('02 000000d0  02 03 62 6f 62  09 c8 01'));
  assert.equal(decodeFrames(bytes)[0].payload.length, 200);
});

test('varint examples of §2: 3, 200, 16384, 2^28-1 round-trip as field lengths', () => {
  for (const [n, prefix] of [[3, '09 03'], [200, '09 c8 01'], [16384, '09 80 80 01']]) {
    const bytes = encodeFrame({ kind: Kind.SEND, payload: new Uint8Array(n) });
    assert.deepEqual(bytes.subarray(HEADER_LEN, HEADER_LEN + prefix.split(' ').length), hex(prefix), `n=${n}`);
    assert.equal(decodeFrames(bytes)[0].payload.length, n);
  }
  // The largest 4-byte varint: only its header and length are checked here.
  const body = hex('7f ff ff ff 7f');
  assert.throws(() => decodeBody(Kind.SEND, body), (e) => e.code === 'TRUNCATED');
});

test('several frames in one buffer, every kind round-trips', () => {
  const frames = [
    { kind: Kind.HELLO, version: 1, token: 'tok', client: 'test/1', keepalive: 30 },
    { kind: Kind.SEND, id: 0xffffffffffffffffn, group: 'team', expiry: 0, type: 3, priority: 15, flags: 1, payload: new Uint8Array(70000).fill(7) },
    { kind: Kind.READ, from: 'alice', id: 1n, group: 'g' },
    { kind: Kind.PING, time: 5n },
    { kind: Kind.BYE },
    { kind: Kind.STATUS, seq: 4n, id: 9n, to: 'bob', member: 'm', status: StatusCode.READ, time: 77n },
    { kind: Kind.MSG, seq: 1n, from: 'alice', id: 2n, time: 3n, type: 0, priority: 0, flags: 0x103, payload: new Uint8Array(0) },
    { kind: Kind.ERROR, code: ErrorCode.SHUTDOWN, reason: 'bye' },
    { kind: Kind.PONG },
  ];
  const parts = frames.map(encodeFrame);
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { all.set(p, at); at += p.length; }
  assert.deepEqual(decodeFrames(all), frames);
});

test('unknown tags are skipped, the last of a repeated tag wins', () => {
  const body = hex('7f 02 de ad  02 01 61  02 01 62');
  assert.deepEqual(decodeBody(Kind.SEND, body), { kind: Kind.SEND, to: 'b' });
});

test('known fields a kind does not carry are checked, then dropped', () => {
  // MSG carrying a TOKEN: valid, dropped.
  assert.deepEqual(decodeBody(Kind.PING, hex('0d 01 61')), { kind: Kind.PING });
  // PING carrying a 2-byte VERSION: malformed.
  assert.throws(() => decodeBody(Kind.PING, hex('0e 02 00 01')), (e) => e.code === 'BAD_WIDTH');
});

test('strings keep a leading BOM and non-ASCII text exactly', () => {
  const reason = '\uFEFFcafé ☕';
  const [f] = decodeFrames(encodeFrame({ kind: Kind.ERROR, code: 1, reason }));
  assert.equal(f.reason, reason);
});

// --- malformed input (docs/protocol.md §2 "What makes a frame malformed") --

test('unknown frame kind: 07 00000000', () => rejects(hex('07 00000000'), 'UNKNOWN_KIND'));

test('a field runs past the end of the body: 02 00000003 02 05 61', () =>
  rejects(hex('02 00000003  02 05 61'), 'TRUNCATED'));

test('a varint cut by the end of the body', () => rejects(hex('02 00000002  09 80'), 'TRUNCATED'));

test('a tag with no length at all', () => rejects(hex('02 00000001  09'), 'TRUNCATED'));

test('5-byte varint: 02 80 80 80 80 01', () =>
  rejects(hex('02 00000007  02 80 80 80 80 01 61'), 'VARINT_TOO_LONG'));

test('over-long (non-minimal) varint: 80 00 for 0', () => rejects(hex('02 00000003  09 80 00'), 'VARINT_NOT_MINIMAL'));

test('non-minimal varint with a value: 81 80 00', () => rejects(hex('02 00000004  09 81 80 00'), 'VARINT_NOT_MINIMAL'));

test('integer field of the wrong width: ID with flen 2', () =>
  rejects(hex('02 00000004  01 02 00 01'), 'BAD_WIDTH'));

test('text field that is not UTF-8: TO = ff', () => rejects(hex('02 00000003  02 01 ff'), 'BAD_UTF8'));

test('text field with an overlong UTF-8 encoding and a lone surrogate', () => {
  rejects(hex('02 00000004  02 02 c0 af'), 'BAD_UTF8');
  rejects(hex('02 00000005  02 03 ed a0 80'), 'BAD_UTF8');
});

test('PAYLOAD is bytes: invalid UTF-8 is fine there', () => {
  assert.deepEqual(decodeFrames(hex('02 00000003  09 01 ff'))[0].payload, hex('ff'));
});

test('a trailing partial frame in a WebSocket message is refused', () => {
  rejects(hex('05 00000000  05 0000'), 'PARTIAL_FRAME');
  rejects(hex('02 00000003  02 01'), 'PARTIAL_FRAME');
});

test('a frame over the limit is refused from its header alone', () => {
  // 2 GiB announced, 0 bytes present: refused without waiting for the body.
  rejects(hex('02 80000000'), 'FRAME_TOO_LARGE');
  rejects(hex('02 00000011') , 'FRAME_TOO_LARGE', { maxFrame: 16 });
  assert.equal(frameLength(hex('02 00000010'), 16), -16);
});

test('errors report the byte offset in the buffer', () => {
  try {
    decodeFrames(hex('05 00000000  02 00000003  02 01 ff'));
    assert.fail('no error');
  } catch (e) {
    assert.equal(e.code, 'BAD_UTF8');
    assert.equal(e.offset, 10);
    assert.match(e.message, /at byte 10/);
  }
});

test('frameLength: incomplete header and body report what is missing', () => {
  assert.equal(frameLength(hex('02 00 00')), -2);
  assert.equal(frameLength(hex('02 00000003  01')), -2);
  assert.equal(frameLength(hex('02 00000000')), 5);
});

test('encoder refuses values it cannot encode', () => {
  assert.throws(() => encodeFrame({ kind: 0x42 }), RangeError);
  assert.throws(() => encodeFrame({ kind: Kind.SEND, priority: 256 }), RangeError);
  assert.throws(() => encodeFrame({ kind: Kind.SEND, id: -1n }), RangeError);
  assert.throws(() => encodeFrame({ kind: Kind.SEND, id: 1n << 64n }), RangeError);
  assert.throws(() => encodeFrame({ kind: Kind.SEND, id: 2 ** 60 }), TypeError);
  assert.throws(() => encodeFrame({ kind: Kind.SEND, to: 42 }), TypeError);
});

// --- streaming ----------------------------------------------------------

test('FrameDecoder: any chunking gives the same frames', () => {
  const stream = new Uint8Array([...HELLO, ...MSG, ...PING, ...ACK]);
  const expected = decodeFrames(stream);
  for (const size of [1, 2, 3, 5, 7, 13, 64]) {
    const dec = new FrameDecoder();
    const got = [];
    for (let i = 0; i < stream.length; i += size) got.push(...dec.push(stream.subarray(i, i + size)));
    assert.deepEqual(got, expected, `chunk size ${size}`);
    assert.equal(dec.buffered, 0);
  }
});

test('FrameDecoder: values do not alias the input buffer', () => {
  const dec = new FrameDecoder();
  const copy = MSG.slice();
  const [f] = dec.push(copy);
  copy.fill(0);
  assert.deepEqual(f.payload, utf8('hi'));
});

test('FrameDecoder: refuses an oversized header before the body, then stays broken', () => {
  const dec = new FrameDecoder({ maxFrame: 100 });
  assert.deepEqual(dec.push(hex('02 00 00')), []);
  assert.throws(() => dec.push(hex('10 00')), (e) => e.code === 'FRAME_TOO_LARGE');
  assert.throws(() => dec.push(PING), (e) => e.code === 'FRAME_TOO_LARGE');
});

test('FrameDecoder: a malformed frame after good ones', () => {
  const dec = new FrameDecoder();
  assert.equal(dec.push(PING).length, 1);
  assert.throws(() => dec.push(hex('02 00000003  02 01 ff')), (e) => e.code === 'BAD_UTF8');
});

test('fuzz-ish: random bytes never throw anything but TernProtocolError', () => {
  let seed = 12345;
  const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
  const seeds = [HELLO, WELCOME, SEND, STATUS_SENT, MSG, ACK, ERROR_REPLACED];
  for (let i = 0; i < 3000; i++) {
    const base = seeds[i % seeds.length].slice();
    const flips = 1 + Math.floor(rnd() * 4);
    for (let j = 0; j < flips; j++) base[Math.floor(rnd() * base.length)] = Math.floor(rnd() * 256);
    const cut = base.subarray(0, Math.floor(rnd() * (base.length + 1)));
    for (const input of [base, cut]) {
      try {
        decodeFrames(input, { maxFrame: 4096 });
      } catch (e) {
        assert.ok(e instanceof TernProtocolError, `unexpected ${e}`);
      }
    }
  }
});

test('names of kinds, statuses and errors, with fallbacks', () => {
  assert.equal(kindName(0x83), 'MSG');
  assert.equal(kindName(0x7f), 'UNKNOWN_0x7f');
  assert.equal(statusName(70), 'OVERLOADED');
  assert.equal(statusName(99), 'STATUS_99');
  assert.equal(errorName(2), 'AUTH_FAILED');
});
