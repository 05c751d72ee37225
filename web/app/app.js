// @ts-check
/**
 * tern web chat: a static page served by tern under /app/, using the client
 * library served under /client/. No framework, no build step. Conversations
 * and messages live in memory for this page load (the token optionally in
 * localStorage).
 *
 * Where things go:
 * - the WebSocket (protocol port, default 7700): `?ws=` query parameter, else
 *   the URL remembered from the last login, else ws(s)://<page host>:7700/v1/ws;
 *   editable on the login form;
 * - the HTTP API (file upload): the page's own origin (`/v1/files`).
 *
 * Attachments: the file is uploaded with `POST /v1/files` (user token as
 * Bearer), then a message of TYPE 1 carries the JSON record
 * `{"tern":"attachment","v":1,"url","name","size","mime","sha256","caption"?,"thumbnail"?}`
 * (see clients/js/README.md). TYPE 0 is plain UTF-8 text.
 *
 * Stable selectors for headless tests (ids and data-testid are both stable):
 *
 *   login form ........ #login-form            [data-testid=login-form]
 *     token ........... #login-token           [data-testid=login-token]
 *     WebSocket URL ... #login-ws              [data-testid=login-ws-url]
 *     remember ........ #login-remember        [data-testid=login-remember]
 *     submit .......... #login-submit          [data-testid=login-submit]
 *     error text ...... #login-error           [data-testid=login-error]
 *   <body data-state=…> the connection state (idle|connecting|online|offline|auth_failed|closed)
 *   <body data-view=…>  login | list | chat (which pane is shown on a narrow screen)
 *   own address ....... #self-address          [data-testid=self-address]
 *   connection state .. #conn-state            [data-testid=conn-state] (data-state=…)
 *   reconnect button .. #reconnect             [data-testid=reconnect] (after REPLACED / close)
 *   log out ........... #logout                [data-testid=logout]
 *   new chat form ..... #new-chat-form         [data-testid=new-chat-form]
 *     kind select ..... #new-chat-kind         [data-testid=new-chat-kind] (value user|group)
 *     address ......... #new-chat-address      [data-testid=new-chat-address]
 *     submit .......... #new-chat-submit       [data-testid=new-chat-submit]
 *   conversation list . #conversation-list     [data-testid=conversation-list]
 *     one entry ....... [data-testid=conversation-item][data-conversation="u:bob"|"g:team"]
 *     its unread count  [data-testid=conversation-unread]
 *   open conversation . #conversation-title    [data-testid=conversation-title]
 *   back (narrow) ..... #back                  [data-testid=back]
 *   message list ...... #message-list          [data-testid=message-list]
 *     a bubble ........ [data-testid=message] with data-direction="in"|"out",
 *                       data-msg-id="<decimal u64 ID>", data-from, data-type,
 *                       data-status (outgoing: uploading|sending|sent|delivered|read|
 *                       OVERLOADED|<failure name>|UPLOAD_FAILED)
 *     its text ........ [data-testid=message-text]
 *     its status ...... [data-testid=message-status] (same data-status; ticks as text)
 *     attachment ...... [data-testid=message-attachment], image [data-testid=attachment-image],
 *                       link [data-testid=attachment-link]
 *   message input ..... #message-input         [data-testid=message-input]
 *   send button ....... #send-button           [data-testid=send-button]
 *   file input ........ #file-input            [data-testid=file-input]
 *
 * `window.ternApp` exposes the state (client, conversations) for debugging.
 */
import { TernClient } from '/client/tern.js';

/** Message TYPE of plain text. */
const TYPE_TEXT = 0;
/** Message TYPE of an attachment record (JSON). */
const TYPE_ATTACHMENT = 1;
/** Address and group-name rule of the protocol. */
const ADDRESS_RE = /^[A-Za-z0-9._@+-]{1,255}$/;
const STORE_TOKEN = 'tern.token';
const STORE_WS = 'tern.ws';

