// @ts-check
/**
 * tern.js: the browser (and Node) client of the tern messaging server,
 * protocol v1 over WebSocket. One ES module, no build step, no dependencies.
 *
 * The file has two parts:
 *
 * 1. **Codec** (sans-IO): frame kinds, field tags, status and error codes in
 *    one table each; {@link encodeFrame}, the two-phase reader
 *    ({@link frameLength} reads the 5-byte header only, {@link decodeBody}
 *    walks the body with bounds checks), {@link decodeFrames} for one
 *    WebSocket message and the streaming {@link FrameDecoder}.
 * 2. **Client**: {@link TernClient} over `WebSocket` (subprotocol `tern.v1`):
 *    login, send with status tracking ({@link SendHandle}), receive with
 *    automatic or manual ACK, SEQ dedup, READ receipts, keepalive, reconnect
 *    with backoff and resend of unanswered SENDs under the same ID.
 *
 * ```text
 * frame  = kind:u8  len:u32(BE)  body[len]          header is 5 bytes
 * body   = field*
 * field  = tag:u8  flen:varint  value[flen]
 * varint = unsigned LEB128, 1..4 bytes, minimal     so flen < 2^28
 * ints   = big-endian, flen exactly 1/2/4/8 for u8/u16/u32/u64
 * ```
 *
 * Numbers: u64 fields (ID, SEQ, TIME) are `bigint` in the codec, so every
 * value is exact. The client keeps ID and SEQ as `bigint` and turns TIME
 * (milliseconds since the epoch, always far below 2^53) into a `number`.
 * u8/u16/u32 fields are `number`.
 *
 * @module tern
 */

// ---------------------------------------------------------------------------
// Part 1: codec
// ---------------------------------------------------------------------------

/** Protocol version spoken by this library. */
export const PROTOCOL_VERSION = 1;
/** WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL = 'tern.v1';
/** Bytes in a frame header: kind (1) and body length (4). */
export const HEADER_LEN = 5;
/** The largest value a 4-byte varint carries (2^28 - 1). */
export const VARINT_MAX = 0x0fffffff;
/** The server's default `max_frame`, used until WELCOME says otherwise. */
export const DEFAULT_MAX_FRAME = 1 << 20;

/** Frame kinds (the first byte of a frame). */
export const Kind = Object.freeze({
  HELLO: 0x01, SEND: 0x02, ACK: 0x03, READ: 0x04, PING: 0x05, BYE: 0x06,
  WELCOME: 0x81, STATUS: 0x82, MSG: 0x83, ERROR: 0x84, PONG: 0x85,
});

/** Field tags (the first byte of a field). */
export const Tag = Object.freeze({
  ID: 0x01, TO: 0x02, GROUP: 0x03, FROM: 0x04, EXPIRY: 0x05, TYPE: 0x06,
  PRIORITY: 0x07, FLAGS: 0x08, PAYLOAD: 0x09, SEQ: 0x0a, TIME: 0x0b,
  STATUS: 0x0c, TOKEN: 0x0d, VERSION: 0x0e, CODE: 0x0f, REASON: 0x10,
  MAX_FRAME: 0x11, MEMBER: 0x12, CLIENT: 0x13, KEEPALIVE: 0x14, ADDRESS: 0x15,
});

/** STATUS codes: what became of a message this user sent. */
export const StatusCode = Object.freeze({
  SENT: 1, DELIVERED: 2, READ: 3,
  INVALID_DEST: 64, EXPIRED: 65, OFFLINE: 66, TOO_LARGE: 67, NOT_MEMBER: 68,
  BAD_REQUEST: 69, OVERLOADED: 70, DELETED: 71,
});

/** ERROR codes (every ERROR is fatal: the server closes after it). */
export const ErrorCode = Object.freeze({
  PROTOCOL_ERROR: 1, AUTH_FAILED: 2, FRAME_TOO_LARGE: 3, NOT_AUTHENTICATED: 4,
  IDLE_TIMEOUT: 5, SHUTDOWN: 6, REPLACED: 7, UNSUPPORTED_VERSION: 8,
});

/** FLAGS bits. */
export const Flags = Object.freeze({
  /** The sender wants a DELIVERED status. */
  DELIVERY_RECEIPT: 0x001,
  /** The sender wants a READ status. */
  READ_RECEIPT: 0x002,
  /** Set by the server: this SEQ may have reached this user before. */
  REDELIVERY: 0x100,
  /** FLAGS of a SEND without a FLAGS field. */
  SEND_DEFAULT: 0x003,
});

/** @param {Record<string, number>} table */
const reverse = (table) => new Map(Object.entries(table).map(([k, v]) => [v, k]));
const KIND_NAMES = reverse(Kind);
const STATUS_NAMES = reverse(StatusCode);
const ERROR_NAMES = reverse(ErrorCode);
/** @param {number} n @param {number} width */
const hex = (n, width = 2) => '0x' + n.toString(16).padStart(width, '0');

/**
 * The name of a frame kind, or `UNKNOWN_0x..`.
 * @param {number} kind
 * @returns {string}
 */
export function kindName(kind) {
  return KIND_NAMES.get(kind) ?? `UNKNOWN_${hex(kind)}`;
}

/**
 * The table name of a STATUS code (`SENT`, `INVALID_DEST`, …), or `STATUS_<n>`.
 * @param {number} code
 * @returns {string}
 */
export function statusName(code) {
  return STATUS_NAMES.get(code) ?? `STATUS_${code}`;
}

/**
 * The table name of an ERROR code (`AUTH_FAILED`, …), or `ERROR_<n>`.
 * @param {number} code
 * @returns {string}
 */
export function errorName(code) {
  return ERROR_NAMES.get(code) ?? `ERROR_${code}`;
}

/**
 * @typedef {'u8'|'u16'|'u32'|'u64'|'str'|'bytes'} FieldType
 * @typedef {{tag: number, name: string, type: FieldType}} FieldDef
 */

/** The one table of fields: tag, property name in frame objects, wire type. */
const FIELD_DEFS = /** @type {const} */ ([
  [0x01, 'id', 'u64'], [0x02, 'to', 'str'], [0x03, 'group', 'str'],
  [0x04, 'from', 'str'], [0x05, 'expiry', 'u32'], [0x06, 'type', 'u32'],
  [0x07, 'priority', 'u8'], [0x08, 'flags', 'u32'], [0x09, 'payload', 'bytes'],
  [0x0a, 'seq', 'u64'], [0x0b, 'time', 'u64'], [0x0c, 'status', 'u8'],
  [0x0d, 'token', 'str'], [0x0e, 'version', 'u8'], [0x0f, 'code', 'u16'],
  [0x10, 'reason', 'str'], [0x11, 'maxFrame', 'u32'], [0x12, 'member', 'str'],
  [0x13, 'client', 'str'], [0x14, 'keepalive', 'u32'], [0x15, 'address', 'str'],
]);
/** @type {Map<number, FieldDef>} */
const FIELD_BY_TAG = new Map(FIELD_DEFS.map(([tag, name, type]) => [tag, { tag, name, type }]));
/** @type {Map<string, FieldDef>} */
const FIELD_BY_NAME = new Map(FIELD_DEFS.map(([tag, name, type]) => [name, { tag, name, type }]));
const WIDTH = { u8: 1, u16: 2, u32: 4, u64: 8 };

/**
 * Which fields each frame kind carries, in the order the encoder writes them
 * (the order of the spec's frame tables). ACK carries repeated SEQ, exposed
 * as `seqs`. Known fields not listed for a kind are checked, then dropped.
 * @type {Map<number, readonly string[]>}
 */
const LAYOUT = new Map([
  [Kind.HELLO, ['version', 'token', 'client', 'keepalive']],
  [Kind.SEND, ['id', 'to', 'group', 'expiry', 'type', 'priority', 'flags', 'payload']],
  [Kind.ACK, ['seq']],
  [Kind.READ, ['from', 'id', 'group']],
  [Kind.PING, ['time']],
  [Kind.BYE, []],
  [Kind.WELCOME, ['version', 'address', 'time', 'maxFrame', 'keepalive']],
  [Kind.STATUS, ['seq', 'id', 'to', 'group', 'member', 'status', 'time']],
  [Kind.MSG, ['seq', 'from', 'group', 'id', 'time', 'type', 'priority', 'flags', 'payload']],
  [Kind.ERROR, ['code', 'reason']],
  [Kind.PONG, ['time']],
]);

