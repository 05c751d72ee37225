// TernClient tests over a fake WebSocket: login, statuses, resend under the
// same ID after a reconnect, SEQ dedup, ACK/READ, keepalive, errors.
// Run: node --test clients/js/test/
import { test, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  TernClient, Kind, StatusCode, ErrorCode, Flags, TernServerError, TernSendError, SUBPROTOCOL,
} from '../tern.js';
import { FakeWebSocket, waitFor, tick } from './fake-ws.mjs';

const WELCOME = { kind: Kind.WELCOME, version: 1, address: 'alice', time: 1700000000000n, maxFrame: 1 << 20, keepalive: 60 };
const utf8 = (s) => new TextEncoder().encode(s);

/** A client on the fake socket with fast reconnects; errors are collected, not logged. */
function makeClient(options = {}) {
  const client = new TernClient({
    url: 'ws://tern.test:7700/v1/ws', token: 'tok-a', WebSocket: FakeWebSocket,
    reconnect: { initialDelay: 5, maxDelay: 20 }, ...options,
  });
  client.errors = [];
  client.on('error', (e) => client.errors.push(e));
  return client;
}

/** Plays the server's side of a login on a new socket; returns that socket. */
async function login(client, welcome = WELCOME) {
  const before = FakeWebSocket.instances.length;
  const ready = client.connect();
  const ws = await waitFor(() => FakeWebSocket.instances[before], 2000, 'a socket');
  ws.accept();
  await waitFor(() => ws.sent(Kind.HELLO).length, 2000, 'HELLO');
  ws.deliver(welcome);
  await ready;
  return ws;
}

/** After a drop: waits for the next socket and logs it in. */
async function relogin(client, welcome = WELCOME) {
  const count = FakeWebSocket.instances.length;
  const ws = await waitFor(() => FakeWebSocket.instances[count], 2000, 'a reconnect');
  ws.accept();
  ws.deliver(welcome);
  await waitFor(() => client.state === 'online', 2000, 'online');
  return ws;
}

const status = (id, code, extra = {}) => ({ kind: Kind.STATUS, id, to: 'bob', status: code, time: 1700000000500n, ...extra });
const msg = (seq, extra = {}) => ({
  kind: Kind.MSG, seq, from: 'bob', id: 100n + seq, time: 1700000000000n, type: 0, priority: 0, flags: 3, payload: utf8(`m${seq}`), ...extra,
});

beforeEach(() => FakeWebSocket.reset());

test('connect: HELLO with VERSION, TOKEN, CLIENT, KEEPALIVE, then online with the WELCOME', async () => {
  const client = makeClient({ clientName: 'test/1', keepalive: 20 });
  const states = [];
  client.on('state', (ev) => states.push(ev.state));
  const ws = await login(client);
  assert.equal(ws.url, 'ws://tern.test:7700/v1/ws');
  assert.equal(ws.requestedProtocol, SUBPROTOCOL);
  assert.equal(ws.binaryType, 'arraybuffer');
  assert.deepEqual(ws.frames, [{ kind: Kind.HELLO, version: 1, token: 'tok-a', client: 'test/1', keepalive: 20 }]);
  assert.deepEqual(states, ['connecting', 'online']);
  assert.equal(client.address, 'alice');
  assert.deepEqual(client.welcome, { address: 'alice', time: 1700000000000, maxFrame: 1 << 20, keepalive: 60 });
  client.close();
  assert.equal(client.state, 'closed');
  assert.equal(ws.sent(Kind.BYE).length, 1);
});