/** Tick marks and words for outgoing statuses. */
const STATUS_VIEW = {
  uploading: ['⇡', 'Uploading…'],
  sending: ['◷', 'Sending…'],
  written: ['✓', 'Sent (no receipts)'],
  sent: ['✓', 'Sent'],
  delivered: ['✓✓', 'Delivered'],
  read: ['✓✓', 'Read'],
  OVERLOADED: ['↻', 'Server busy, retrying'],
  INVALID_DEST: ['⚠', 'No such user or group'],
  OFFLINE: ['⚠', 'Recipient offline'],
  TOO_LARGE: ['⚠', 'Too large'],
  NOT_MEMBER: ['⚠', 'Not allowed to send to this group'],
  BAD_REQUEST: ['⚠', 'Rejected by the server'],
  EXPIRED: ['⚠', 'Expired before delivery'],
  DELETED: ['⚠', 'Deleted by an operator'],
  UPLOAD_FAILED: ['⚠', 'Upload failed'],
};

/**
 * @typedef {object} Attachment
 * @property {string} url
 * @property {string} name
 * @property {number} size
 * @property {string} mime
 * @property {string} [sha256]
 * @property {string} [caption]
 * @property {string} [thumbnail]
 *
 * @typedef {object} Entry one message in a conversation
 * @property {number} uid local key
 * @property {'in'|'out'} dir
 * @property {bigint} id the protocol ID (0n until known for an upload)
 * @property {string} from
 * @property {number} time ms since the epoch
 * @property {number} type
 * @property {string} text the text, or an attachment's caption
 * @property {Attachment|null} attachment
 * @property {string} status outgoing: see STATUS_VIEW
 * @property {string|null} detail an error's detail, shown as a tooltip
 * @property {import('/client/tern.js').TernMessage|null} msg incoming: the delivery (for READ)
 * @property {boolean} readSent
 * @property {HTMLElement|null} el its bubble, once rendered
 *
 * @typedef {object} Conversation
 * @property {string} key `u:<address>` or `g:<group>`
 * @property {'user'|'group'} kind
 * @property {string} name
 * @property {Entry[]} entries
 * @property {number} unread
 * @property {number} last time of the last activity
 */

/** Everything the page knows; in memory only. */
const app = {
  /** @type {TernClient|null} */
  client: null,
  /** @type {string|null} the user token (for uploads) */
  token: null,
  /** @type {string|null} this user's address, from WELCOME */
  self: null,
  /** @type {Map<string, Conversation>} */
  conversations: new Map(),
  /** @type {string|null} */
  openKey: null,
  /** Next local entry key. */
  nextUid: 1,
  /** Whether the first login of this client has succeeded. */
  loggedIn: false,
};
/** @type {any} */ (window).ternApp = app;

// --- small DOM helpers ------------------------------------------------------

/** @param {string} id @returns {any} */
const $ = (id) => /** @type {any} */ (document.getElementById(id));

/**
 * Creates an element with attributes (data-* and the rest) and children.
 * Text is always set as text, never parsed as HTML.
 * @param {string} tag
 * @param {Record<string, string|number|boolean|null|undefined>} [attrs]
 * @param {...(Node|string|null|undefined|false)} children
 * @returns {HTMLElement}
 */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = String(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

/**
 * Replaces an element's children, skipping null/undefined/false.
 * @param {Element} el
 * @param {...(Node|string|null|undefined|false)} children
 */
function setChildren(el, ...children) {
  el.replaceChildren(...children.filter(/** @returns {c is Node|string} */ (c) => c !== null && c !== undefined && c !== false));
}

/** @param {number} ms */
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });

/** @param {number} n */
function humanSize(n) {
  if (!Number.isFinite(n) || n < 0) return '';
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

/**
 * An http(s) URL resolved against this page, or null for anything else
 * (javascript:, data:, garbage).
 * @param {unknown} value
 */
function safeUrl(value) {
  if (typeof value !== 'string' || !value) return null;
  try {
    const url = new URL(value, location.origin);
    return url.protocol === 'http:' || url.protocol === 'https:' ? url : null;
  } catch {
    return null;
  }
}

/** @param {string} key @returns {string|null} */
function stored(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

/** @param {string} key @param {string|null} value */
function store(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch {
    // private mode: nothing remembered
  }
}

/** Whether the screen is narrow (one pane at a time). */
const narrow = () => window.matchMedia('(max-width: 720px)').matches;

// --- login ------------------------------------------------------------------

/** ws(s)://<page host>:7700/v1/ws, the protocol port next to this HTTP port. */
function defaultWsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.hostname || 'localhost'}:7700/v1/ws`;
}

function initLogin() {
  const params = new URLSearchParams(location.search);
  $('login-ws').value = params.get('ws') || stored(STORE_WS) || defaultWsUrl();
  const token = stored(STORE_TOKEN);
  $('login-form').addEventListener('submit', (/** @type {Event} */ ev) => {
    ev.preventDefault();
    const tokenValue = $('login-token').value.trim();
    const ws = $('login-ws').value.trim();
    if (!tokenValue || !ws) return;
    login(tokenValue, ws, $('login-remember').checked);
  });
  if (token) {
    $('login-token').value = token;
    $('login-remember').checked = true;
    login(token, $('login-ws').value, true);
  }
}

/** @param {string} text @param {boolean} [isError] */
function loginMessage(text, isError = true) {
  const el = $('login-error');
  el.textContent = text;
  el.hidden = !text;
  el.classList.toggle('info', !isError);
}

/**
 * Starts a client; shows the chat at its first WELCOME.
 * @param {string} token
 * @param {string} wsUrl
 * @param {boolean} remember
 */
async function login(token, wsUrl, remember) {
  teardown();
  loginMessage('');
  $('login-submit').textContent = 'Connecting…';
  const client = new TernClient({ url: wsUrl, token, clientName: 'tern-web/1' });
  app.client = client;
  app.token = token;
  // Events of a client that was replaced (logout, new login) are ignored.
  client.on('state', (ev) => app.client === client && onState(ev));
  client.on('message', (m) => {
    if (app.client === client) onMessage(m);
  });
  client.on('error', (e) => console.warn('tern:', e));
  try {
    const welcome = await client.connect();
    if (app.client !== client) return;
    app.self = welcome.address;
    app.loggedIn = true;
    store(STORE_WS, wsUrl);
    store(STORE_TOKEN, remember ? token : null);
    $('self-address').textContent = welcome.address;
    $('login').hidden = true;
    $('chat').hidden = false;
    $('login-submit').textContent = 'Log in';
    setView(app.openKey ? 'chat' : 'list');
    renderConversationList();
  } catch (e) {
    if (app.client !== client) return;
    $('login-submit').textContent = 'Log in';
    const err = /** @type {any} */ (e);
    loginMessage(err?.code === 'AUTH_FAILED' ? 'This token was not accepted.' : `Could not log in: ${err?.message ?? e}`);
    if (err?.code === 'AUTH_FAILED') store(STORE_TOKEN, null);
  }
}

/** Closes the current client and forgets the session's state. */
function teardown() {
  const old = app.client;
  app.client = null;
  if (old) old.close();
  app.conversations.clear();
  app.openKey = null;
  app.loggedIn = false;
  app.self = null;
  $('message-list').replaceChildren();
  $('conversation-list').replaceChildren();
}

function logout() {
  teardown();
  app.token = null;
  store(STORE_TOKEN, null);
  $('login-token').value = '';
  $('chat').hidden = true;
  $('login').hidden = false;
  document.body.dataset.state = 'idle';
  setView('login');
  updateTitle();
}

/** @param {import('/client/tern.js').StateEvent} ev */
function onState(ev) {
  document.body.dataset.state = ev.state;
  const el = $('conn-state');
  el.dataset.state = ev.state;
  const retry = ev.retryIn ? ` — retrying in ${Math.max(1, Math.round(ev.retryIn / 1000))} s` : '';
  const text = {
    idle: '',
    connecting: 'Connecting…',
    online: 'Online',
    offline: `Offline${retry}`,
    auth_failed: 'Token refused',
    closed: ev.error && /** @type {any} */ (ev.error).code === 'REPLACED' ? 'Opened in another window' : 'Disconnected',
  }[ev.state];
  el.textContent = text;
  el.title = ev.error ? ev.error.message : '';
  $('reconnect').hidden = ev.state !== 'closed';
  if (!app.loggedIn) {
    // Still on the login form: say why it takes long.
    if (ev.state === 'offline') loginMessage(`Cannot reach ${app.client?.url}${retry}.`, false);
    return;
  }
  if (ev.state === 'auth_failed') {
    logout();
    loginMessage('The token is no longer valid. Log in again.');
  }
  if (ev.state === 'online') markVisibleAsRead();
}

// --- conversations ---------------------------------------------------------

/**
 * The conversation for a peer or group, created on first use.
 * @param {'user'|'group'} kind
 * @param {string} name
 */
function conversation(kind, name) {
  const key = `${kind === 'group' ? 'g' : 'u'}:${name}`;
  let conv = app.conversations.get(key);
  if (!conv) {
    conv = { key, kind, name, entries: [], unread: 0, last: Date.now() };
    app.conversations.set(key, conv);
  }
  return conv;
}

/** @param {Entry} e */
function preview(e) {
  if (e.attachment) return `${e.attachment.mime.startsWith('image/') ? 'Photo' : 'File'}: ${e.attachment.name}`;
  return e.text.replace(/\s+/g, ' ').slice(0, 80);
}

function renderConversationList() {
  const list = $('conversation-list');
  const convs = [...app.conversations.values()].sort((a, b) => b.last - a.last);
  setChildren(list, ...convs.map((c) => {
    const lastEntry = c.entries[c.entries.length - 1];
    return h('li', {},
      h('button', {
        type: 'button', class: 'conv', 'data-testid': 'conversation-item', 'data-conversation': c.key,
        'aria-current': c.key === app.openKey ? 'true' : null,
      },
      h('span', { class: `avatar ${c.kind}`, 'aria-hidden': 'true' }, c.kind === 'group' ? '#' : c.name.slice(0, 1).toUpperCase()),
      h('span', { class: 'conv-text' },
        h('span', { class: 'conv-name' }, c.kind === 'group' ? `#${c.name}` : c.name),
        h('span', { class: 'conv-preview muted' }, lastEntry ? preview(lastEntry) : '')),
      c.unread ? h('span', { class: 'badge', 'data-testid': 'conversation-unread' }, String(c.unread)) : null));
  }));
  $('no-conversations').hidden = convs.length > 0;
  updateTitle();
}