/**
 * A frame as a plain object: `kind` plus one property per field present,
 * named as in the field table (`id`, `to`, `maxFrame`, …). u64 fields are
 * `bigint`, other integers `number`, `str` fields `string`, PAYLOAD a
 * `Uint8Array`. An ACK has `seqs` (all its SEQ fields, in order) instead of
 * `seq`. Absent fields are absent (`undefined`).
 *
 * @typedef {object} Frame
 * @property {number} kind
 * @property {bigint} [id]
 * @property {string} [to]
 * @property {string} [group]
 * @property {string} [from]
 * @property {number} [expiry]
 * @property {number} [type]
 * @property {number} [priority]
 * @property {number} [flags]
 * @property {Uint8Array} [payload]
 * @property {bigint} [seq]
 * @property {bigint[]} [seqs]
 * @property {bigint} [time]
 * @property {number} [status]
 * @property {string} [token]
 * @property {number} [version]
 * @property {number} [code]
 * @property {string} [reason]
 * @property {number} [maxFrame]
 * @property {string} [member]
 * @property {string} [client]
 * @property {number} [keepalive]
 * @property {string} [address]
 */

/**
 * Input of {@link encodeFrame}: like {@link Frame}, but integers may be given
 * as `number` or `bigint`, strings as `string`, PAYLOAD as any byte source
 * or a string (UTF-8 encoded). `null`/`undefined` fields are left out.
 * @typedef {{kind: number, seqs?: Iterable<bigint|number>} & Record<string, any>} FrameInput
 */

/**
 * Base class of every error this library raises or reports. `code` is a
 * stable machine-readable name.
 */
export class TernError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{cause?: unknown}} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    this.name = 'TernError';
    /** Machine-readable name, e.g. `DISCONNECTED`, `TIMEOUT`, `CLOSED`. */
    this.code = code;
  }
}

/**
 * Malformed bytes (a framing error). `code` is one of `UNKNOWN_KIND`,
 * `FRAME_TOO_LARGE`, `TRUNCATED`, `VARINT_TOO_LONG`, `VARINT_NOT_MINIMAL`,
 * `BAD_WIDTH`, `BAD_UTF8`, `PARTIAL_FRAME`, or (client level)
 * `TEXT_MESSAGE`, `UNEXPECTED_FRAME`, `BAD_FRAME`.
 */
export class TernProtocolError extends TernError {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number} [offset] byte offset of the problem in the decoded buffer
   */
  constructor(code, message, offset) {
    super(code, offset === undefined ? message : `${message} (at byte ${offset})`);
    this.name = 'TernProtocolError';
    /** The message without the offset. */
    this.detail = message;
    /** Byte offset of the problem, when known. */
    this.offset = offset;
  }
}

/**
 * An ERROR frame from the server. `code` is the error's table name
 * (`AUTH_FAILED`, `REPLACED`, …), `errorCode` its number, `reason` the
 * server's text.
 */
export class TernServerError extends TernError {
  /**
   * @param {number} errorCode
   * @param {string} reason
   */
  constructor(errorCode, reason) {
    super(errorName(errorCode), `server error ${errorName(errorCode)}: ${reason}`);
    this.name = 'TernServerError';
    /** The numeric CODE field. */
    this.errorCode = errorCode;
    /** The REASON field. */
    this.reason = reason;
  }
}

/**
 * A send that ended in a failure status. `code` is the status name
 * (`INVALID_DEST`, `TOO_LARGE`, `OVERLOADED`, `EXPIRED`, …).
 */
export class TernSendError extends TernError {
  /**
   * @param {string} status
   * @param {SendHandle} handle
   */
  constructor(status, handle) {
    super(status, `message ${handle.id} failed: ${status}`);
    this.name = 'TernSendError';
    /** The handle of the failed message. */
    this.handle = handle;
  }
}

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const looseUtf8 = new TextDecoder('utf-8', { ignoreBOM: true });

/**
 * Bytes of a payload-like value: a string is UTF-8 encoded; an ArrayBuffer or
 * any view is viewed (not copied).
 * @param {string|ArrayBuffer|ArrayBufferView} value
 * @returns {Uint8Array}
 */
export function toBytes(value) {
  if (typeof value === 'string') return utf8.encode(value);
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError('expected a string, ArrayBuffer or ArrayBufferView');
}

/**
 * Bytes a varint of `n` takes.
 * @param {number} n
 */
function varintLen(n) {
  return n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : 4;
}

/**
 * @param {FieldDef} def
 * @param {unknown} value
 * @returns {Uint8Array}
 */
function encodeValue(def, value) {
  switch (def.type) {
    case 'str':
      if (typeof value !== 'string') throw new TypeError(`field ${def.name} must be a string`);
      return utf8.encode(value);
    case 'bytes':
      return toBytes(/** @type {any} */ (value));
    case 'u64': {
      let big;
      if (typeof value === 'bigint') big = value;
      else if (typeof value === 'number' && Number.isSafeInteger(value)) big = BigInt(value);
      else throw new TypeError(`field ${def.name} must be a bigint or a safe integer`);
      if (big < 0n || big > 0xffffffffffffffffn) throw new RangeError(`field ${def.name} out of u64 range`);
      const out = new Uint8Array(8);
      new DataView(out.buffer).setBigUint64(0, big);
      return out;
    }
    default: {
      const width = WIDTH[def.type];
      const n = typeof value === 'bigint' ? Number(value) : value;
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n >= 2 ** (8 * width)) {
        throw new RangeError(`field ${def.name} must be an integer in ${def.type} range`);
      }
      const out = new Uint8Array(width);
      for (let i = width - 1, v = n; i >= 0; i--, v = Math.floor(v / 256)) out[i] = v % 256;
      return out;
    }
  }
}

/**
 * Encodes one frame. Fields are written in the order of the spec's frame
 * tables; `null`/`undefined` fields are left out; fields that the kind does
 * not carry are ignored. Throws `TypeError`/`RangeError` for a value that
 * cannot be encoded (an application bug, never a network condition).
 * @param {FrameInput} frame
 * @returns {Uint8Array} header and body
 */
export function encodeFrame(frame) {
  const layout = LAYOUT.get(frame.kind);
  if (!layout) throw new RangeError(`unknown frame kind ${hex(Number(frame.kind))}`);
  /** @type {Array<[number, Uint8Array]>} */
  const parts = [];
  let size = 0;
  /** @param {FieldDef} def @param {unknown} value */
  const add = (def, value) => {
    const bytes = encodeValue(def, value);
    if (bytes.length > VARINT_MAX) throw new RangeError(`field ${def.name} of ${bytes.length} bytes exceeds the varint limit`);
    parts.push([def.tag, bytes]);
    size += 1 + varintLen(bytes.length) + bytes.length;
  };
  if (frame.kind === Kind.ACK) {
    const seqDef = /** @type {FieldDef} */ (FIELD_BY_NAME.get('seq'));
    for (const seq of frame.seqs ?? []) add(seqDef, seq);
  } else {
    for (const name of layout) {
      const value = frame[name];
      if (value !== undefined && value !== null) add(/** @type {FieldDef} */ (FIELD_BY_NAME.get(name)), value);
    }
  }
  if (size > 0xffffffff) throw new RangeError(`frame body of ${size} bytes exceeds u32`);
  const out = new Uint8Array(HEADER_LEN + size);
  out[0] = frame.kind;
  new DataView(out.buffer).setUint32(1, size);
  let at = HEADER_LEN;
  for (const [tag, bytes] of parts) {
    out[at++] = tag;
    let n = bytes.length;
    while (n >= 0x80) {
      out[at++] = (n & 0x7f) | 0x80;
      n >>>= 7;
    }
    out[at++] = n;
    out.set(bytes, at);
    at += bytes.length;
  }
  return out;
}

/**
 * Phase one of reading: looks at the 5-byte header at `offset` only, so an
 * oversized or unknown frame is refused before its body is buffered.
 * Returns the whole frame's length (header + body) when all of it is in
 * `buf`, else a negative number: minus the bytes still missing.
 * Throws {@link TernProtocolError} `UNKNOWN_KIND` or `FRAME_TOO_LARGE`.
 * @param {Uint8Array} buf
 * @param {number} [maxFrame] largest body accepted
 * @param {number} [offset]
 * @returns {number}
 */
