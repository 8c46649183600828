// The real Zero client (@rocicorp/zero 1.9.0), headless on Node, against a syncgate daemon:
// the driver of tests/zero_client.rs.
//
//   node zero_client.mjs SCENARIO
//
// Settings come from the environment (the Rust test sets them):
//   ZERO_SERVER      the daemon's origin, e.g. http://127.0.0.1:4848
//   ZERO_USER        the userID of the clients (default "anon")
//   ZERO_TOKEN       a valid token for ZERO_USER (auth scenario; a client of ZERO_USER_2
//                    also offers it, as another user's token)
//   ZERO_BAD_TOKEN   a token the daemon must refuse (auth scenario)
//   ZERO_TOKEN_2     a valid token for ZERO_USER_2 (auth scenario, the recovery)
//   ZERO_USER_2      the userID of the auth scenario's second client
//
// What the clients observe goes to stdout as one JSON object per line ({"event": ...}); the
// Rust test asserts on it. Zero's own log goes to stderr (shown when a test fails). A scenario
// that needs the test to act in the middle (kill a worker) prints an event and waits for a
// line on stdin. Every wait has a deadline: a step that does not happen fails the script
// with an {"event":"failed"} line and exit code 1, never a hang.
//
// Scenarios:
//   group     two clients of one group: insert, update, upsert and delete from one are seen
//             by the other (and an insert the other way); both stay connected across
//             several of the client's 5 s ping intervals.
//   catchup   one client goes offline, the other mutates, the first reconnects with its
//             baseCookie and receives only what it missed. With ZERO_DROP_UNAPPLIED=1 the
//             socket drops right after a poke arrived and before the client applied it
//             (the client applies pokes on a setTimeout and discards them on disconnect),
//             so it reconnects with the cookie before that poke.
//   auth      a valid token connects; another user's token and a token with a bad signature
//             end in `needs-auth`, and a valid one given through `connection.connect({auth})`
//             recovers the latter.
//   ratelimit five mutations against a limit of three: the client stays connected and the
//             refused ones land with its next push once the window has passed.
//   kill      one client mutates; once the server acknowledged it, the test kills the
//             worker; the client reconnects, keeps its data, and goes on mutating.

import {WebSocket as RealWebSocket} from 'ws';
import {Zero, createSchema, string, table} from '@rocicorp/zero';

/** How long one awaited step may take. Generous: tests run in parallel on two cores. */
const STEP_MS = 10_000;
/** How long a reconnect may take: the client may sleep 5 s after losing its socket. */
const RECONNECT_MS = 20_000;
/** How long the group scenario stays idle: two and a half of the client's ping intervals. */
const IDLE_MS = 12_500;

const SERVER = process.env.ZERO_SERVER;
const USER = process.env.ZERO_USER || 'anon';

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({event, ...fields}) + '\n');
}

// ------------------------------------------------------------------------------------------
// Waiting on what the clients observe
// ------------------------------------------------------------------------------------------

/** Checks of pending `until`s, rerun whenever a client observes anything. */
const waiters = new Set();
function changed() {
  for (const check of [...waiters]) check();
}