function updateTitle() {
  let unread = 0;
  for (const c of app.conversations.values()) unread += c.unread;
  document.title = unread ? `(${unread}) tern` : 'tern';
}

/** @param {'login'|'list'|'chat'} view */
function setView(view) {
  document.body.dataset.view = view;
}

/** @param {string} key */
function openConversation(key) {
  const conv = app.conversations.get(key);
  if (!conv) return;
  app.openKey = key;
  $('conversation-title').textContent = conv.kind === 'group' ? `#${conv.name}` : conv.name;
  $('no-conversation').hidden = true;
  $('composer').hidden = false;
  const list = $('message-list');
  for (const e of conv.entries) e.el = null;
  setChildren(list, ...conv.entries.map(bubble));
  list.scrollTop = list.scrollHeight;
  setView('chat');
  markVisibleAsRead();
  renderConversationList();
  if (!narrow()) $('message-input').focus();
}

function closeConversationOnNarrow() {
  app.openKey = null;
  $('no-conversation').hidden = false;
  $('composer').hidden = true;
  $('conversation-title').textContent = '';
  $('message-list').replaceChildren();
  setView('list');
  renderConversationList();
}

/** Whether the open conversation is on screen and the tab is visible. */
function conversationVisible() {
  return document.visibilityState === 'visible' && app.openKey !== null &&
    (!narrow() || document.body.dataset.view === 'chat');
}