export function frameLength(buf, maxFrame = DEFAULT_MAX_FRAME, offset = 0) {
  const avail = buf.length - offset;
  if (avail < HEADER_LEN) return -(HEADER_LEN - avail);
  const kind = buf[offset];
  if (!LAYOUT.has(kind)) throw new TernProtocolError('UNKNOWN_KIND', `unknown frame kind ${hex(kind)}`, offset);
  const len = ((buf[offset + 1] << 24) >>> 0) + (buf[offset + 2] << 16) + (buf[offset + 3] << 8) + buf[offset + 4];
  if (len > maxFrame) {
    throw new TernProtocolError('FRAME_TOO_LARGE', `frame body of ${len} bytes exceeds the limit of ${maxFrame}`, offset);
  }
  const total = HEADER_LEN + len;
  return avail < total ? -(total - avail) : total;
}

/**
 * Phase two: decodes one frame body of the given kind. Unknown tags are
 * skipped; known tags are checked (integer width, UTF-8) in every frame,
 * even one that does not carry them; a repeated tag: the last wins, except
 * SEQ in ACK, which accumulates into `seqs`. Values are copied out of
 * `body`. Throws {@link TernProtocolError} for any malformed input; never
 * reads past `body`.
 * @param {number} kind
 * @param {Uint8Array} body
 * @returns {Frame}
 */
export function decodeBody(kind, body) {
  const layout = LAYOUT.get(kind);
  if (!layout) throw new TernProtocolError('UNKNOWN_KIND', `unknown frame kind ${hex(kind)}`);
  /** @type {Record<string, any>} */
  const frame = { kind };
  if (kind === Kind.ACK) frame.seqs = [];
  let at = 0;
  while (at < body.length) {
    const start = at;
    const tag = body[at++];
    // Minimal LEB128, 1 to 4 bytes.
    let flen = 0;
    for (let i = 0; ; i++) {
      if (i === 4) throw new TernProtocolError('VARINT_TOO_LONG', 'field length varint longer than 4 bytes', start);
      if (at >= body.length) throw new TernProtocolError('TRUNCATED', 'field runs past the end of the frame', start);
      const byte = body[at++];
      flen += (byte & 0x7f) * 2 ** (7 * i);
      if ((byte & 0x80) === 0) {
        if (i > 0 && byte === 0) {
          throw new TernProtocolError('VARINT_NOT_MINIMAL', 'field length varint not minimally encoded', start);
        }
        break;
      }
    }
    if (flen > body.length - at) throw new TernProtocolError('TRUNCATED', 'field runs past the end of the frame', start);
    const value = body.subarray(at, at + flen);
    at += flen;
    const def = FIELD_BY_TAG.get(tag);
    if (!def) continue; // unknown tag: skipped (forward compatibility)
    const decoded = decodeValue(def, value, start);
    if (kind === Kind.ACK && def.name === 'seq') frame.seqs.push(decoded);
    else if (layout.includes(def.name)) frame[def.name] = decoded;
  }
  return /** @type {Frame} */ (frame);
}

/**
 * @param {FieldDef} def
 * @param {Uint8Array} value
 * @param {number} offset
 */
function decodeValue(def, value, offset) {
  switch (def.type) {
    case 'str':
      try {
        return strictUtf8.decode(value);
      } catch {
        throw new TernProtocolError('BAD_UTF8', `field ${def.name.toUpperCase()} is not UTF-8`, offset);
      }
    case 'bytes':
      return value.slice();
    default: {
      const width = WIDTH[def.type];
      if (value.length !== width) {
        throw new TernProtocolError('BAD_WIDTH',
          `field ${def.name.toUpperCase()} has length ${value.length}, expected ${width}`, offset);
      }
      if (def.type === 'u64') return new DataView(value.buffer, value.byteOffset, 8).getBigUint64(0);
      let n = 0;
      for (const b of value) n = n * 256 + b;
      return n;
    }
  }
}

/**
 * Decodes a buffer that holds only complete frames, e.g. one WebSocket
 * message. A trailing partial frame is a `PARTIAL_FRAME` error.
 * @param {Uint8Array} bytes
 * @param {{maxFrame?: number}} [options]
 * @returns {Frame[]}
 */
export function decodeFrames(bytes, options = {}) {
  const maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
  const frames = [];
  let at = 0;
  while (at < bytes.length) {
    const total = frameLength(bytes, maxFrame, at);
    if (total < 0) {
      throw new TernProtocolError('PARTIAL_FRAME', `incomplete frame: ${-total} more bytes expected`, at);
    }
    frames.push(decodeAt(bytes, at, total));
    at += total;
  }
  return frames;
}

/**
 * @param {Uint8Array} bytes
 * @param {number} at
 * @param {number} total
 */
function decodeAt(bytes, at, total) {
  try {
    return decodeBody(bytes[at], bytes.subarray(at + HEADER_LEN, at + total));
  } catch (e) {
    if (e instanceof TernProtocolError && e.offset !== undefined) {
      // Report offsets relative to the whole buffer.
      throw new TernProtocolError(e.code, e.detail, at + HEADER_LEN + e.offset);
    }
    throw e;
  }
}

/**
 * A byte stream arriving in chunks, cut into frames (for stream transports
 * such as TCP; WebSocket messages use {@link decodeFrames}). Only a partial
 * frame is kept between calls; a header announcing more than `maxFrame` is
 * refused before its body is buffered. After an error the decoder is broken:
 * every later `push` throws the same error.
 */
export class FrameDecoder {
  /** @param {{maxFrame?: number}} [options] */
  constructor(options = {}) {
    /** Largest body accepted. */
    this.maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
    /** Bytes of an incomplete frame carried over to the next push. */
    this._rest = new Uint8Array(0);
    /** @type {TernProtocolError|null} the error that broke the stream */
    this._error = null;
  }

  /** Bytes buffered that do not yet make a whole frame. */
  get buffered() {
    return this._rest.length;
  }

  /**
   * Feeds a chunk; returns the frames it completes (possibly none).
   * @param {Uint8Array} chunk
   * @returns {Frame[]}
   */
  push(chunk) {
    if (this._error) throw this._error;
    let buf = chunk;
    if (this._rest.length) {
      buf = new Uint8Array(this._rest.length + chunk.length);
      buf.set(this._rest);
      buf.set(chunk, this._rest.length);
    }
    const frames = [];
    let at = 0;
    try {
      for (;;) {
        const total = frameLength(buf, this.maxFrame, at);
        if (total < 0) break;
        frames.push(decodeAt(buf, at, total));
        at += total;
      }
    } catch (e) {
      this._error = e instanceof TernProtocolError ? e : new TernProtocolError('BAD_FRAME', String(e));
      this._rest = new Uint8Array(0);
      throw this._error;
    }
    this._rest = buf.slice(at);
    return frames;
  }
}

// ---------------------------------------------------------------------------
// Part 2: client
// ---------------------------------------------------------------------------

/**
 * Minimal listener registry used by {@link TernClient} and {@link SendHandle}:
 * `on(type, fn)` returns a function that removes the listener. A listener
 * that throws does not stop the others; its error is reported through
 * `onListenerError`.
 */
class Emitter {
  constructor() {
    /** @type {Map<string, Function[]>} */
    this._listeners = new Map();
  }

  /**
   * Adds a listener; returns a function that removes it.
   * @param {string} type
   * @param {Function} fn
   * @returns {() => void}
   */
  on(type, fn) {
    if (typeof fn !== 'function') throw new TypeError('listener must be a function');
    const list = this._listeners.get(type) ?? [];
    list.push(fn);
    this._listeners.set(type, list);
    return () => this.off(type, fn);
  }

  /**
   * Removes a listener added with `on`.
   * @param {string} type
   * @param {Function} fn
   */
  off(type, fn) {
    const list = this._listeners.get(type);
    if (!list) return;
    const i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }

  /**
   * Adds a listener that runs once.
   * @param {string} type
   * @param {Function} fn
   * @returns {() => void}
   */
  once(type, fn) {
    /** @param {any[]} args */
    const wrapper = (...args) => {
      this.off(type, wrapper);
      return fn(...args);
    };
    return this.on(type, wrapper);
  }

  /** @param {string} type */
  _count(type) {
    return this._listeners.get(type)?.length ?? 0;
  }

  /**
   * Calls every listener synchronously; exceptions go to `_listenerError`.
   * @param {string} type
   * @param {unknown} arg
   */
  _emit(type, arg) {
    if (type === 'error' && !this._count('error')) console.warn('tern:', arg);
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        const r = fn(arg);
        if (r && typeof r.then === 'function') r.then(undefined, (/** @type {unknown} */ e) => this._listenerError(type, e));
      } catch (e) {
        this._listenerError(type, e);
      }
    }
  }

  /**
   * Calls every listener in turn, awaiting each returned promise; the first
   * failure is thrown (used where an ACK waits for the application).
   * @param {string} type
   * @param {unknown} arg
   */
  async _emitAsync(type, arg) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) await fn(arg);
  }

  /**
   * @param {string} type
   * @param {unknown} error
   */
  _listenerError(type, error) {
    if (type !== 'error' && this._count('error')) this._emit('error', error);
    else console.error(`tern: a "${type}" listener threw`, error);
  }
}

/**
 * Progress statuses are lowercase (`sending`, `sent`, `delivered`, `read`,
 * and `written` for fire-and-forget); failures carry the protocol's status
 * name in uppercase (`INVALID_DEST`, `EXPIRED`, `OFFLINE`, `TOO_LARGE`,
 * `NOT_MEMBER`, `BAD_REQUEST`, `OVERLOADED`, `DELETED`, or `STATUS_<n>` for
 * a code this version does not know).
 * @typedef {'sending'|'written'|'sent'|'delivered'|'read'|string} SendStatus
 */

/** Rank of the progress statuses; a handle's status never moves back. */
const PROGRESS = new Map([['sending', 0], ['written', 1], ['sent', 1], ['delivered', 2], ['read', 3]]);
/** @param {string} s */
const isProgress = (s) => PROGRESS.has(s);
/** @param {number} code @returns {SendStatus} */
function sendStatusOf(code) {
  if (code === StatusCode.SENT) return 'sent';
  if (code === StatusCode.DELIVERED) return 'delivered';
  if (code === StatusCode.READ) return 'read';
  return statusName(code);
}

/**
 * A STATUS from the server, as delivered to `status` listeners.
 * @typedef {object} StatusEvent
 * @property {bigint} id the ID of the message it is about
 * @property {SendStatus} status `sent`, `delivered`, `read` or a failure name
 * @property {string} name the table name (`SENT`, `DELIVERED`, …)
 * @property {number} code the numeric STATUS
 * @property {string|null} to
 * @property {string|null} group
 * @property {string|null} member the group member a group status is about
 * @property {number|null} time server time, ms since the epoch
 * @property {bigint|null} seq present on stored statuses (ACKed by the client)
 * @property {SendHandle|null} handle the matching handle, if this client sent it
 */

/**
 * A change of a {@link SendHandle}, as delivered to its `status` listeners.
 * @typedef {object} HandleStatusEvent
 * @property {SendHandle} handle
 * @property {SendStatus} status the handle's status after the change
 * @property {SendStatus} previous its status before
 * @property {string|null} member for a group member's status: which member
 * @property {SendStatus|null} memberStatus and that member's status
 */

/**
 * The life of one sent message. `status` moves `sending` → `sent` →
 * `delivered` → `read` (never backwards; READ may come before DELIVERED)
 * or ends in a failure name. `OVERLOADED` is shown while a retry is
 * pending, then the status returns to `sending`; it becomes final only
 * when the retries are used up. Listen with `handle.on('status', fn)`.
 *
 * For a group message, per-member DELIVERED/READ/EXPIRED/DELETED go to
 * `members`; the overall `status` is the furthest progress of any member.
 */
export class SendHandle extends Emitter {
  /**
   * @param {bigint} id
   * @param {string|null} to
   * @param {string|null} group
   * @param {Uint8Array} bytes the encoded SEND
   */
  constructor(id, to, group, bytes) {
    super();
    /** The message's ID (0n = fire-and-forget). */
    this.id = id;
    /** Destination user, or null for a group message. */
    this.to = to;
    /** Destination group, or null. */
    this.group = group;
    /** @type {SendStatus} */
    this.status = 'sending';
    /** @type {TernSendError|null} set when the status is a final failure */
    this.error = null;
    /** @type {number|null} server time of the last status, ms since the epoch */
    this.time = null;
    /** @type {Map<string, SendStatus>} per-member statuses of a group message */
    this.members = new Map();
    /** How many times the SEND was written to a connection. */
    this.attempts = 0;
    /**
     * Where the SEND is: `queued` (to be written at the next chance),
     * `inflight` (written on the current connection, unanswered), `retry`
     * (OVERLOADED, waiting for its backoff timer), `done` (answered).
     * @type {'queued'|'inflight'|'retry'|'done'}
     */
    this._phase = 'queued';
    /** The encoded SEND, written again byte for byte on every resend. */
    this._bytes = bytes;
    /** OVERLOADED answers so far (drives the retry backoff). */
    this._overloaded = 0;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._retryTimer = null;
    /** @type {(h: SendHandle) => void} */
    let resolve = () => {};
    /** @type {(e: TernSendError) => void} */
    let reject = () => {};
    /**
     * Resolves with the handle once the server accepted the message (`sent`,
     * or `written` for fire-and-forget); rejects with a {@link TernSendError}
     * if it fails first.
     * @type {Promise<SendHandle>}
     */
    this.sent = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // A rejection nobody awaits is not an "unhandled rejection": the status
    // is also on the handle and in the events.
    this.sent.catch(() => {});
    this._resolve = resolve;
    this._reject = reject;
  }

  /** Whether the status can no longer change (read, written, or a final failure). */
  get final() {
    return this.status === 'read' || this.status === 'written' || this.error !== null;
  }

  /**
   * Listens to status changes: `on('status', ({status, previous, member}) => …)`.
   * @param {'status'} type
   * @param {(ev: HandleStatusEvent) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    return super.on(type, fn);
  }

  /**
   * @param {SendStatus} status
   * @param {string|null} [member]
   * @param {SendStatus|null} [memberStatus]
   */
  _set(status, member = null, memberStatus = null) {
    const previous = this.status;
    this.status = status;
    if (status === 'sent' || status === 'delivered' || status === 'read' || status === 'written') this._resolve(this);
    else if (!isProgress(status) && !this.error && !(status === 'OVERLOADED' && this._phase === 'retry')) {
      this.error = new TernSendError(status, this);
      this._reject(this.error);
    }
    this._emit('status', { handle: this, status, previous, member, memberStatus });
  }
}

/**
 * A message delivered to this user.
 */
export class TernMessage {
  /** @type {TernClient} */
  #client;

  /**
   * @param {TernClient} client
   * @param {Frame} f a MSG frame with SEQ and FROM
   */
  constructor(client, f) {
    this.#client = client;
    /** @type {bigint} the delivery number (what an ACK names) */
    this.seq = /** @type {bigint} */ (f.seq);
    /** @type {string} the sender */
    this.from = /** @type {string} */ (f.from);
    /** @type {string|null} the group, for a group message */
    this.group = f.group ?? null;
    /** @type {bigint} the sender's message ID (0n = fire-and-forget) */
    this.id = f.id ?? 0n;
    /** @type {number} when the server accepted it, ms since the epoch */
    this.time = Number(f.time ?? 0n);
    /** @type {number} application message type */
    this.type = f.type ?? 0;
    /** @type {number} 0 (most urgent) … 15 */
    this.priority = f.priority ?? 0;
    /** @type {number} FLAGS as received */
    this.flags = f.flags ?? 0;
    /** @type {Uint8Array} the payload bytes */
    this.payload = f.payload ?? new Uint8Array(0);
  }

  /** Whether the server marked it as possibly delivered before. */
  get redelivery() {
    return (this.flags & Flags.REDELIVERY) !== 0;
  }

  /** Whether the sender asked for a READ status. */
  get wantsReadReceipt() {
    return (this.flags & Flags.READ_RECEIPT) !== 0;
  }