test('send: sending → sent → delivered → read, stored statuses ACKed', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'hi', expiry: 3600, type: 0, priority: 2 });
  const seen = [];
  h.on('status', (ev) => seen.push(ev.status));
  assert.equal(h.status, 'sending');
  assert.equal(typeof h.id, 'bigint');
  assert.notEqual(h.id, 0n);
  const [send] = ws.sent(Kind.SEND);
  assert.deepEqual(send, { kind: Kind.SEND, id: h.id, to: 'bob', expiry: 3600, type: 0, priority: 2, payload: utf8('hi') });

  ws.deliver(status(h.id, StatusCode.SENT));
  assert.equal(h.status, 'sent');
  assert.equal(await h.sent, h);
  ws.deliver(status(h.id, StatusCode.DELIVERED, { seq: 1000n }));
  await waitFor(() => h.status === 'delivered');
  ws.deliver(status(h.id, StatusCode.READ, { seq: 1001n }));
  await waitFor(() => h.status === 'read');
  await waitFor(() => ws.acked.length === 2, 2000, 'ACKs');
  assert.deepEqual(ws.acked, [1000n, 1001n]);
  assert.deepEqual(seen, ['sent', 'delivered', 'read']);
  assert.equal(h.final, true);
  assert.equal(h.time, 1700000000500);
  client.close();
});

test('status never moves back: READ before DELIVERED stays read', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'x' });
  ws.deliver(status(h.id, StatusCode.SENT), status(h.id, StatusCode.READ, { seq: 5n }), status(h.id, StatusCode.DELIVERED, { seq: 6n }));
  await waitFor(() => ws.acked.length === 2);
  assert.equal(h.status, 'read');
  client.close();
});

test('error statuses: the handle fails with the status name and sent rejects', async () => {
  const client = makeClient();
  const ws = await login(client);
  const statuses = [];
  client.on('status', (ev) => statuses.push(ev.status));
  for (const [code, name] of [[StatusCode.INVALID_DEST, 'INVALID_DEST'], [StatusCode.TOO_LARGE, 'TOO_LARGE'],
    [StatusCode.NOT_MEMBER, 'NOT_MEMBER'], [StatusCode.BAD_REQUEST, 'BAD_REQUEST'], [StatusCode.OFFLINE, 'OFFLINE']]) {
    const h = client.send({ to: 'nobody', payload: 'x' });
    ws.deliver(status(h.id, code));
    assert.equal(h.status, name);
    await assert.rejects(h.sent, (e) => e instanceof TernSendError && e.code === name && e.handle === h);
    assert.equal(h.final, true);
  }
  assert.deepEqual(statuses, ['INVALID_DEST', 'TOO_LARGE', 'NOT_MEMBER', 'BAD_REQUEST', 'OFFLINE']);
  client.close();
});

test('EXPIRED after SENT: sent resolved, then the status becomes EXPIRED', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'x' });
  ws.deliver(status(h.id, StatusCode.SENT));
  await h.sent;
  ws.deliver(status(h.id, StatusCode.EXPIRED, { seq: 9n }));
  await waitFor(() => h.status === 'EXPIRED');
  assert.equal(h.error?.code, 'EXPIRED');
  client.close();
});

test('reconnect: every unanswered SEND is written again with the same ID, in order', async () => {
  const client = makeClient();
  const ws1 = await login(client);
  const a = client.send({ to: 'bob', payload: 'a' });
  const b = client.send({ to: 'bob', payload: 'b' });
  const c = client.send({ to: 'bob', payload: 'c' });
  ws1.deliver(status(a.id, StatusCode.SENT)); // a answered, b and c not
  const states = [];
  client.on('state', (ev) => states.push(ev.state));
  ws1.drop();
  assert.equal(client.state, 'offline');
  assert.deepEqual(client.pending.map((h) => h.id), [b.id, c.id]);
  const d = client.send({ to: 'bob', payload: 'd' }); // sent while offline: queued
  const ws2 = await relogin(client);
  assert.deepEqual(ws2.sent(Kind.SEND).map((f) => f.id), [b.id, c.id, d.id]);
  // Byte for byte the same SEND as before.
  assert.deepEqual(ws2.sent(Kind.SEND)[0], ws1.sent(Kind.SEND)[1]);
  assert.deepEqual(states, ['offline', 'connecting', 'online']);
  // All frames after HELLO went out in one packed message of whole frames.
  assert.equal(ws2.messages.length, 2);
  ws2.deliver(status(b.id, StatusCode.SENT), status(c.id, StatusCode.SENT), status(d.id, StatusCode.SENT));
  assert.deepEqual([a, b, c, d].map((h) => h.status), ['sent', 'sent', 'sent', 'sent']);
  assert.equal(client.pending.length, 0);
  assert.equal(b.attempts, 2);
  client.close();
});