/** Sends READ for every incoming message shown in the open conversation. */
function markVisibleAsRead() {
  if (!app.client || !conversationVisible()) return;
  const conv = app.conversations.get(/** @type {string} */ (app.openKey));
  if (!conv) return;
  for (const e of conv.entries) {
    if (e.dir === 'in' && !e.readSent && e.msg) {
      e.readSent = true;
      app.client.read(e.msg);
    }
  }
  if (conv.unread) {
    conv.unread = 0;
    renderConversationList();
  }
}

// --- messages ---------------------------------------------------------------

/**
 * Reads an attachment record from a TYPE 1 payload; null when it is not one.
 * @param {any} json
 * @returns {Attachment|null}
 */
function parseAttachment(json) {
  if (!json || typeof json !== 'object' || json.tern !== 'attachment' || typeof json.url !== 'string') return null;
  const str = (/** @type {unknown} */ v, max = 1000) => (typeof v === 'string' ? v.slice(0, max) : undefined);
  return {
    url: json.url,
    name: str(json.name, 255) || 'file',
    size: typeof json.size === 'number' ? json.size : -1,
    mime: str(json.mime, 255) || 'application/octet-stream',
    sha256: str(json.sha256, 64),
    caption: str(json.caption, 4000),
    thumbnail: str(json.thumbnail),
  };
}

/** @param {import('/client/tern.js').TernMessage} m */
function onMessage(m) {
  const conv = m.group ? conversation('group', m.group) : conversation('user', m.from);
  const attachment = m.type === TYPE_ATTACHMENT ? parseAttachment(m.json()) : null;
  /** @type {Entry} */
  const entry = {
    uid: app.nextUid++, dir: 'in', id: m.id, from: m.from, time: m.time || Date.now(), type: m.type,
    text: attachment ? attachment.caption ?? '' : m.type === TYPE_ATTACHMENT ? '[unreadable attachment]' : m.text(),
    attachment, status: 'received', detail: null, msg: m, readSent: false, el: null,
  };
  conv.entries.push(entry);
  conv.last = Date.now();
  if (conv.key === app.openKey) appendBubble(entry);
  if (conv.key === app.openKey && conversationVisible()) markVisibleAsRead();
  else conv.unread++;
  renderConversationList();
}

/**
 * Adds an outgoing entry to a conversation (and to the screen if open).
 * @param {Conversation} conv
 * @param {Partial<Entry>} fields
 * @returns {Entry}
 */
function addOutgoing(conv, fields) {
  /** @type {Entry} */
  const entry = {
    uid: app.nextUid++, dir: 'out', id: 0n, from: app.self ?? '', time: Date.now(), type: TYPE_TEXT,
    text: '', attachment: null, status: 'sending', detail: null, msg: null, readSent: true, el: null, ...fields,
  };
  conv.entries.push(entry);
  conv.last = Date.now();
  if (conv.key === app.openKey) appendBubble(entry);
  renderConversationList();
  return entry;
}

/**
 * Sends a payload for an entry and follows its status.
 * @param {Conversation} conv
 * @param {Entry} entry
 * @param {string} payload
 */
function sendEntry(conv, entry, payload) {
  if (!app.client) return;
  let handle;
  try {
    handle = app.client.send({
      ...(conv.kind === 'group' ? { group: conv.name } : { to: conv.name }),
      payload, type: entry.type,
    });
  } catch (e) {
    setStatus(entry, 'BAD_REQUEST', /** @type {Error} */ (e).message);
    return;
  }
  entry.id = handle.id;
  if (entry.el) entry.el.dataset.msgId = String(handle.id);
  setStatus(entry, handle.status);
  handle.on('status', (ev) => setStatus(entry, ev.status));
}

function sendText() {
  const conv = app.openKey ? app.conversations.get(app.openKey) : null;
  const input = $('message-input');
  const text = input.value.replace(/\s+$/, '');
  if (!conv || !text.trim()) return;
  input.value = '';
  autosize(input);
  const entry = addOutgoing(conv, { type: TYPE_TEXT, text });
  sendEntry(conv, entry, text);
}

/**
 * Uploads a file through the files API, then sends the attachment record.
 * @param {File} file
 */
