// Type declarations for tern.js, the JavaScript client of tern's protocol v1.
// u64 fields (ID, SEQ, TIME) are `bigint` in frames; the client turns TIME
// into a `number` of milliseconds and keeps ID and SEQ as `bigint`.

// ---------------------------------------------------------------- codec --

/** Protocol version spoken by this library (1). */
export const PROTOCOL_VERSION: 1;
/** WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL: 'tern.v1';
/** Bytes in a frame header: kind (1) and body length (4). */
export const HEADER_LEN: 5;
/** The largest value a 4-byte varint carries (2^28 - 1). */
export const VARINT_MAX: number;
/** The server's default `max_frame` (1 MiB), used until WELCOME says otherwise. */
export const DEFAULT_MAX_FRAME: number;

/** Frame kinds. */
export const Kind: Readonly<{
  HELLO: 0x01; SEND: 0x02; ACK: 0x03; READ: 0x04; PING: 0x05; BYE: 0x06;
  WELCOME: 0x81; STATUS: 0x82; MSG: 0x83; ERROR: 0x84; PONG: 0x85;
}>;

/** Field tags. */
export const Tag: Readonly<{
  ID: 0x01; TO: 0x02; GROUP: 0x03; FROM: 0x04; EXPIRY: 0x05; TYPE: 0x06;
  PRIORITY: 0x07; FLAGS: 0x08; PAYLOAD: 0x09; SEQ: 0x0a; TIME: 0x0b;
  STATUS: 0x0c; TOKEN: 0x0d; VERSION: 0x0e; CODE: 0x0f; REASON: 0x10;
  MAX_FRAME: 0x11; MEMBER: 0x12; CLIENT: 0x13; KEEPALIVE: 0x14; ADDRESS: 0x15;
}>;

/** STATUS codes. */
export const StatusCode: Readonly<{
  SENT: 1; DELIVERED: 2; READ: 3;
  INVALID_DEST: 64; EXPIRED: 65; OFFLINE: 66; TOO_LARGE: 67; NOT_MEMBER: 68;
  BAD_REQUEST: 69; OVERLOADED: 70; DELETED: 71;
}>;

/** ERROR codes. */
export const ErrorCode: Readonly<{
  PROTOCOL_ERROR: 1; AUTH_FAILED: 2; FRAME_TOO_LARGE: 3; NOT_AUTHENTICATED: 4;
  IDLE_TIMEOUT: 5; SHUTDOWN: 6; REPLACED: 7; UNSUPPORTED_VERSION: 8;
}>;

/** FLAGS bits. */
export const Flags: Readonly<{
  DELIVERY_RECEIPT: 0x001; READ_RECEIPT: 0x002; REDELIVERY: 0x100; SEND_DEFAULT: 0x003;
}>;

/** The name of a frame kind, or `UNKNOWN_0x..`. */
export function kindName(kind: number): string;
/** The table name of a STATUS code, or `STATUS_<n>`. */
export function statusName(code: number): string;
/** The table name of an ERROR code, or `ERROR_<n>`. */
export function errorName(code: number): string;

/**
 * A decoded frame: `kind` plus the fields present. An ACK has `seqs`
 * (every SEQ field, in order) instead of `seq`.
 */
export interface Frame {
  kind: number;
  id?: bigint;
  to?: string;
  group?: string;
  from?: string;
  expiry?: number;
  type?: number;
  priority?: number;
  flags?: number;
  payload?: Uint8Array;
  seq?: bigint;
  seqs?: bigint[];
  time?: bigint;
  status?: number;
  token?: string;
  version?: number;
  code?: number;
  reason?: string;
  maxFrame?: number;
  member?: string;
  client?: string;
  keepalive?: number;
  address?: string;
}

/** Input of encodeFrame: integers as number or bigint, PAYLOAD as bytes or a string (UTF-8). */
export interface FrameInput {
  kind: number;
  seqs?: Iterable<bigint | number>;
  payload?: string | ArrayBuffer | ArrayBufferView | null;
  [field: string]: unknown;
}

/** Base class of this library's errors; `code` is a stable machine-readable name. */
export class TernError extends Error {
  constructor(code: string, message: string, options?: { cause?: unknown });
  code: string;
}

/**
 * Malformed bytes. `code`: UNKNOWN_KIND, FRAME_TOO_LARGE, TRUNCATED,
 * VARINT_TOO_LONG, VARINT_NOT_MINIMAL, BAD_WIDTH, BAD_UTF8, PARTIAL_FRAME,
 * TEXT_MESSAGE, UNEXPECTED_FRAME or BAD_FRAME.
 */