test('send before connect is queued and written after WELCOME', async () => {
  const client = makeClient();
  const h = client.send({ group: 'team', payload: 'early', id: 42n, flags: 0 });
  assert.equal(h.id, 42n);
  const ws = await login(client);
  assert.deepEqual(ws.sent(Kind.SEND), [{ kind: Kind.SEND, id: 42n, group: 'team', flags: 0, payload: utf8('early') }]);
  // Sending the same ID again while unanswered returns the same handle.
  assert.equal(client.send({ group: 'team', payload: 'early', id: 42n }), h);
  client.close();
});

test('fire-and-forget (id 0): no ID field, status written, never resent', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'ping', id: 0 });
  assert.equal(h.id, 0n);
  assert.equal(h.status, 'written');
  assert.deepEqual(ws.sent(Kind.SEND), [{ kind: Kind.SEND, to: 'bob', payload: utf8('ping') }]);
  ws.drop();
  const ws2 = await relogin(client);
  assert.equal(ws2.sent(Kind.SEND).length, 0);
  client.close();
});

test('OVERLOADED: retried with backoff under the same ID, then sent', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'x' });
  const seen = [];
  h.on('status', (ev) => seen.push(ev.status));
  ws.deliver(status(h.id, StatusCode.OVERLOADED));
  assert.equal(h.status, 'OVERLOADED');
  assert.equal(h.error, null);
  await waitFor(() => ws.sent(Kind.SEND).length === 2, 2000, 'the retry');
  assert.equal(ws.sent(Kind.SEND)[1].id, h.id);
  ws.deliver(status(h.id, StatusCode.SENT));
  assert.deepEqual(seen, ['OVERLOADED', 'sending', 'sent']);
  client.close();
});

test('OVERLOADED becomes final when the retries are used up', async () => {
  const client = makeClient({ overloadedRetries: 1 });
  const ws = await login(client);
  const h = client.send({ to: 'bob', payload: 'x' });
  ws.deliver(status(h.id, StatusCode.OVERLOADED));
  await waitFor(() => ws.sent(Kind.SEND).length === 2);
  ws.deliver(status(h.id, StatusCode.OVERLOADED));
  await assert.rejects(h.sent, (e) => e.code === 'OVERLOADED');
  assert.equal(h.status, 'OVERLOADED');
  client.close();
});

test('receive: MSG emitted with its fields, then ACKed after the handler', async () => {
  const client = makeClient();
  const got = [];
  client.on('message', async (m) => {
    await tick(2);
    got.push(m);
  });
  const ws = await login(client);
  ws.deliver(msg(7n, { group: 'team', priority: 3, type: 5 }));
  await waitFor(() => ws.acked.length === 1);
  assert.equal(got.length, 1);
  const m = got[0];
  assert.equal(m.seq, 7n);
  assert.equal(m.from, 'bob');
  assert.equal(m.group, 'team');
  assert.equal(m.id, 107n);
  assert.equal(m.time, 1700000000000);
  assert.equal(m.type, 5);
  assert.equal(m.priority, 3);
  assert.equal(m.text(), 'm7');
  assert.equal(m.json(), undefined);
  assert.equal(m.redelivery, false);
  assert.deepEqual(ws.acked, [7n]);
  client.close();
});

test('dedup: a redelivered SEQ is ACKed again but not re-emitted, also after a reconnect', async () => {
  const client = makeClient();
  const got = [];
  client.on('message', (m) => got.push(m.seq));
  const ws1 = await login(client);
  ws1.deliver(msg(1n), msg(2n));
  await waitFor(() => ws1.acked.length === 2);
  ws1.deliver(msg(2n, { flags: 3 | Flags.REDELIVERY })); // same connection
  await waitFor(() => ws1.acked.length === 3);
  ws1.drop();
  const ws2 = await relogin(client);
  ws2.deliver(msg(1n, { flags: 0x103 }), msg(3n), msg(2n, { flags: 0x103 }));
  await waitFor(() => ws2.acked.length === 3);
  assert.deepEqual(got, [1n, 2n, 3n]);
  assert.deepEqual([...ws2.acked].sort(), [1n, 2n, 3n]);
  client.close();
});