  /**
   * The payload as text (UTF-8; invalid bytes become U+FFFD, never an error).
   * @returns {string}
   */
  text() {
    return looseUtf8.decode(this.payload);
  }

  /**
   * The payload parsed as JSON, or `undefined` when it is not valid JSON.
   * @returns {any}
   */
  json() {
    try {
      return JSON.parse(this.text());
    } catch {
      return undefined;
    }
  }

  /** In `ackMode: 'manual'`: marks the message processed and ACKs it. Idempotent. */
  ack() {
    this.#client.ack(this);
  }

  /**
   * Sends READ for this message (see {@link TernClient#read}).
   * @returns {boolean}
   */
  read() {
    return this.#client.read(this);
  }
}

/**
 * Where processed SEQs are remembered (dedup). The default keeps the last
 * `dedupLimit` SEQs in memory for the client object's lifetime; pass your
 * own to persist them (e.g. in IndexedDB) across page loads.
 * @typedef {object} SeqStore
 * @property {(seq: bigint) => boolean} has
 * @property {(seq: bigint) => void} add
 */

/** An insertion-ordered set of SEQs that forgets the oldest beyond a limit. */
export class SeqSet {
  /** @param {number} [limit] */
  constructor(limit = 100000) {
    /** Most SEQs remembered. */
    this.limit = limit;
    /** @type {Set<bigint>} */
    this._set = new Set();
  }

  /** @param {bigint} seq */
  has(seq) {
    return this._set.has(seq);
  }

  /** @param {bigint} seq */
  add(seq) {
    this._set.delete(seq);
    this._set.add(seq);
    if (this._set.size > this.limit) this._set.delete(/** @type {bigint} */ (this._set.values().next().value));
  }

  /** Number of SEQs remembered. */
  get size() {
    return this._set.size;
  }
}

/**
 * @typedef {object} ReconnectOptions
 * @property {number} [initialDelay=500] ms before the first retry
 * @property {number} [maxDelay=30000] ms, the cap of the exponential backoff
 */

/**
 * @typedef {object} TernClientOptions
 * @property {string} url WebSocket URL, e.g. `wss://chat.example.com:7700/v1/ws`
 * @property {string} token the user token (sent in HELLO)
 * @property {string} [clientName='tern-js/1'] CLIENT field, for the server's logs
 * @property {number} [keepalive=30] KEEPALIVE proposed in HELLO, seconds
 * @property {'auto'|'manual'} [ackMode='auto'] `auto`: ACK a MSG once every
 *   `message` listener has returned (and its promise resolved); `manual`:
 *   when the application calls `msg.ack()`
 * @property {boolean|ReconnectOptions} [reconnect=true]
 * @property {number} [connectTimeout=15000] ms from opening the socket to WELCOME
 * @property {number} [maxIncomingFrame=16777216] largest frame body accepted from the server
 * @property {number} [overloadedRetries=10] resends after OVERLOADED before it is final
 * @property {SeqStore} [seqStore] where processed SEQs are remembered
 * @property {number} [dedupLimit=100000] SEQs the default store remembers
 * @property {number} [maxTrackedSends=10000] answered handles kept to receive later statuses
 * @property {any} [WebSocket] the WebSocket class (default: the global one)
 */

/**
 * @typedef {object} Welcome
 * @property {string} address the authenticated user's address
 * @property {number} time the server's clock, ms since the epoch
 * @property {number} maxFrame largest frame body the server accepts
 * @property {number} keepalive the keepalive in force, seconds
 */

/**
 * @typedef {'idle'|'connecting'|'online'|'offline'|'auth_failed'|'closed'} ConnectionState
 * @typedef {object} StateEvent
 * @property {ConnectionState} state
 * @property {ConnectionState} previous
 * @property {Error|null} error why the connection ended (offline, auth_failed, closed)
 * @property {number|null} retryIn ms until the next attempt (offline)
 */

/**
 * @typedef {object} SendOptions
 * @property {string} [to] destination user address (exactly one of `to`, `group`)
 * @property {string} [group] destination group name
 * @property {string|ArrayBuffer|ArrayBufferView} [payload] text (sent as UTF-8) or bytes
 * @property {bigint|number} [id] message ID; default a random non-zero u64;
 *   `0` = fire-and-forget (no statuses, not resent after a reconnect)
 * @property {number} [expiry] seconds the server may hold it; 0 = real time only;
 *   absent = the server's default
 * @property {number} [priority] 0 (most urgent) … 15
 * @property {number} [type] application message type (opaque to the server)
 * @property {number} [flags] FLAGS; absent = DELIVERY_RECEIPT | READ_RECEIPT
 */

/** ERRORs after which reconnecting would fail the same way (or fight another session). */
const NO_RETRY = new Set(['REPLACED', 'PROTOCOL_ERROR', 'UNSUPPORTED_VERSION', 'FRAME_TOO_LARGE']);
/** SEQ fields per ACK frame (10 bytes each). */
const ACKS_PER_FRAME = 4096;

/**
 * A random non-zero u64, from `crypto.getRandomValues` when available.
 * @returns {bigint}
 */
export function randomId() {
  for (;;) {
    let id;
    if (globalThis.crypto?.getRandomValues) {
      id = globalThis.crypto.getRandomValues(new BigUint64Array(1))[0];
    } else {
      const part = () => BigInt(Math.floor(Math.random() * 2 ** 32));
      id = (part() << 32n) | part();
    }
    if (id !== 0n) return id;
  }
}

/**
 * A full-jitter-ish exponential backoff: half the capped delay, plus a random
 * share of the other half.
 * @param {number} attempt 0 for the first retry
 * @param {number} initial
 * @param {number} max
 */
function backoff(attempt, initial, max) {
  const base = Math.min(max, initial * 2 ** Math.min(attempt, 30));
  return Math.round(base / 2 + (Math.random() * base) / 2);
}

/**
 * One WebSocket and what belongs to it. Events of a socket that is no longer
 * the client's current one are ignored.
 * @typedef {object} Conn
 * @property {any} ws
 * @property {boolean} welcomed WELCOME received: frames other than HELLO may go out
 * @property {boolean} dropped the socket is finished with
 * @property {Welcome|null} welcome
 * @property {number} lastSent ms of the last write (drives PING)
 * @property {number} lastRecv ms of the last message read (detects a dead link)
 * @property {ReturnType<typeof setTimeout>|null} connectTimer
 * @property {ReturnType<typeof setInterval>|null} keepaliveTimer
 */

/**
 * The tern client: one logical session that survives reconnects.
 *
 * Events (`client.on(type, fn)` returns an unsubscribe function):
 * - `state` ({@link StateEvent}), plus one event named after each state
 *   (`connecting`, `online`, `offline`, `auth_failed`, `closed`) with the
 *   same argument;
 * - `welcome` ({@link Welcome}) after each successful login;
 * - `message` ({@link TernMessage}): listeners may be async; in `auto` ack
 *   mode the ACK goes out after all of them resolved. A listener that
 *   throws leaves the message un-ACKed (the server delivers it again after
 *   the next reconnect) and reports the error on `error`;
 * - `status` ({@link StatusEvent}) for every STATUS, including ones about
 *   messages sent by an earlier page load (then `handle` is null);
 * - `error` (Error): protocol errors, ERROR frames, listener failures;
 * - `pong` (`{rtt}`) when a PONG echoes our PING's TIME.
 */