export class TernProtocolError extends TernError {
  constructor(code: string, message: string, offset?: number);
  /** The message without the offset. */
  detail: string;
  /** Byte offset of the problem in the decoded buffer, when known. */
  offset: number | undefined;
}

/** An ERROR frame from the server; `code` is its name (AUTH_FAILED, REPLACED, …). */
export class TernServerError extends TernError {
  constructor(errorCode: number, reason: string);
  errorCode: number;
  reason: string;
}

/** A send that ended in a failure status; `code` is the status name (INVALID_DEST, …). */
export class TernSendError extends TernError {
  constructor(status: string, handle: SendHandle);
  handle: SendHandle;
}

/** Bytes of a string (UTF-8) or a view of an ArrayBuffer / ArrayBufferView. */
export function toBytes(value: string | ArrayBuffer | ArrayBufferView): Uint8Array;

/** Encodes one frame; throws TypeError/RangeError for values that cannot be encoded. */
export function encodeFrame(frame: FrameInput): Uint8Array;

/**
 * Reads the header at `offset` only. Returns the whole frame's length when
 * complete, else minus the bytes missing. Throws TernProtocolError
 * UNKNOWN_KIND or FRAME_TOO_LARGE.
 */
export function frameLength(buf: Uint8Array, maxFrame?: number, offset?: number): number;

/** Decodes one body; throws TernProtocolError for malformed input. */
export function decodeBody(kind: number, body: Uint8Array): Frame;

/** Decodes a buffer of complete frames (one WebSocket message). */
export function decodeFrames(bytes: Uint8Array, options?: { maxFrame?: number }): Frame[];

/** A byte stream in chunks cut into frames; broken for good after an error. */
export class FrameDecoder {
  constructor(options?: { maxFrame?: number });
  maxFrame: number;
  /** Bytes of an incomplete frame held for the next push. */
  readonly buffered: number;
  /** Feeds a chunk; returns the frames it completes. Throws TernProtocolError. */
  push(chunk: Uint8Array): Frame[];
}

// --------------------------------------------------------------- client --

/**
 * `sending`, `written` (fire-and-forget), `sent`, `delivered`, `read`, or a
 * failure: INVALID_DEST, EXPIRED, OFFLINE, TOO_LARGE, NOT_MEMBER,
 * BAD_REQUEST, OVERLOADED, DELETED, STATUS_<n>.
 */
export type SendStatus =
  | 'sending' | 'written' | 'sent' | 'delivered' | 'read'
  | 'INVALID_DEST' | 'EXPIRED' | 'OFFLINE' | 'TOO_LARGE' | 'NOT_MEMBER'
  | 'BAD_REQUEST' | 'OVERLOADED' | 'DELETED' | (string & {});

export type ConnectionState = 'idle' | 'connecting' | 'online' | 'offline' | 'auth_failed' | 'closed';

export interface Welcome {
  /** The authenticated user's address. */
  address: string;
  /** Server clock, ms since the epoch. */
  time: number;
  /** Largest frame body the server accepts. */
  maxFrame: number;
  /** Keepalive in force, seconds. */
  keepalive: number;
}

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** Why the connection ended (offline, auth_failed, closed). */
  error: Error | null;
  /** ms until the next attempt (offline). */
  retryIn: number | null;
}

export interface StatusEvent {
  id: bigint;
  status: SendStatus;
  /** Table name: SENT, DELIVERED, … */
  name: string;
  code: number;
  to: string | null;
  group: string | null;
  member: string | null;
  time: number | null;
  /** Present on stored statuses (ACKed by the client). */
  seq: bigint | null;
  /** The handle, when this client object sent the message. */
  handle: SendHandle | null;
}

export interface HandleStatusEvent {
  handle: SendHandle;
  status: SendStatus;
  previous: SendStatus;
  member: string | null;
  memberStatus: SendStatus | null;
}

export interface SendOptions {
  to?: string;
  group?: string;
  payload?: string | ArrayBuffer | ArrayBufferView;
  /** Default: a random non-zero u64. 0 = fire-and-forget. */
  id?: bigint | number;
  expiry?: number;
  priority?: number;
  type?: number;
  /** Absent = DELIVERY_RECEIPT | READ_RECEIPT. */
  flags?: number;
}

export interface ReconnectOptions {
  /** ms before the first retry (default 500). */
  initialDelay?: number;
  /** Cap of the exponential backoff, ms (default 30000). */
  maxDelay?: number;
}

/** Where processed SEQs are remembered. */
export interface SeqStore {
  has(seq: bigint): boolean;
  add(seq: bigint): void;
}