/** Resolves with the first truthy value of `pred()`, rechecked on every observation. */
function until(what, pred, ms = STEP_MS) {
  return new Promise((resolve, reject) => {
    const done = () => {
      clearTimeout(timer);
      waiters.delete(check);
    };
    const check = () => {
      let value;
      try {
        value = pred();
      } catch (e) {
        done();
        reject(e);
        return;
      }
      if (value) {
        done();
        resolve(value);
      }
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    waiters.add(check);
    check();
  });
}

// ------------------------------------------------------------------------------------------
// A WebSocket that records what it carries and that the scenario can cut
// ------------------------------------------------------------------------------------------

/** Every socket any client opened, in order. */
const opened = [];
/** clientID -> promise that must settle before the client's next socket may connect. */
const gates = new Map();
/** clientIDs whose socket goes offline the moment its next complete poke arrives. */
const dropAtPokeEnd = new Set();

/**
 * The WebSocket the Zero client gets. It is the `ws` package's, behind a thin layer that
 * records the connect URL and every message, and holds a new socket back while its client
 * is "offline" (see `goOffline`), the way a network outage looks to the client.
 */
class RecordingWebSocket {
  constructor(url, protocols) {
    this.url = url;
    const params = Object.fromEntries(new URL(url).searchParams);
    /** What the socket carried: {clientID, params, received, sent, closed}. */
    this.record = {clientID: params.clientID, params, received: [], sent: [], closed: null};
    opened.push(this);
    this.listeners = [];
    this.real = null;
    this.abandoned = false;
    const gate = gates.get(params.clientID) ?? Promise.resolve();
    gate.then(() => {
      if (this.abandoned) return;
      this.real = new RealWebSocket(url, protocols);
      this.real.binaryType = 'nodebuffer';
      this.real.addEventListener('message', e => {
        this.record.received.push(decode(e.data));
        changed();
      });
      this.real.addEventListener('close', e => {
        this.record.closed = {code: e.code, reason: e.reason};
        changed();
      });
      for (const [type, listener] of this.listeners) this.real.addEventListener(type, listener);
      // After the client's own listeners: the client has buffered the poke, and the close
      // (a next tick) reaches it before its poke timer.
      this.real.addEventListener('message', e => {
        const id = this.record.clientID;
        if (dropAtPokeEnd.has(id) && decode(e.data)?.[0] === 'pokeEnd') {
          dropAtPokeEnd.delete(id);
          goOffline(id);
        }
      });
      changed();
    });
  }
  addEventListener(type, listener) {
    this.listeners.push([type, listener]);
    this.real?.addEventListener(type, listener);
  }
  removeEventListener(type, listener) {
    this.listeners = this.listeners.filter(([t, l]) => t !== type || l !== listener);
    this.real?.removeEventListener(type, listener);
  }
  send(data) {
    this.record.sent.push(decode(data));
    this.real?.send(data);
  }
  close(code) {
    if (this.real) this.real.close(code);
    else this.abandoned = true;
  }
  get readyState() {
    return this.real ? this.real.readyState : 0;
  }
}

/** A message as JSON, or a description of one that is not (a binary frame is one). */
function decode(data) {
  if (typeof data !== 'string') {
    return {binary: true, firstByte: data[0], length: data.length};
  }
  try {
    return JSON.parse(data);
  } catch {
    return {unparsable: data};
  }
}

/** Cuts the client's socket and holds its reconnects back until `goOnline`. */
function goOffline(clientID) {
  let open;
  const gate = new Promise(resolve => (open = resolve));
  gates.set(clientID, gate);
  gate.open = open;
  for (const ws of liveSockets(clientID)) ws.real?.terminate();
}

function goOnline(clientID) {
  gates.get(clientID)?.open();
  gates.delete(clientID);
}

globalThis.WebSocket = RecordingWebSocket;

function liveSockets(clientID) {
  return opened.filter(w => w.record.clientID === clientID && w.record.closed === null);
}

/** The records of the client's sockets, oldest first. */
function socketsOf(clientID) {
  return opened.map(w => w.record).filter(s => s.clientID === clientID);
}

/** Every message the client received on all its sockets, in order. */
function receivedBy(clientID) {
  return socketsOf(clientID).flatMap(s => s.received);
}

/** The highest last mutation ID the server acknowledged for `clientID`, seen by `observer`. */
function ackedFor(observer, clientID) {
  let lmid = 0;
  for (const m of receivedBy(observer)) {
    const id = m?.[0] === 'pokePart' ? m[1].lastMutationIDChanges?.[clientID] : undefined;
    if (id !== undefined) lmid = Math.max(lmid, id);
  }
  return lmid;
}

/** How many complete pokes `clientID` received. */
function pokeEndsOf(clientID) {
  return receivedBy(clientID).filter(m => m?.[0] === 'pokeEnd' && !m[1].cancel).length;
}

/** The cookie of the last poke `clientID` received complete (its baseCookie once applied). */
function lastCookie(clientID) {
  return cookieAfter(receivedBy(clientID));
}

/** The cookie of the last complete poke among `messages`. */
function cookieAfter(messages) {
  const ends = messages.filter(m => m?.[0] === 'pokeEnd' && !m[1].cancel);
  return ends.length ? ends[ends.length - 1][1].cookie : null;
}

function errorsOf(clientID) {
  return receivedBy(clientID).filter(m => m?.[0] === 'error');
}

/** The pokes of one socket: [{start, parts, end}], in order. */
function pokesOf(record) {
  const pokes = [];
  let current = null;
  for (const m of record.received) {
    if (m?.[0] === 'pokeStart') current = {start: m[1], parts: [], end: null};
    else if (m?.[0] === 'pokePart' && current) current.parts.push(m[1]);
    else if (m?.[0] === 'pokeEnd' && current) {
      current.end = m[1];
      pokes.push(current);
      current = null;
    }
  }
  return pokes;
}

// ------------------------------------------------------------------------------------------
// Zero clients
// ------------------------------------------------------------------------------------------

const issue = table('issue')
  .columns({id: string(), title: string()})
  .primaryKey('id');
const schema = createSchema({
  tables: [issue],
  enableLegacyQueries: true,
  enableLegacyMutators: true,
});

/** Zero's log, to stderr, prefixed with the client's name. */
function logSink(name) {
  return {
    log(level, context, ...args) {
      const text = args
        .map(a => (a instanceof Error ? a.stack : typeof a === 'string' ? a : safeJson(a)))
        .join(' ');
      process.stderr.write(`[${name} ${level}] ${safeJson(context)} ${text}\n`);
    },
  };
}

function safeJson(v) {
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

/**
 * A Zero client with its query on `issue` materialized; `states` lists every connection
 * state it went through, `rows` is its view of the table.
 */
function makeClient(name, {userID = USER, auth, storageKey = 'syncgate-test'} = {}) {
  const client = {name, states: [], rows: [], resultType: 'unknown', updateNeeded: []};
  client.z = new Zero({
    server: SERVER,
    userID,
    auth,
    storageKey,
    schema,
    kvStore: 'mem',
    logLevel: 'info',
    logSink: logSink(name),
    onUpdateNeeded: reason => {
      client.updateNeeded.push(reason);
      changed();
    },
    onClientStateNotFound: () => {
      client.updateNeeded.push({type: 'ClientStateNotFound'});
      changed();
    },
  });
  client.id = client.z.clientID;
  const record = state => {
    client.states.push({name: state.name, reason: state.reason ?? null});
    changed();
  };
  record(client.z.connection.state.current);
  client.z.connection.state.subscribe(record);
  client.view = client.z.materialize(client.z.query.issue.orderBy('id', 'asc'));
  client.view.addListener((rows, resultType) => {
    client.rows = rows.map(r => ({id: r.id, title: r.title}));
    client.resultType = resultType;
    changed();
  });
  return client;
}

const state = c => c.z.connection.state.current.name;

async function connected(c, ms = STEP_MS) {
  await until(`${c.name} connected`, () => state(c) === 'connected', ms);
}

/** Waits until `c`'s view of the table is exactly `rows`. */
async function sees(c, rows, ms = STEP_MS) {
  const want = JSON.stringify(rows);
  await until(`${c.name} to see ${want} (sees ${JSON.stringify(c.rows)})`, () => JSON.stringify(c.rows) === want, ms);
}

/** Waits until `observer` received the server's acknowledgement of `author`'s mutation `id`. */
async function acked(observer, author, id) {
  await until(`${observer.name} to see ${author.name}'s mutation ${id} acknowledged`, () => ackedFor(observer.id, author.id) >= id);
}

function summary(c) {
  return {
    name: c.name,
    clientID: c.id,
    states: c.states.map(s => s.name),
    rows: c.rows,
    errors: errorsOf(c.id),
    sockets: socketsOf(c.id).length,
    updateNeeded: c.updateNeeded,
  };
}

/** Counts the client's pings and the server's pongs, over all its sockets. */
function pingsOf(c) {
  const sent = socketsOf(c.id).flatMap(s => s.sent).filter(m => m?.[0] === 'ping').length;
  const pongs = receivedBy(c.id).filter(m => m?.[0] === 'pong').length;
  return {pings: sent, pongs};
}

// ------------------------------------------------------------------------------------------
// Scenarios
// ------------------------------------------------------------------------------------------

async function group() {
  const a = makeClient('A');
  const b = makeClient('B');
  await connected(a);
  await connected(b);
  const [groupA, groupB] = await Promise.all([a.z.clientGroupID, b.z.clientGroupID]);
  emit('connected', {a: a.id, b: b.id, groupA, groupB});
  // `complete` needs the server's gotQueriesPatch for the query.
  await Promise.all([a.z.run(a.z.query.issue, {type: 'complete'}), b.z.run(b.z.query.issue, {type: 'complete'})]);
  emit('complete');

  await a.z.mutate.issue.insert({id: 'i1', title: 'one'});
  await sees(b, [{id: 'i1', title: 'one'}]);
  await acked(b, a, 1);
  emit('inserted', {b: b.rows});
  await a.z.mutate.issue.update({id: 'i1', title: 'two'});
  await sees(b, [{id: 'i1', title: 'two'}]);
  await acked(b, a, 2);
  emit('updated', {b: b.rows});
  await a.z.mutate.issue.upsert({id: 'i1', title: 'three'});
  await sees(b, [{id: 'i1', title: 'three'}]);
  await acked(b, a, 3);
  emit('upserted', {b: b.rows});
  await a.z.mutate.issue.delete({id: 'i1'});
  await sees(b, []);
  await acked(b, a, 4);
  emit('deleted', {b: b.rows});
  // One mutation from B, so both directions are covered.
  await b.z.mutate.issue.insert({id: 'i2', title: 'from b'});
  await sees(a, [{id: 'i2', title: 'from b'}]);
  await acked(a, b, 1);
  emit('reverse', {a: a.rows});

  // Idle: the client pings after 5 s without a message and gives up 5 s after a ping that
  // is not answered; a dropped socket would show as a state change and a second socket.
  const statesBefore = [a.states.length, b.states.length];
  const pingsBefore = [pingsOf(a), pingsOf(b)];
  await new Promise(resolve => setTimeout(resolve, IDLE_MS));
  emit('idle', {
    idleMs: IDLE_MS,
    a: {...summary(a), statesDuringIdle: a.states.slice(statesBefore[0]).map(s => s.name), before: pingsBefore[0], after: pingsOf(a)},
    b: {...summary(b), statesDuringIdle: b.states.slice(statesBefore[1]).map(s => s.name), before: pingsBefore[1], after: pingsOf(b)},
  });
  await Promise.all([a.z.close(), b.z.close()]);
}

async function catchup() {
  const a = makeClient('A');
  const b = makeClient('B');
  await connected(a);
  await connected(b);
  await Promise.all([a.z.run(a.z.query.issue, {type: 'complete'}), b.z.run(b.z.query.issue, {type: 'complete'})]);
  await a.z.mutate.issue.insert({id: 'i1', title: 'seen by both'});
  await sees(b, [{id: 'i1', title: 'seen by both'}]);
  await acked(a, a, 1);
  await acked(b, a, 1);
  // Counted before any drop: a reconnect attempt may open (gated) sockets after it.
  const socketsBefore = socketsOf(a.id).length;
  if (process.env.ZERO_DROP_UNAPPLIED) {
    // One more poke for A (its answer to a new query), cut off as it arrives.
    const pokesBefore = pokeEndsOf(a.id);
    dropAtPokeEnd.add(a.id);
    a.z.run(a.z.query.issue.where('id', 'i1'), {type: 'complete'}).catch(() => {});
    await until('A to receive one more poke', () => pokeEndsOf(a.id) > pokesBefore);
  }
  // Everything so far reached A's socket. Its last cookie is what A presents on reconnect
  // unless the last pokes were still in the client's debounce buffer (applied on a
  // setTimeout) when the socket dropped: the client discards those and presents the cookie
  // it applied. The test checks the catch-up against the cookie A presents.
  const heldCookie = lastCookie(a.id);
  emit('offline', {a: a.id, b: b.id, heldCookie});

  if (!gates.has(a.id)) goOffline(a.id);
  await until('A to notice it is offline', () => state(a) !== 'connected');
  await b.z.mutate.issue.insert({id: 'i2', title: 'missed by A'});
  await acked(b, b, 1);
  emit('missed', {cookieOfB: lastCookie(b.id)});

  goOnline(a.id);
  await connected(a, RECONNECT_MS);
  await sees(a, [{id: 'i1', title: 'seen by both'}, {id: 'i2', title: 'missed by A'}]);
  const reconnect = socketsOf(a.id)[socketsBefore];
  emit('reconnected', {
    heldCookie,
    before: socketsOf(a.id).slice(0, socketsBefore).flatMap(s => s.received),
    params: reconnect.params,
    pokes: pokesOf(reconnect),
    received: reconnect.received,
    a: summary(a),
    b: summary(b),
  });
  await Promise.all([a.z.close(), b.z.close()]);
}

async function auth() {
  const good = makeClient('good', {auth: process.env.ZERO_TOKEN});
  await connected(good);
  emit('good', summary(good));

  // A valid token of another user: its `sub` is not this client's userID.
  const user2 = process.env.ZERO_USER_2;
  const other = makeClient('other', {userID: user2, storageKey: 'other', auth: process.env.ZERO_TOKEN});
  await until('the wrong-user client to stop', () => state(other) === 'needs-auth' || state(other) === 'error');
  emit('wrong-user', {...summary(other), state: other.z.connection.state.current});

  // A token that fails verification.
  const bad = makeClient('bad', {userID: user2, auth: process.env.ZERO_BAD_TOKEN});
  await until('the refused client to stop', () => state(bad) === 'needs-auth' || state(bad) === 'error');
  emit('refused', {...summary(bad), state: bad.z.connection.state.current});

  // New credentials through the documented API bring it back.
  bad.z.connection.connect({auth: process.env.ZERO_TOKEN_2});
  await connected(bad);
  await bad.z.run(bad.z.query.issue, {type: 'complete'});
  emit('recovered', summary(bad));
  await Promise.all([good.z.close(), other.z.close(), bad.z.close()]);
}

async function kill() {
  const a = makeClient('A');
  await connected(a);
  await a.z.run(a.z.query.issue, {type: 'complete'});
  await a.z.mutate.issue.insert({id: 'k1', title: 'before the kill'});
  await acked(a, a, 1);
  const socketsBefore = socketsOf(a.id).length;
  emit('acked', {clientID: a.id, clientGroupID: await a.z.clientGroupID, cookie: lastCookie(a.id)});

  // The test kills the worker now and says when the supervisor respawned it.
  const line = await nextStdinLine();
  emit('resumed', {line});
  await until('A to lose its socket', () => state(a) !== 'connected' || socketsOf(a.id).length > socketsBefore, RECONNECT_MS);
  await until('A to reconnect', () => state(a) === 'connected' && socketsOf(a.id).length > socketsBefore, RECONNECT_MS);
  await a.z.run(a.z.query.issue, {type: 'complete'});
  const keptAfterReconnect = a.rows;
  await a.z.mutate.issue.insert({id: 'k2', title: 'after the kill'});
  await acked(a, a, 2);
  await sees(a, [{id: 'k1', title: 'before the kill'}, {id: 'k2', title: 'after the kill'}]);
  const reconnect = socketsOf(a.id)[socketsBefore];
  emit('after', {
    // What the client held when its socket died (it may have got pokes after the ack).
    heldCookie: cookieAfter(socketsOf(a.id)[socketsBefore - 1].received),
    params: reconnect.params,
    received: reconnect.received,
    pokes: pokesOf(reconnect),
    keptAfterReconnect,
    a: summary(a),
  });
  await a.z.close();
}

async function ratelimit() {
  const a = makeClient('A');
  await connected(a);
  await a.z.run(a.z.query.issue, {type: 'complete'});
  const statesBefore = a.states.length;
  // Five at once against a limit of three per window: the server refuses the fourth (the
  // client sends one mutation per push) and the fifth.
  for (let i = 1; i <= 5; i++) a.z.mutate.issue.insert({id: `r${i}`, title: 'x'});
  await acked(a, a, 3);
  const limited = await until('a MutationRateLimited error', () =>
    errorsOf(a.id).find(e => e[1].kind === 'MutationRateLimited'),
  );
  emit('limited', {error: limited[1], acked: ackedFor(a.id, a.id)});
  // The client re-sends refused mutations with its next push; wait out the window the
  // server named, then mutate once more.
  const retryMs = Number(/retry in (\d+) ms/.exec(limited[1].message)?.[1]);
  if (!(retryMs > 0 && retryMs <= 10_000)) throw new Error(`no usable retry time in ${limited[1].message}`);
  await new Promise(resolve => setTimeout(resolve, retryMs + 100));
  a.z.mutate.issue.insert({id: 'r6', title: 'x'});
  await acked(a, a, 6);
  await sees(a, ['r1', 'r2', 'r3', 'r4', 'r5', 'r6'].map(id => ({id, title: 'x'})));
  emit('landed', {...summary(a), statesSinceMutating: a.states.slice(statesBefore).map(s => s.name)});
  await a.z.close();
}

/** The next line on stdin (the test's go-ahead). */
function nextStdinLine() {
  return new Promise((resolve, reject) => {
    let buffered = '';
    const onData = chunk => {
      buffered += chunk;
      const nl = buffered.indexOf('\n');
      if (nl >= 0) {
        process.stdin.off('data', onData);
        process.stdin.pause();
        resolve(buffered.slice(0, nl));
      }
    };
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', onData);
    process.stdin.once('end', () => reject(new Error('stdin closed before the go-ahead')));
  });
}

const scenarios = {group, catchup, auth, kill, ratelimit};
const name = process.argv[2];
if (!scenarios[name] || !SERVER) {
  process.stderr.write(`usage: ZERO_SERVER=http://HOST:PORT node zero_client.mjs ${Object.keys(scenarios).join('|')}\n`);
  process.exit(2);
}
try {
  await scenarios[name]();
  emit('done');
  process.exit(0);
} catch (e) {
  emit('failed', {
    error: String(e?.stack ?? e),
    sockets: opened.map(w => w.record),
  });
  process.exit(1);
}