async function sendFile(file) {
  const conv = app.openKey ? app.conversations.get(app.openKey) : null;
  if (!conv || !app.token) return;
  const input = $('message-input');
  const caption = input.value.trim();
  input.value = '';
  autosize(input);
  const mime = file.type || 'application/octet-stream';
  const entry = addOutgoing(conv, {
    type: TYPE_ATTACHMENT, text: caption, status: 'uploading',
    attachment: { url: '', name: file.name || 'file', size: file.size, mime },
  });
  try {
    const res = await fetch(new URL('/v1/files', location.origin), {
      method: 'POST',
      headers: { Authorization: `Bearer ${app.token}`, 'Content-Type': mime },
      body: file,
    });
    const body = await res.json().catch(() => null);
    if (!res.ok || !body || typeof body.url !== 'string') {
      throw new Error(body?.message || `HTTP ${res.status}`);
    }
    /** @type {Record<string, unknown>} */
    const record = {
      tern: 'attachment',
      v: 1,
      url: new URL(body.url, location.origin).href,
      name: (file.name || 'file').slice(0, 255),
      size: typeof body.size === 'number' ? body.size : file.size,
      mime: body.content_type || mime,
      sha256: body.sha256,
    };
    if (typeof body.thumbnail === 'string') record.thumbnail = new URL(body.thumbnail, location.origin).href;
    if (caption) record.caption = caption;
    entry.attachment = parseAttachment(record);
    renderEntry(entry);
    sendEntry(conv, entry, JSON.stringify(record));
  } catch (e) {
    setStatus(entry, 'UPLOAD_FAILED', /** @type {Error} */ (e).message);
  }
}

/**
 * @param {Entry} entry
 * @param {string} status
 * @param {string|null} [detail]
 */
function setStatus(entry, status, detail = null) {
  entry.status = status;
  entry.detail = detail;
  if (!entry.el) return;
  entry.el.dataset.status = status;
  const el = entry.el.querySelector('[data-testid=message-status]');
  if (el) fillStatus(/** @type {HTMLElement} */ (el), status, detail);
}

/**
 * @param {HTMLElement} el
 * @param {string} status
 * @param {string|null} detail
 */
function fillStatus(el, status, detail) {
  const [ticks, words] = /** @type {Record<string, string[]>} */ (STATUS_VIEW)[status] ?? ['⚠', status];
  el.dataset.status = status;
  el.className = `status status-${status.toLowerCase()}`;
  el.title = detail ? `${words}: ${detail}` : words;
  setChildren(el,
    h('span', { 'aria-hidden': 'true' }, ticks),
    h('span', { class: ticks === '⚠' || ticks === '↻' ? 'status-words' : 'visually-hidden' }, ` ${words}`),
  );
}

/**
 * The bubble of an entry.
 * @param {Entry} e
 * @returns {HTMLElement}
 */
function bubble(e) {
  const conv = app.openKey ? app.conversations.get(app.openKey) : null;
  /** @type {HTMLElement} */
  const el = h('li', {
    class: `msg ${e.dir}`, 'data-testid': 'message', 'data-direction': e.dir,
    'data-msg-id': String(e.id), 'data-from': e.from, 'data-type': e.type,
    'data-status': e.dir === 'out' ? e.status : null, id: `msg-${e.uid}`,
  });
  e.el = el;
  fillBubble(e, el, conv?.kind === 'group');
  return el;
}

/**
 * @param {Entry} e
 * @param {HTMLElement} el
 * @param {boolean} inGroup
 */
function fillBubble(e, el, inGroup) {
  const status = e.dir === 'out' ? h('span', { 'data-testid': 'message-status' }) : null;
  if (status) fillStatus(status, e.status, e.detail);
  setChildren(el,
    inGroup && e.dir === 'in' ? h('div', { class: 'sender' }, e.from) : null,
    e.attachment ? attachmentView(e.attachment, e.status === 'uploading') : null,
    e.text ? h('p', { class: 'text', 'data-testid': 'message-text' }, e.text) : null,
    h('div', { class: 'meta' }, h('time', { datetime: new Date(e.time).toISOString() }, clock(e.time)), status),
  );
}