test('messages are handed to the application in order, one at a time', async () => {
  const client = makeClient();
  const log = [];
  client.on('message', async (m) => {
    log.push(`start ${m.seq}`);
    await tick(Number(m.seq) === 1 ? 10 : 1);
    log.push(`end ${m.seq}`);
  });
  const ws = await login(client);
  ws.deliver(msg(1n), msg(2n));
  await waitFor(() => ws.acked.length === 2);
  assert.deepEqual(log, ['start 1', 'end 1', 'start 2', 'end 2']);
  client.close();
});

test('a failing handler leaves the MSG un-ACKed; its redelivery is emitted again', async () => {
  const client = makeClient();
  let calls = 0;
  client.on('message', () => {
    calls++;
    if (calls === 1) throw new Error('app crashed');
  });
  const ws1 = await login(client);
  ws1.deliver(msg(5n));
  await waitFor(() => client.errors.length === 1);
  assert.equal(client.errors[0].code, 'HANDLER_FAILED');
  await tick();
  assert.deepEqual(ws1.acked, []);
  ws1.drop();
  const ws2 = await relogin(client);
  ws2.deliver(msg(5n, { flags: 0x103 }));
  await waitFor(() => ws2.acked.length === 1);
  assert.equal(calls, 2);
  client.close();
});

test('manual ack mode: ACK only on msg.ack(); a redelivery before that is not re-emitted', async () => {
  const client = makeClient({ ackMode: 'manual' });
  const got = [];
  client.on('message', (m) => got.push(m));
  const ws = await login(client);
  ws.deliver(msg(11n));
  await waitFor(() => got.length === 1);
  await tick();
  assert.deepEqual(ws.acked, []);
  ws.deliver(msg(11n, { flags: 0x103 }));
  await tick();
  assert.equal(got.length, 1);
  got[0].ack();
  await waitFor(() => ws.acked.length === 1);
  ws.deliver(msg(11n, { flags: 0x103 }));
  await waitFor(() => ws.acked.length === 2);
  assert.equal(got.length, 1);
  client.close();
});

test('stored STATUS about an unknown ID (an earlier session) is emitted and ACKed once', async () => {
  const client = makeClient();
  const got = [];
  client.on('status', (ev) => got.push(ev));
  const ws = await login(client);
  // The second copy arrives while the first is being processed: the first's ACK covers both.
  ws.deliver(status(999n, StatusCode.DELIVERED, { seq: 50n }), status(999n, StatusCode.DELIVERED, { seq: 50n }));
  await waitFor(() => ws.acked.length === 1);
  // A copy after the ACK is ACKed again, not emitted.
  ws.deliver(status(999n, StatusCode.DELIVERED, { seq: 50n }));
  await waitFor(() => ws.acked.length === 2);
  assert.equal(got.length, 1);
  assert.equal(got[0].status, 'delivered');
  assert.equal(got[0].name, 'DELIVERED');
  assert.equal(got[0].handle, null);
  assert.equal(got[0].seq, 50n);
  client.close();
});

test('group statuses carry MEMBER: per-member map, overall furthest progress', async () => {
  const client = makeClient();
  const ws = await login(client);
  const h = client.send({ group: 'team', payload: 'hello all' });
  const g = (code, member, seq) => ({ kind: Kind.STATUS, id: h.id, group: 'team', member, status: code, time: 1n, seq });
  ws.deliver({ kind: Kind.STATUS, id: h.id, group: 'team', status: StatusCode.SENT, time: 1n });
  ws.deliver(g(StatusCode.DELIVERED, 'bob', 20n), g(StatusCode.EXPIRED, 'carol', 21n), g(StatusCode.READ, 'bob', 22n));
  await waitFor(() => ws.acked.length === 3);
  assert.equal(h.status, 'read');
  assert.equal(h.error, null);
  assert.deepEqual([...h.members], [['bob', 'read'], ['carol', 'EXPIRED']]);
  client.close();
});