export interface TernClientOptions {
  /** e.g. `wss://chat.example.com:7700/v1/ws` */
  url: string;
  token: string;
  /** CLIENT field (default `tern-js/1`). */
  clientName?: string;
  /** KEEPALIVE proposed in HELLO, seconds (default 30). */
  keepalive?: number;
  /** Default `auto`. */
  ackMode?: 'auto' | 'manual';
  /** Default true. */
  reconnect?: boolean | ReconnectOptions;
  /** ms from opening the socket to WELCOME (default 15000). */
  connectTimeout?: number;
  /** Largest frame body accepted from the server (default 16 MiB). */
  maxIncomingFrame?: number;
  /** Resends after OVERLOADED before it is final (default 10). */
  overloadedRetries?: number;
  seqStore?: SeqStore;
  /** SEQs the default store remembers (default 100000). */
  dedupLimit?: number;
  /** Answered handles kept to receive later statuses (default 10000). */
  maxTrackedSends?: number;
  /** WebSocket class (default: the global one). */
  WebSocket?: unknown;
}

/** An insertion-ordered set of SEQs that forgets the oldest beyond `limit`. */
export class SeqSet implements SeqStore {
  constructor(limit?: number);
  limit: number;
  readonly size: number;
  has(seq: bigint): boolean;
  add(seq: bigint): void;
}

/** The life of one sent message. */
export class SendHandle {
  readonly id: bigint;
  readonly to: string | null;
  readonly group: string | null;
  status: SendStatus;
  /** Set when the status is a final failure. */
  error: TernSendError | null;
  /** Server time of the last status, ms since the epoch. */
  time: number | null;
  /** Per-member statuses of a group message. */
  members: Map<string, SendStatus>;
  /** Times the SEND was written to a connection. */
  attempts: number;
  /** Resolves once accepted (sent / written); rejects with TernSendError on a failure first. */
  readonly sent: Promise<SendHandle>;
  /** read, written, or a final failure. */
  readonly final: boolean;
  on(type: 'status', fn: (ev: HandleStatusEvent) => void): () => void;
  off(type: 'status', fn: (ev: HandleStatusEvent) => void): void;
  once(type: 'status', fn: (ev: HandleStatusEvent) => void): () => void;
}

/** A message delivered to this user. */
export class TernMessage {
  readonly seq: bigint;
  readonly from: string;
  readonly group: string | null;
  readonly id: bigint;
  /** ms since the epoch, when the server accepted it. */
  readonly time: number;
  readonly type: number;
  readonly priority: number;
  readonly flags: number;
  readonly payload: Uint8Array;
  readonly redelivery: boolean;
  readonly wantsReadReceipt: boolean;
  /** UTF-8 text; invalid bytes become U+FFFD. */
  text(): string;
  /** Parsed JSON, or undefined when the payload is not JSON. */
  json(): any;
  /** Manual ack mode: mark processed and ACK. */
  ack(): void;
  /** Send READ (see TernClient.read). */
  read(): boolean;
}

export interface TernClientEvents {
  state: StateEvent;
  connecting: StateEvent;
  online: StateEvent;
  offline: StateEvent;
  auth_failed: StateEvent;
  closed: StateEvent;
  welcome: Welcome;
  message: TernMessage;
  status: StatusEvent;
  error: Error;
  pong: { rtt: number };
}

/** The tern client: one logical session that survives reconnects. */
export class TernClient {
  constructor(options: TernClientOptions);
  url: string;
  token: string;
  readonly options: Required<Omit<TernClientOptions, 'url' | 'token' | 'reconnect' | 'seqStore' | 'dedupLimit' | 'WebSocket'>> & {
    reconnect: boolean; initialDelay: number; maxDelay: number;
  };
  readonly state: ConnectionState;
  readonly address: string | null;
  readonly welcome: Welcome | null;
  /** SENDs with no answer yet. */
  readonly pending: SendHandle[];
  /** Resolves at the first WELCOME; rejects on AUTH_FAILED, a final ERROR, or close(). */
  connect(): Promise<Welcome>;
  /** BYE, close, no reconnect. */
  close(): void;
  send(opts: SendOptions): SendHandle;
  read(msg: { from: string; id: bigint; group?: string | null; flags?: number }): boolean;
  ack(msgOrSeq: TernMessage | bigint): void;
  /** Message and status listeners may return a promise: the ACK waits for it. */
  on<K extends keyof TernClientEvents>(type: K, fn: (ev: TernClientEvents[K]) => void | Promise<void>): () => void;
  off<K extends keyof TernClientEvents>(type: K, fn: (ev: TernClientEvents[K]) => void | Promise<void>): void;
  once<K extends keyof TernClientEvents>(type: K, fn: (ev: TernClientEvents[K]) => void | Promise<void>): () => void;
}

/** A random non-zero u64. */
export function randomId(): bigint;