export class TernClient extends Emitter {
  /** @param {TernClientOptions} options */
  constructor(options) {
    super();
    if (!options || typeof options.url !== 'string') throw new TypeError('options.url is required');
    if (typeof options.token !== 'string') throw new TypeError('options.token is required');
    /** WebSocket URL; may be changed while not connected. */
    this.url = options.url;
    /** User token sent in HELLO; may be changed (e.g. after `auth_failed`). */
    this.token = options.token;
    const rc = options.reconnect ?? true;
    /** Normalised options. */
    this.options = {
      clientName: options.clientName ?? 'tern-js/1',
      keepalive: options.keepalive ?? 30,
      ackMode: options.ackMode ?? 'auto',
      reconnect: rc !== false,
      initialDelay: (typeof rc === 'object' && rc.initialDelay) || 500,
      maxDelay: (typeof rc === 'object' && rc.maxDelay) || 30000,
      connectTimeout: options.connectTimeout ?? 15000,
      maxIncomingFrame: options.maxIncomingFrame ?? 16 * 1024 * 1024,
      overloadedRetries: options.overloadedRetries ?? 10,
      maxTrackedSends: options.maxTrackedSends ?? 10000,
    };
    /** @type {any} */
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    /** @type {SeqStore} SEQs fully processed (ACKed) by this client object */
    this._seqs = options.seqStore ?? new SeqSet(options.dedupLimit ?? 100000);
    /** @type {Set<bigint>} SEQs handed to the application and not yet done */
    this._inProcess = new Set();
    /** Serialises deliveries so the application sees them in order. */
    this._chain = Promise.resolve();
    /** @type {ConnectionState} */
    this._state = 'idle';
    /** @type {Conn|null} the current socket */
    this._conn = null;
    /** Reconnect attempts since the last WELCOME (drives the backoff). */
    this._attempt = 0;
    /** Set by close(), AUTH_FAILED and final errors: no reconnecting. */
    this._stopped = true;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._retryTimer = null;
    /** @type {Map<bigint, SendHandle>} handles with ID ≠ 0, oldest first */
    this._handles = new Map();
    /** @type {SendHandle[]} fire-and-forget SENDs waiting for a connection */
    this._fireQueue = [];
    /** @type {Uint8Array[]} READ frames waiting for a connection */
    this._readQueue = [];
    /** @type {Set<string>} READs already sent (from, group, id) */
    this._readSent = new Set();
    /** @type {bigint[]} SEQs to ACK at the next flush */
    this._ackQueue = [];
    this._ackScheduled = false;
    /** @type {Array<{resolve: (w: Welcome) => void, reject: (e: Error) => void}>} */
    this._waiters = [];
    /** @type {Welcome|null} the last WELCOME */
    this.welcome = null;
    this._onBrowserOnline = () => {
      if (this._state === 'offline' && this._retryTimer) {
        clearTimeout(this._retryTimer);
        this._retryTimer = null;
        this._open();
      }
    };
  }

  /** @returns {ConnectionState} the connection state */
  get state() {
    return this._state;
  }

  /** @returns {string|null} this user's address, from the last WELCOME */
  get address() {
    return this.welcome?.address ?? null;
  }

  /** @returns {SendHandle[]} SENDs with no answer yet (queued, in flight or awaiting an OVERLOADED retry) */
  get pending() {
    const out = [...this._handles.values()].filter((h) => h._phase !== 'done');
    return out.concat(this._fireQueue);
  }

  /**
   * Opens the session (and keeps it open: reconnects follow automatically).
   * Resolves with the WELCOME once logged in; rejects with a
   * {@link TernServerError} on AUTH_FAILED and other final ERRORs, or a
   * {@link TernError} `CLOSED` if `close()` is called first. Network
   * failures do not reject: the client keeps retrying (watch `state`).
   * A rejection that nobody awaits is not reported as unhandled.
   * @returns {Promise<Welcome>}
   */
  connect() {
    if (this._state === 'online' && this.welcome) return Promise.resolve(this.welcome);
    /** @type {Promise<Welcome>} */
    const promise = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    // Not awaiting connect() is fine: the outcome is also in the `state` events.
    promise.catch(() => {});
    if (this._stopped) {
      this._stopped = false;
      this._attempt = 0;
      if (typeof globalThis.addEventListener === 'function') globalThis.addEventListener('online', this._onBrowserOnline);
      this._open();
    }
    return promise;
  }

