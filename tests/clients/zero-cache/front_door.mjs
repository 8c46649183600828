// One real Zero client (@rocicorp/zero 1.9.0, the same install and schema as the zero-cache it
// talks to), headless on Node, driven by JSON lines: the app of tests/front_door.rs
// (tests/common/app.rs starts it and reads it).
//
//   ZERO_SERVER=http://127.0.0.1:PORT [ZERO_USER=alice] [ZERO_TOKEN=...] node front_door.mjs
//
// Settings (environment):
//   ZERO_SERVER       where the client connects: zero-cache itself or syncgate in front of it.
//                     http(s):// or ws(s)://, at most one path segment (the client's rule).
//   ZERO_USER         the client's userID; absent or empty: a logged-out client (no userID).
//   ZERO_TOKEN        its auth token (an HS256 JWT); absent or empty: none.
//   ZERO_STORAGE_KEY  the client's storage key (default "front-door"). The store is in
//                     memory, so every run is a new client group whatever the key.
//
// On start the client materializes the query `item` ordered by id (every row the
// permissions let it see, schema.js) and reports, one JSON object a line on stdout:
//   {"event":"started","clientID","clientGroupID","userID","storageKey","server"}
//   {"event":"state","state":"connecting|connected|disconnected|needs-auth|error|closed",
//    "reason":...|null}                                   every connection state change (the
//                                                          public state's reason: a message,
//                                                          or for needs-auth an object)
//   {"event":"rows","rows":[{"id","owner","title"}],"resultType":"unknown|complete"}
//                                                          every change of the query's rows
//   {"event":"socket-open","socket":N,"params":{...}}     socket N (1, 2, ...) opened; its
//                                                          connect URL's query parameters
//   {"event":"socket-close","socket":N,"code","reason"}   socket N closed
//   {"event":"socket-error","socket":N,"message"}          socket N failed (e.g. refused)
//   {"event":"server-error","socket":N,"error":{...}}     an ["error", {...}] message
//   {"event":"acked","lmid":N}                            the server acknowledged this
//                                                          client's mutations up to N
//   {"event":"update-needed","reason":{...}}              onUpdateNeeded /
//                                                          onClientStateNotFound
//   {"event":"log","level","text"}                        the client's warn/error log lines
//   {"event":"closed"}                                    last line of a clean exit
//   {"event":"fatal","error"}                             the script failed (exit code 1)
//
// Commands, one JSON object a line on stdin; each is answered with
// {"event":"ok","cmd",...,"seq"} or {"event":"failed","cmd","error","seq"} (`seq` echoed if
// given; commands run one after another, in order):
//   {"cmd":"insert","row":{"id","owner","title"}}   z.mutate.item.insert(row); also update,
//   {"cmd":"update","row":{...}}                     upsert and delete ({"id"} for delete).
//   {"cmd":"upsert","row":{...}}                     The ok, sent once the client applied it
//   {"cmd":"delete","row":{"id"}}                    locally, carries "mutationID": the N of
//                                                    the `acked` that says the server did.
//   {"cmd":"complete"}                               resolves once the server has the query
//                                                    (z.run(query, {type: 'complete'})).
//   {"cmd":"auth","token":"..."}                     z.connection.connect({auth: token}):
//                                                    new credentials after needs-auth/error.
//   {"cmd":"status"}                                 ok with state, rows, sockets, lmid.
//   {"cmd":"close"}                                  z.close(), then `closed` and exit 0.
// End of stdin closes the client the same way (so the script ends with the test process).

import {createInterface} from 'node:readline';
import {WebSocket as RealWebSocket} from 'ws';
import {Zero} from '@rocicorp/zero';
import {schema} from './schema.js';

const SERVER = (process.env.ZERO_SERVER || '').replace(/^ws(s?):\/\//, 'http$1://');
const USER = process.env.ZERO_USER || null;
const TOKEN = process.env.ZERO_TOKEN || null;
const STORAGE_KEY = process.env.ZERO_STORAGE_KEY || 'front-door';

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({event, ...fields}) + '\n');
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

if (!SERVER) {
  process.stderr.write('usage: ZERO_SERVER=http://HOST:PORT [ZERO_USER=..] [ZERO_TOKEN=..] node front_door.mjs\n');
  process.exit(2);
}

// ------------------------------------------------------------------------------------------
// The client's WebSocket: the `ws` package's (Node 20 has no global one), reporting what it
// carries that the tests care about.
// ------------------------------------------------------------------------------------------

let sockets = 0;
let ackedLmid = 0;
/** Set once the client exists; acks are counted for this clientID only. */
let myClientID = null;