/** @param {Entry} e re-renders an entry's bubble in place */
function renderEntry(e) {
  if (!e.el) return;
  const conv = app.openKey ? app.conversations.get(app.openKey) : null;
  fillBubble(e, e.el, conv?.kind === 'group');
}

/**
 * An attachment: inline image for image types served by this server, else a link.
 * @param {Attachment} a
 * @param {boolean} uploading
 */
function attachmentView(a, uploading) {
  const label = `${a.name}${a.size >= 0 ? ` (${humanSize(a.size)})` : ''}`;
  if (uploading) return h('div', { class: 'attachment file', 'data-testid': 'message-attachment' }, `↑ ${label}`);
  const url = safeUrl(a.url);
  if (!url) return h('div', { class: 'attachment file', 'data-testid': 'message-attachment' }, `${label} (link refused)`);
  const thumb = safeUrl(a.thumbnail);
  // Only our own server's files are loaded inline: a link to elsewhere is not fetched unasked.
  const inline = a.mime.startsWith('image/') && url.origin === location.origin;
  if (inline) {
    const src = thumb && thumb.origin === location.origin ? thumb.href : url.href;
    return h('a', { class: 'attachment image', 'data-testid': 'message-attachment', href: url.href, target: '_blank', rel: 'noopener' },
      h('img', { 'data-testid': 'attachment-image', src, alt: a.name, loading: 'lazy' }));
  }
  return h('div', { class: 'attachment file', 'data-testid': 'message-attachment' },
    h('a', { 'data-testid': 'attachment-link', href: url.href, target: '_blank', rel: 'noopener noreferrer', download: a.name },
      `↓ ${label}`));
}

/** @param {Entry} e */
function appendBubble(e) {
  const list = $('message-list');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(bubble(e));
  if (atBottom || e.dir === 'out') list.scrollTop = list.scrollHeight;
}

/** @param {HTMLTextAreaElement} el grows the input with its text, up to a limit */
function autosize(el) {
  el.style.height = 'auto';
  el.style.height = `${Math.min(el.scrollHeight, 160)}px`;
  el.style.overflowY = el.scrollHeight > 160 ? 'auto' : 'hidden';
}

// --- wiring -----------------------------------------------------------------

function initChat() {
  $('logout').addEventListener('click', logout);
  $('reconnect').addEventListener('click', () => app.client?.connect());
  $('back').addEventListener('click', closeConversationOnNarrow);
  $('conversation-list').addEventListener('click', (/** @type {MouseEvent} */ ev) => {
    const item = /** @type {HTMLElement|null} */ (/** @type {HTMLElement} */ (ev.target).closest('[data-conversation]'));
    if (item?.dataset.conversation) openConversation(item.dataset.conversation);
  });
  $('new-chat-form').addEventListener('submit', (/** @type {Event} */ ev) => {
    ev.preventDefault();
    const kind = $('new-chat-kind').value === 'group' ? 'group' : 'user';
    const name = $('new-chat-address').value.trim().replace(/^#/, '');
    const err = $('new-chat-error');
    if (!ADDRESS_RE.test(name)) {
      err.textContent = 'Use 1–255 letters, digits or . _ @ + -';
      err.hidden = false;
      return;
    }
    err.hidden = true;
    $('new-chat-address').value = '';
    openConversation(conversation(kind, name).key);
  });
  $('composer').addEventListener('submit', (/** @type {Event} */ ev) => {
    ev.preventDefault();
    sendText();
  });
  const input = $('message-input');
  input.addEventListener('keydown', (/** @type {KeyboardEvent} */ ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendText();
    }
  });
  input.addEventListener('input', () => autosize(input));
  $('file-input').addEventListener('change', () => {
    const fileInput = $('file-input');
    const files = [...fileInput.files];
    fileInput.value = ''; // the same file can be picked again
    for (const f of files) sendFile(f);
  });
  document.addEventListener('visibilitychange', markVisibleAsRead);
  window.matchMedia('(max-width: 720px)').addEventListener('change', markVisibleAsRead);
}

initChat();
initLogin();