  /**
   * Ends the session: BYE, then the socket is closed; no reconnect. Unanswered
   * SENDs stay pending and go out again if `connect()` is called later.
   */
  close() {
    this._stopped = true;
    if (this._retryTimer) clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onBrowserOnline);
    for (const h of this._handles.values()) {
      if (h._phase !== 'retry') continue;
      if (h._retryTimer) clearTimeout(h._retryTimer);
      h._retryTimer = null;
      h._phase = 'queued'; // goes out at the next login
    }
    const conn = this._conn;
    if (conn) {
      if (conn.welcomed) this._write(conn, [encodeFrame({ kind: Kind.BYE })]);
      this._drop(conn, new TernError('CLOSED', 'closed by the application'));
    } else if (this._state !== 'closed' && this._state !== 'idle') {
      this._setState('closed', null);
    }
    this._settleWaiters(new TernError('CLOSED', 'closed by the application'));
  }

  /**
   * Sends a message. Returns at once with a {@link SendHandle}; the SEND is
   * written now if online, else at the next login. Until answered, it is
   * written again (same ID, same bytes) after every reconnect.
   * Throws `TypeError`/`RangeError` for invalid options.
   * @param {SendOptions} opts
   * @returns {SendHandle}
   */
  send(opts) {
    const { to, group } = opts;
    if ((to == null) === (group == null)) throw new TypeError('send: give exactly one of `to` and `group`');
    if ((to != null && typeof to !== 'string') || (group != null && typeof group !== 'string')) {
      throw new TypeError('send: `to` and `group` must be strings');
    }
    let id;
    if (opts.id === undefined || opts.id === null) id = randomId();
    else if (typeof opts.id === 'bigint') id = opts.id;
    else if (Number.isSafeInteger(opts.id) && opts.id >= 0) id = BigInt(opts.id);
    else throw new TypeError('send: `id` must be a bigint or a non-negative safe integer');
    const bytes = encodeFrame({
      kind: Kind.SEND,
      id: id === 0n ? undefined : id,
      to, group,
      expiry: opts.expiry, type: opts.type, priority: opts.priority, flags: opts.flags,
      payload: opts.payload ?? undefined,
    });
    if (id !== 0n) {
      const existing = this._handles.get(id);
      if (existing && existing._phase !== 'done') return existing;
      this._handles.delete(id);
    }
    const handle = new SendHandle(id, to ?? null, group ?? null, bytes);
    if (id === 0n) this._fireQueue.push(handle);
    else {
      this._handles.set(id, handle);
      this._trimHandles();
    }
    const conn = this._conn;
    if (conn?.welcomed) this._flushSends(conn);
    return handle;
  }

  /**
   * Sends READ for a delivered message (FROM, ID, and GROUP for a group
   * message). Does nothing, and returns false, when the sender did not ask
   * for a read receipt, for ID 0, or when READ was already sent for it.
   * While offline the READ is queued for the next login.
   * @param {{from: string, id: bigint, group?: string|null, flags?: number}} msg
   * @returns {boolean} whether a READ was sent or queued
   */
  read(msg) {
    if (!msg || typeof msg.from !== 'string' || typeof msg.id !== 'bigint' || msg.id === 0n) return false;
    if (msg.flags !== undefined && (msg.flags & Flags.READ_RECEIPT) === 0) return false;
    const key = `${msg.from}\n${msg.group ?? ''}\n${msg.id}`;
    if (this._readSent.has(key)) return false;
    this._readSent.add(key);
    if (this._readSent.size > 100000) this._readSent.delete(/** @type {string} */ (this._readSent.values().next().value));
    const frame = encodeFrame({ kind: Kind.READ, from: msg.from, id: msg.id, group: msg.group ?? undefined });
    const conn = this._conn;
    if (conn?.welcomed) this._write(conn, [frame]);
    else if (this._readQueue.length < 10000) this._readQueue.push(frame);
    return true;
  }

  /**
   * In `ackMode: 'manual'`: marks a delivery processed and ACKs it (same as
   * `msg.ack()`). Accepts the message or its SEQ. Idempotent.
   * @param {TernMessage|bigint} msgOrSeq
   */
  ack(msgOrSeq) {
    const seq = typeof msgOrSeq === 'bigint' ? msgOrSeq : msgOrSeq.seq;
    this._inProcess.delete(seq);
    this._seqs.add(seq);
    this._queueAck(seq);
  }

  // --- connection life -----------------------------------------------------

  /**
   * @param {ConnectionState} state
   * @param {Error|null} error
   * @param {number|null} [retryIn]
   */
  _setState(state, error, retryIn = null) {
    const previous = this._state;
    this._state = state;
    const ev = { state, previous, error, retryIn };
    this._emit('state', ev);
    this._emit(state, ev);
  }

  /** @param {Error} [error] rejects the connect() promises, or resolves them with the WELCOME */
  _settleWaiters(error) {
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) {
      if (error) w.reject(error);
      else w.resolve(/** @type {Welcome} */ (this.welcome));
    }
  }

  /** Opens a new socket and sends HELLO when it is open. */
  _open() {
    if (this._stopped) return;
    this._setState('connecting', null);
    if (this._stopped) return; // a listener closed the client
    /** @type {Conn} */
    const conn = {
      ws: null, welcomed: false, dropped: false, welcome: null, lastSent: 0, lastRecv: Date.now(),
      connectTimer: null, keepaliveTimer: null,
    };
    this._conn = conn;
    conn.connectTimer = setTimeout(
      () => this._drop(conn, new TernError('TIMEOUT', `no WELCOME within ${this.options.connectTimeout} ms`)),
      this.options.connectTimeout,
    );
    try {
      if (typeof this._WebSocket !== 'function') throw new Error('no WebSocket implementation available');
      conn.ws = new this._WebSocket(this.url, SUBPROTOCOL);
    } catch (e) {
      this._drop(conn, new TernError('BAD_URL', `cannot open ${this.url}: ${errText(e)}`, { cause: e }));
      return;
    }
    const ws = conn.ws;
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => this._onOpen(conn);
    ws.onmessage = (/** @type {{data: unknown}} */ ev) => this._onMessage(conn, ev.data);
    // Browsers follow an error with a close event; some implementations (Node's
    // undici, on a refused connection) do not, so either one ends the socket.
    ws.onerror = () => this._drop(conn, new TernError('DISCONNECTED', `WebSocket error on ${this.url}`));
    ws.onclose = (/** @type {{code?: number, reason?: string}} */ ev) =>
      this._drop(conn, new TernError('DISCONNECTED',
        `connection closed (code ${ev?.code ?? '?'}${ev?.reason ? `: ${ev.reason}` : ''})`));
  }

  /** @param {Conn} conn */
  _onOpen(conn) {
    if (conn.dropped) return;
    this._write(conn, [encodeFrame({
      kind: Kind.HELLO,
      version: PROTOCOL_VERSION,
      token: this.token,
      client: this.options.clientName,
      keepalive: this.options.keepalive,
    })]);
  }

  /**
   * One WebSocket message: one or more complete frames.
   * @param {Conn} conn
   * @param {unknown} data
   */
  _onMessage(conn, data) {
    if (conn.dropped) return;
    conn.lastRecv = Date.now();
    let frames;
    try {
      if (typeof data === 'string') throw new TernProtocolError('TEXT_MESSAGE', 'the server sent a text WebSocket message');
      if (!(data instanceof ArrayBuffer) && !ArrayBuffer.isView(data)) {
        throw new TernProtocolError('BAD_FRAME', 'unsupported WebSocket message data (binaryType must be arraybuffer)');
      }
      frames = decodeFrames(toBytes(/** @type {ArrayBuffer} */ (data)), { maxFrame: this.options.maxIncomingFrame });
    } catch (e) {
      this._fail(conn, e);
      return;
    }
    for (const frame of frames) {
      if (conn.dropped) return;
      try {
        this._onFrame(conn, frame);
      } catch (e) {
        this._fail(conn, e);
      }
    }
  }

  /**
   * A local protocol failure: report it, drop the socket (reconnect follows).
   * @param {Conn} conn
   * @param {unknown} e
   */
  _fail(conn, e) {
    const err = e instanceof TernError ? e : new TernProtocolError('BAD_FRAME', errText(e));
    this._emit('error', err);
    this._drop(conn, err);
  }

  /**
   * @param {Conn} conn
   * @param {Frame} f
   */
  _onFrame(conn, f) {
    if (f.kind === Kind.ERROR) {
      const err = new TernServerError(f.code ?? 0, f.reason ?? '');
      this._emit('error', err);
      this._drop(conn, err);
      return;
    }
    if (!conn.welcomed) {
      if (f.kind !== Kind.WELCOME) throw new TernProtocolError('UNEXPECTED_FRAME', `${kindName(f.kind)} before WELCOME`);
      this._onWelcome(conn, f);
      return;
    }
    switch (f.kind) {
      case Kind.MSG: return this._onMsg(f);
      case Kind.STATUS: return this._onStatus(f);
      case Kind.PONG:
        if (f.time !== undefined) this._emit('pong', { rtt: Date.now() - Number(f.time) });
        return;
      default:
        throw new TernProtocolError('UNEXPECTED_FRAME', `unexpected ${kindName(f.kind)} from the server`);
    }
  }

  /**
   * @param {Conn} conn
   * @param {Frame} f
   */
  _onWelcome(conn, f) {
    if (f.version !== undefined && f.version !== PROTOCOL_VERSION) {
      throw new TernProtocolError('BAD_FRAME', `server speaks protocol version ${f.version}`);
    }
    if (conn.connectTimer) clearTimeout(conn.connectTimer);
    conn.connectTimer = null;
    /** @type {Welcome} */
    const welcome = {
      address: f.address ?? '',
      time: Number(f.time ?? 0n),
      maxFrame: f.maxFrame || DEFAULT_MAX_FRAME,
      keepalive: f.keepalive || this.options.keepalive || 60,
    };
    conn.welcomed = true;
    conn.welcome = welcome;
    this.welcome = welcome;
    this._attempt = 0;
    this._startKeepalive(conn);
    // Resends first, in their original order, before anything new.
    this._flushSends(conn);
    if (this._readQueue.length) {
      const reads = this._readQueue;
      this._readQueue = [];
      this._write(conn, reads);
    }
    if (conn.dropped) return;
    this._setState('online', null);
    this._emit('welcome', welcome);
    this._settleWaiters();
  }

  /** @param {Conn} conn */
  _startKeepalive(conn) {
    const period = (conn.welcome?.keepalive ?? 60) * 1000;
    conn.keepaliveTimer = setInterval(() => {
      if (conn.dropped) return;
      const now = Date.now();
      if (now - conn.lastRecv > 2 * period) {
        this._drop(conn, new TernError('TIMEOUT', 'no answer from the server (keepalive)'));
      } else if (now - conn.lastSent >= period / 2) {
        this._write(conn, [encodeFrame({ kind: Kind.PING, time: BigInt(now) })]);
      }
    }, Math.max(250, period / 4));
  }

  /**
   * Ends a socket: timers, close, and then reconnect or a final state.
   * @param {Conn} conn
   * @param {Error} error
   */
  _drop(conn, error) {
    if (conn.dropped) return;
    conn.dropped = true;
    if (conn.connectTimer) clearTimeout(conn.connectTimer);
    if (conn.keepaliveTimer) clearInterval(conn.keepaliveTimer);
    const ws = conn.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        if (ws.readyState === undefined || ws.readyState < 2) ws.close(1000);
      } catch {
        // already closing
      }
    }
    if (this._conn !== conn) return;
    this._conn = null;
    for (const h of this._handles.values()) if (h._phase === 'inflight') h._phase = 'queued';
    this._ackQueue = []; // redeliveries are deduped and ACKed again
    const code = error instanceof TernServerError ? error.code : null;
    if (this._stopped) {
      this._setState('closed', error);
    } else if (code === 'AUTH_FAILED') {
      this._stopped = true;
      this._setState('auth_failed', error);
      this._settleWaiters(error);
    } else if ((code && NO_RETRY.has(code)) || (error instanceof TernError && error.code === 'BAD_URL') || !this.options.reconnect) {
      this._stopped = true;
      this._setState('closed', error);
      this._settleWaiters(error);
    } else {
      const delay = backoff(this._attempt++, this.options.initialDelay, this.options.maxDelay);
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        this._open();
      }, delay);
      this._setState('offline', error, delay);
    }
  }

  /**
   * Writes frames, packed into as few WebSocket messages as fit in the
   * server's max_frame; each message holds complete frames only.
   * @param {Conn} conn
   * @param {Uint8Array[]} frames
   * @returns {boolean} false if the socket failed
   */
  _write(conn, frames) {
    if (conn.dropped || !frames.length) return !conn.dropped;
    const limit = conn.welcome?.maxFrame ?? DEFAULT_MAX_FRAME;
    /** @type {Uint8Array[]} */
    let batch = [];
    let size = 0;
    const flush = () => {
      if (!batch.length) return;
      let msg = batch[0];
      if (batch.length > 1) {
        msg = new Uint8Array(size);
        let at = 0;
        for (const f of batch) {
          msg.set(f, at);
          at += f.length;
        }
      }
      conn.ws.send(msg);
      batch = [];
      size = 0;
    };
    try {
      for (const f of frames) {
        if (size && size + f.length > limit) flush();
        batch.push(f);
        size += f.length;
      }
      flush();
      conn.lastSent = Date.now();
      return true;
    } catch (e) {
      this._drop(conn, new TernError('DISCONNECTED', `write failed: ${errText(e)}`, { cause: e }));
      return false;
    }
  }

  // --- sending ---------------------------------------------------------------

  /**
   * Writes every queued SEND (oldest first) and the fire-and-forget queue.
   * @param {Conn} conn
   */
  _flushSends(conn) {
    const maxBody = conn.welcome?.maxFrame ?? DEFAULT_MAX_FRAME;
    /** @type {SendHandle[]} */
    const written = [];
    for (const h of this._handles.values()) {
      if (h._phase !== 'queued') continue;
      if (h._bytes.length - HEADER_LEN > maxBody) {
        // The server would close the connection for it: fail it here.
        h._phase = 'done';
        h._set('TOO_LARGE');
        continue;
      }
      written.push(h);
    }
    const fire = this._fireQueue.filter((h) => {
      if (h._bytes.length - HEADER_LEN <= maxBody) return true;
      h._set('TOO_LARGE');
      return false;
    });
    this._fireQueue = [];
    if (!written.length && !fire.length) return;
    if (!this._write(conn, [...written, ...fire].map((h) => h._bytes))) {
      this._fireQueue = fire.concat(this._fireQueue); // never written: keep them
      return;
    }
    for (const h of written) {
      h._phase = 'inflight';
      h.attempts++;
      if (h.status === 'OVERLOADED') h._set('sending');
    }
    for (const h of fire) {
      h._phase = 'done';
      h.attempts++;
      h._set('written');
    }
  }

  /** Forgets the oldest answered handles beyond `maxTrackedSends`. */
  _trimHandles() {
    let excess = this._handles.size - this.options.maxTrackedSends;
    if (excess <= 0) return;
    for (const [id, h] of this._handles) {
      if (excess <= 0) break;
      if (h._phase === 'done') {
        this._handles.delete(id);
        excess--;
      }
    }
  }

  /**
   * Applies a STATUS to the handle it is about.
   * @param {SendHandle} h
   * @param {StatusEvent} ev
   */
  _applyStatus(h, ev) {
    const s = ev.status;
    if (ev.time !== null) h.time = ev.time;
    if (!isProgress(s) && ev.code < 64) return; // a progress code this version does not know
    if (ev.member !== null) {
      // A group member's receipt or failure: the overall status only moves forward.
      const prev = h.members.get(ev.member);
      if (prev === undefined || (isProgress(prev) && (!isProgress(s) || (PROGRESS.get(s) ?? 0) > (PROGRESS.get(prev) ?? 0)))) {
        h.members.set(ev.member, s);
      }
      if (h._phase !== 'retry') h._phase = 'done';
      const overall = isProgress(s) && !h.error && (PROGRESS.get(s) ?? 0) > (PROGRESS.get(h.status) ?? 0) ? s : h.status;
      h._set(overall, ev.member, h.members.get(ev.member) ?? s);
      return;
    }
    if (s === 'OVERLOADED' && ev.seq === null) {
      if (h._phase === 'done') return; // a late answer to an earlier attempt
      if (h._overloaded < this.options.overloadedRetries) {
        h._phase = 'retry';
        const delay = backoff(h._overloaded++, this.options.initialDelay, this.options.maxDelay);
        if (h._retryTimer) clearTimeout(h._retryTimer);
        h._retryTimer = setTimeout(() => {
          h._retryTimer = null;
          if (h._phase !== 'retry') return;
          h._phase = 'queued';
          const conn = this._conn;
          if (conn?.welcomed) this._flushSends(conn);
        }, delay);
        h._set('OVERLOADED');
      } else {
        h._phase = 'done';
        h._set('OVERLOADED');
      }
      return;
    }
    if (h._retryTimer) clearTimeout(h._retryTimer);
    h._retryTimer = null;
    h._phase = 'done';
    if (h.error) return; // already failed for good
    if (isProgress(s)) {
      if ((PROGRESS.get(s) ?? 0) > (PROGRESS.get(h.status) ?? 0)) h._set(s);
    } else {
      h._set(s);
    }
  }

  // --- receiving -------------------------------------------------------------

  /**
   * Runs a delivery (MSG or stored STATUS) through dedup and the in-order
   * chain. `run` resolves to `ack` (done: remember and ACK), `hold` (manual
   * ack mode: wait for ack()) or `skip` (not processed: forget it).
   * @param {bigint} seq
   * @param {() => Promise<'ack'|'hold'|'skip'>} run
   */
  _deliver(seq, run) {
    if (this._seqs.has(seq)) {
      this._queueAck(seq); // processed before: ACK again, do not re-emit
      return;
    }
    if (this._inProcess.has(seq)) return; // already handed to the application
    this._inProcess.add(seq);
    this._chain = this._chain.then(async () => {
      let outcome;
      try {
        outcome = await run();
      } catch (e) {
        this._inProcess.delete(seq);
        this._emit('error', new TernError('HANDLER_FAILED', `a listener failed on delivery ${seq}: ${errText(e)}`, { cause: e }));
        return;
      }
      if (outcome === 'ack') this.ack(seq);
      else if (outcome === 'skip') this._inProcess.delete(seq);
    });
  }

  /** @param {Frame} f */
  _onMsg(f) {
    if (f.seq === undefined || f.from === undefined) {
      this._emit('error', new TernProtocolError('BAD_FRAME', 'MSG without SEQ or FROM ignored'));
      return;
    }
    const msg = new TernMessage(this, f);
    this._deliver(msg.seq, async () => {
      if (!this._count('message')) {
        this._emit('error', new TernError('NO_LISTENER', `MSG ${msg.seq} left un-ACKed: no "message" listener`));
        return 'skip';
      }
      await this._emitAsync('message', msg);
      return this.options.ackMode === 'manual' ? 'hold' : 'ack';
    });
  }

  /** @param {Frame} f */
  _onStatus(f) {
    if (f.id === undefined || f.status === undefined) {
      this._emit('error', new TernProtocolError('BAD_FRAME', 'STATUS without ID or STATUS ignored'));
      if (f.seq !== undefined) this._deliver(f.seq, async () => 'ack');
      return;
    }
    const handle = this._handles.get(f.id) ?? null;
    /** @type {StatusEvent} */
    const ev = {
      id: f.id,
      status: sendStatusOf(f.status),
      name: statusName(f.status),
      code: f.status,
      to: f.to ?? null,
      group: f.group ?? null,
      member: f.member ?? null,
      time: f.time === undefined ? null : Number(f.time),
      seq: f.seq ?? null,
      handle,
    };
    if (ev.seq === null) {
      if (handle) this._applyStatus(handle, ev);
      this._emit('status', ev);
      return;
    }
    this._deliver(ev.seq, async () => {
      if (handle) this._applyStatus(handle, ev);
      await this._emitAsync('status', ev);
      return 'ack';
    });
  }

  /** @param {bigint} seq */
  _queueAck(seq) {
    this._ackQueue.push(seq);
    if (this._ackScheduled) return;
    this._ackScheduled = true;
    setTimeout(() => {
      this._ackScheduled = false;
      const seqs = this._ackQueue;
      this._ackQueue = [];
      const conn = this._conn;
      if (!conn?.welcomed || !seqs.length) return; // offline: the server redelivers; dedup ACKs again
      const frames = [];
      for (let i = 0; i < seqs.length; i += ACKS_PER_FRAME) {
        frames.push(encodeFrame({ kind: Kind.ACK, seqs: seqs.slice(i, i + ACKS_PER_FRAME) }));
      }
      this._write(conn, frames);
    }, 0);
  }
}

/** @param {unknown} e */
function errText(e) {
  return e instanceof Error ? e.message : String(e);
}