test('read(msg) sends READ with FROM, ID and GROUP, once, only when asked for', async () => {
  const client = makeClient();
  const got = [];
  client.on('message', (m) => got.push(m));
  const ws = await login(client);
  ws.deliver(msg(1n, { group: 'team' }), msg(2n, { flags: Flags.DELIVERY_RECEIPT }));
  await waitFor(() => got.length === 2);
  assert.equal(got[0].read(), true);
  assert.equal(client.read(got[0]), false); // already sent
  assert.equal(got[1].read(), false); // no READ_RECEIPT asked
  assert.deepEqual(ws.sent(Kind.READ), [{ kind: Kind.READ, from: 'bob', id: 101n, group: 'team' }]);
  client.close();
});

test('READ while offline is queued for the next login', async () => {
  const client = makeClient();
  const ws1 = await login(client);
  ws1.drop();
  assert.equal(client.read({ from: 'bob', id: 5n }), true);
  const ws2 = await relogin(client);
  assert.deepEqual(ws2.sent(Kind.READ), [{ kind: Kind.READ, from: 'bob', id: 5n }]);
  client.close();
});

test('AUTH_FAILED: connect rejects with a typed error, state auth_failed, no reconnect', async () => {
  const client = makeClient();
  const p = client.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  ws.deliver({ kind: Kind.ERROR, code: ErrorCode.AUTH_FAILED, reason: 'unknown token' });
  await assert.rejects(p, (e) => e instanceof TernServerError && e.code === 'AUTH_FAILED' && e.reason === 'unknown token');
  assert.equal(client.state, 'auth_failed');
  await tick(40);
  assert.equal(FakeWebSocket.instances.length, 1);
  // A new token and connect() again works.
  client.token = 'tok-b';
  const ws2 = await login(client);
  assert.equal(ws2.sent(Kind.HELLO)[0].token, 'tok-b');
  client.close();
});

test('REPLACED closes for good; SHUTDOWN and IDLE_TIMEOUT reconnect', async () => {
  const client = makeClient();
  const ws1 = await login(client);
  ws1.deliver({ kind: Kind.ERROR, code: ErrorCode.SHUTDOWN, reason: 'stopping' });
  assert.equal(client.state, 'offline');
  const ws2 = await relogin(client);
  ws2.deliver({ kind: Kind.ERROR, code: ErrorCode.IDLE_TIMEOUT, reason: 'idle' });
  const ws3 = await relogin(client);
  const closed = new Promise((r) => client.once('closed', r));
  ws3.deliver({ kind: Kind.ERROR, code: ErrorCode.REPLACED, reason: 'replaced' });
  const ev = await closed;
  assert.equal(ev.error.code, 'REPLACED');
  await tick(40);
  assert.equal(FakeWebSocket.instances.length, 3);
  assert.deepEqual(client.errors.map((e) => e.code), ['SHUTDOWN', 'IDLE_TIMEOUT', 'REPLACED']);
});

test('malformed input from the server: reported, socket dropped, reconnect', async () => {
  const client = makeClient();
  const ws1 = await login(client);
  ws1.deliverRaw(Uint8Array.from([0x83, 0, 0, 0, 3, 0x04, 0x01, 0xff])); // FROM not UTF-8
  assert.equal(client.errors[0].code, 'BAD_UTF8');
  assert.equal(client.state, 'offline');
  assert.equal(ws1.closeCode, 1000);
  const ws2 = await relogin(client);
  ws2.deliverRaw('text is not allowed');
  assert.equal(client.errors[1].code, 'TEXT_MESSAGE');
  const ws3 = await relogin(client);
  ws3.deliverRaw(Uint8Array.from([0x85, 0, 0, 0, 9, 0x0b])); // partial frame
  assert.equal(client.errors[2].code, 'PARTIAL_FRAME');
  await relogin(client);
  client.close();
});

