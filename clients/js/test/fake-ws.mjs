// A fake WebSocket for the client tests: records what the client sends and
// lets a test play the server. No test runs from this file.
import { encodeFrame, decodeFrames, Kind } from '../tern.js';

/** Stands in for the browser's WebSocket class (the parts TernClient uses). */
export class FakeWebSocket {
  /** Every socket created since the last reset, oldest first. */
  static instances = [];

  static reset() {
    FakeWebSocket.instances = [];
  }

  /** The most recently created socket. */
  static get last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url, protocol) {
    this.url = url;
    this.requestedProtocol = protocol;
    this.protocol = '';
    this.readyState = 0;
    this.binaryType = 'blob';
    /** Each message the client sent, as bytes. */
    this.messages = [];
    this.closeCode = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
    this.messages.push(bytes.slice());
  }

  close(code) {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    this.closeCode = code ?? 1005;
    queueMicrotask(() => this.onclose?.({ code: this.closeCode, reason: '' }));
  }

  // --- the server's side ---

  /** Completes the handshake. */
  accept() {
    this.readyState = 1;
    this.protocol = this.requestedProtocol;
    this.onopen?.({});
  }

  /** Sends frames (objects for encodeFrame) in one binary message. */
  deliver(...frames) {
    const parts = frames.map(encodeFrame);
    const msg = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      msg.set(p, at);
      at += p.length;
    }
    this.deliverRaw(msg);
  }

  /** Sends one raw message (bytes as ArrayBuffer, or a string for a text message). */
  deliverRaw(data) {
    if (this.readyState !== 1) throw new Error('fake: socket not open');
    this.onmessage?.({ data: typeof data === 'string' ? data : data.slice().buffer });
  }

  /** The server side goes away (network failure). */
  drop(code = 1006) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason: '' });
  }

  /** An error event without a close event (what Node's undici does on a refused connection). */
  error() {
    this.readyState = 3;
    this.onerror?.({ type: 'error' });
  }

  /** Every frame the client sent, decoded; each message must hold complete frames only. */
  get frames() {
    return this.messages.flatMap((m) => decodeFrames(m));
  }

  /** The frames of one kind the client sent. */
  sent(kind) {
    return this.frames.filter((f) => f.kind === kind);
  }

  /** All SEQs the client ACKed on this socket, in order. */
  get acked() {
    return this.sent(Kind.ACK).flatMap((f) => f.seqs);
  }
}

/** Resolves once `predicate()` is truthy; fails after `ms`. */
export async function waitFor(predicate, ms = 2000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = predicate();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Lets queued timers and microtasks run. */
export const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));