class ReportingWebSocket extends RealWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    const n = ++sockets;
    this.binaryType = 'nodebuffer';
    this.addEventListener('open', () => {
      emit('socket-open', {socket: n, params: Object.fromEntries(new URL(url).searchParams)});
    });
    // `ws` throws an 'error' event nobody listens to (a refused connect while the server
    // is down, before the client has its listeners on): report it instead. The client sees
    // the failure through its own listeners and the close that follows.
    this.on('error', e => emit('socket-error', {socket: n, message: String(e?.message ?? e)}));
    this.addEventListener('close', e => {
      emit('socket-close', {socket: n, code: e.code, reason: e.reason});
    });
    this.addEventListener('message', e => {
      let msg;
      try {
        msg = JSON.parse(typeof e.data === 'string' ? e.data : e.data.toString());
      } catch {
        return;
      }
      if (msg?.[0] === 'error') emit('server-error', {socket: n, error: msg[1]});
      if (msg?.[0] === 'pokePart') {
        const lmid = msg[1]?.lastMutationIDChanges?.[myClientID];
        if (lmid !== undefined && lmid > ackedLmid) {
          ackedLmid = lmid;
          emit('acked', {lmid});
        }
      }
    });
  }
}
globalThis.WebSocket = ReportingWebSocket;

// ------------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------------

const z = new Zero({
  cacheURL: SERVER,
  userID: USER ?? undefined,
  auth: TOKEN ?? undefined,
  storageKey: STORAGE_KEY,
  schema,
  kvStore: 'mem',
  logLevel: 'info',
  logSink: {
    log(level, context, ...args) {
      const text = args
        .map(a => (a instanceof Error ? a.stack : typeof a === 'string' ? a : safeJson(a)))
        .join(' ');
      process.stderr.write(`[zero ${level}] ${safeJson(context)} ${text}\n`);
      if (level === 'error' || level === 'warn') emit('log', {level, text});
    },
  },
  onUpdateNeeded: reason => emit('update-needed', {reason}),
  onClientStateNotFound: () => emit('update-needed', {reason: {type: 'ClientStateNotFound'}}),
});
myClientID = z.clientID;

const query = z.query.item.orderBy('id', 'asc');
let rows = [];
// The public state's reason: the error's message, or for needs-auth an object saying why.
const stateOf = s => ({state: s.name, reason: s.reason ?? null});
emit('started', {
  clientID: z.clientID,
  clientGroupID: await z.clientGroupID,
  userID: USER,
  storageKey: STORAGE_KEY,
  server: SERVER,
});
emit('state', stateOf(z.connection.state.current));
z.connection.state.subscribe(s => emit('state', stateOf(s)));
const view = z.materialize(query);
view.addListener((current, resultType) => {
  rows = current.map(r => ({id: r.id, owner: r.owner, title: r.title}));
  emit('rows', {rows, resultType});
});

// ------------------------------------------------------------------------------------------
// Commands
// ------------------------------------------------------------------------------------------

/** Mutations this client made: CRUD mutation IDs count up from 1, one per mutate call. */
let mutations = 0;

async function mutate(kind, row) {
  if (!row || typeof row !== 'object') throw new Error(`${kind} needs a "row" object`);
  const id = ++mutations;
  await z.mutate.item[kind](kind === 'delete' ? {id: row.id} : row);
  return {mutationID: id};
}

const commands = {
  insert: c => mutate('insert', c.row),
  update: c => mutate('update', c.row),
  upsert: c => mutate('upsert', c.row),
  delete: c => mutate('delete', c.row),
  complete: async () => {
    await z.run(query, {type: 'complete'});
    return {};
  },
  auth: async c => {
    await z.connection.connect({auth: c.token});
    return {};
  },
  status: async () => ({...stateOf(z.connection.state.current), rows, sockets, lmid: ackedLmid}),
  close: async () => {
    await close();
    return {};
  },
};

let closing = null;
function close() {
  closing ??= z.close().then(() => {
    emit('closed');
    process.exit(0);
  });
  return closing;
}

async function run(line) {
  let c;
  try {
    c = JSON.parse(line);
  } catch (e) {
    emit('failed', {cmd: null, error: `not JSON: ${line}`});
    return;
  }
  const handler = commands[c?.cmd];
  if (!handler) {
    emit('failed', {cmd: c?.cmd ?? null, seq: c?.seq ?? null, error: `unknown command ${safeJson(c)}`});
    return;
  }
  try {
    const result = await handler(c);
    if (c.cmd !== 'close') emit('ok', {cmd: c.cmd, seq: c.seq ?? null, ...result});
  } catch (e) {
    emit('failed', {cmd: c.cmd, seq: c.seq ?? null, error: String(e?.stack ?? e)});
  }
}

let queue = Promise.resolve();
const input = createInterface({input: process.stdin});
input.on('line', line => {
  if (line.trim()) queue = queue.then(() => run(line));
});
input.on('close', () => {
  queue = queue.then(close);
});

process.on('unhandledRejection', e => {
  emit('fatal', {error: String(e?.stack ?? e)});
  process.exit(1);
});