test('a frame before WELCOME is refused', async () => {
  const client = makeClient();
  client.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  ws.deliver(msg(1n));
  assert.equal(client.errors[0].code, 'UNEXPECTED_FRAME');
  assert.equal(client.state, 'offline');
  client.close();
});

test('an error event without a close event also leads to a reconnect', async () => {
  const client = makeClient();
  client.connect();
  FakeWebSocket.last.error();
  assert.equal(client.state, 'offline');
  await relogin(client);
  client.close();
});

test('no WELCOME within connectTimeout: retry', async () => {
  const client = makeClient({ connectTimeout: 20 });
  client.connect();
  FakeWebSocket.last.accept();
  await waitFor(() => FakeWebSocket.instances.length === 2, 2000, 'a retry');
  client.close();
});

test('a SEND larger than the server max_frame fails locally with TOO_LARGE', async () => {
  const client = makeClient();
  const ws = await login(client, { ...WELCOME, maxFrame: 64 });
  const h = client.send({ to: 'bob', payload: new Uint8Array(100) });
  await assert.rejects(h.sent, (e) => e.code === 'TOO_LARGE');
  assert.equal(ws.sent(Kind.SEND).length, 0);
  assert.equal(client.state, 'online');
  client.close();
});

test('frames are packed into messages no larger than max_frame, each of whole frames', async () => {
  const client = makeClient();
  const ws = await login(client, { ...WELCOME, maxFrame: 100 });
  ws.drop();
  for (let i = 0; i < 10; i++) client.send({ to: 'bob', payload: new Uint8Array(10) }); // 32-byte frames
  const ws2 = await relogin(client, { ...WELCOME, maxFrame: 100 });
  const sends = ws2.messages.slice(1);
  assert.equal(ws2.sent(Kind.SEND).length, 10);
  for (const m of sends) assert.ok(m.length <= 100, `message of ${m.length} bytes`);
  assert.ok(sends.length < 10, 'frames were packed');
  client.close();
});

test('keepalive: PING with TIME when idle; PONG gives an RTT', async () => {
  const client = makeClient();
  const ws = await login(client, { ...WELCOME, keepalive: 1 });
  const pong = new Promise((r) => client.once('pong', r));
  const ping = await waitFor(() => ws.sent(Kind.PING)[0], 3000, 'PING');
  assert.equal(typeof ping.time, 'bigint');
  ws.deliver({ kind: Kind.PONG, time: ping.time });
  const { rtt } = await pong;
  assert.ok(rtt >= 0 && rtt < 1000);
  client.close();
});

test('a silent server is detected by the keepalive and the client reconnects', async () => {
  const client = makeClient();
  await login(client, { ...WELCOME, keepalive: 1 });
  await waitFor(() => client.state === 'offline', 4000, 'offline');
  client.close();
});

test('close() while offline stops the retries and rejects connect()', async () => {
  const client = makeClient({ reconnect: { initialDelay: 1000 } });
  const p = client.connect();
  FakeWebSocket.last.drop();
  assert.equal(client.state, 'offline');
  client.close();
  await assert.rejects(p, (e) => e.code === 'CLOSED');
  assert.equal(client.state, 'closed');
  await tick(20);
  assert.equal(FakeWebSocket.instances.length, 1);
});

test('a MSG with no message listener is not ACKed (it will come again)', async () => {
  const client = makeClient();
  const ws = await login(client);
  ws.deliver(msg(3n));
  await waitFor(() => client.errors.length === 1);
  assert.equal(client.errors[0].code, 'NO_LISTENER');
  await tick();
  assert.deepEqual(ws.acked, []);
  client.close();
});

test('send() validates its options', () => {
  const client = makeClient();
  assert.throws(() => client.send({ payload: 'x' }), TypeError);
  assert.throws(() => client.send({ to: 'a', group: 'b' }), TypeError);
  assert.throws(() => client.send({ to: 'a', id: -1 }), TypeError);
  assert.throws(() => client.send({ to: 'a', priority: 300 }), RangeError);
});
