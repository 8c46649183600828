// The real Zero client (@rocicorp/zero 1.9.0) in a browser page: tests/browser.rs opens
// index.html?... in headless Chromium and reads what this script shows.
//
// Query string (the test builds it):
//   server    the sync server's origin, e.g. http://127.0.0.1:4848 (required)
//   userID    the client's userID (default "anon")
//   auth      a token for userID (absent: no token)
//   table     the table to query (default "issue")
//   columns   its columns, comma-separated, all strings; the first is the primary key
//             (default "id,title")
//   kvStore   "idb" (default: the browser's IndexedDB, as an app uses it) or "mem"
//
// What it shows:
//   #state            the connection state's name (connecting, connected, needs-auth, ...)
//   #rows tbody       one <tr> per row of the query (the whole table, by primary key), one
//                     <td data-column=NAME> per column
//   window.syncgate   the same for the driver: {state, states, clientID, clientGroupID,
//                     rows, resultType, log, failure}; `log` holds the console, Zero's own
//                     log and uncaught errors, so a failing test can print them.

import {Zero, createSchema, string, table} from '@rocicorp/zero';

const params = new URLSearchParams(location.search);
const page = {
  state: 'loading',
  states: [],
  clientID: null,
  clientGroupID: null,
  rows: [],
  resultType: 'unknown',
  log: [],
  failure: null,
};
window.syncgate = page;

function text(args) {
  return args
    .map(a => {
      if (a instanceof Error) return a.stack ?? String(a);
      if (typeof a === 'string') return a;
      try {
        return JSON.stringify(a);
      } catch {
        return String(a);
      }
    })
    .join(' ');
}

function record(kind, args) {
  page.log.push(`${new Date().toISOString()} [${kind}] ${text(args)}`);
}

// Everything the page prints, kept for the driver (the console itself stays as it was).
for (const level of ['log', 'info', 'warn', 'error', 'debug']) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    record(`console.${level}`, args);
    original(...args);
  };
}
window.addEventListener('error', e => record('uncaught', [e.error ?? e.message]));
window.addEventListener('unhandledrejection', e => record('unhandled rejection', [e.reason]));

function fail(e) {
  page.failure = String(e?.stack ?? e);
  record('failure', [e]);
  document.getElementById('state').textContent = 'failed';
}

function render(columns) {
  const body = document.querySelector('#rows tbody');
  body.replaceChildren(
    ...page.rows.map(row => {
      const tr = document.createElement('tr');
      tr.dataset.key = String(row[columns[0]]);
      for (const c of columns) {
        const td = document.createElement('td');
        td.dataset.column = c;
        td.textContent = String(row[c]);
        tr.append(td);
      }
      return tr;
    }),
  );
}

try {
  const server = params.get('server');
  if (!server) throw new Error('no `server` in the query string');
  const tableName = params.get('table') || 'issue';
  const columns = (params.get('columns') || 'id,title').split(',');
  const head = document.querySelector('#rows thead');
  const tr = document.createElement('tr');
  for (const c of columns) {
    const th = document.createElement('th');
    th.textContent = c;
    tr.append(th);
  }
  head.replaceChildren(tr);

  const schema = createSchema({
    tables: [
      table(tableName)
        .columns(Object.fromEntries(columns.map(c => [c, string()])))
        .primaryKey(columns[0]),
    ],
    enableLegacyQueries: true,
    enableLegacyMutators: true,
  });
  const z = new Zero({
    server,
    userID: params.get('userID') || 'anon',
    auth: params.get('auth') ?? undefined,
    schema,
    kvStore: params.get('kvStore') || 'idb',
    logLevel: 'info',
    logSink: {
      log(level, context, ...args) {
        record(`zero ${level}`, [context ?? {}, ...args]);
      },
    },
  });
  window.zero = z;
  page.clientID = z.clientID;
  z.clientGroupID.then(id => {
    page.clientGroupID = id;
    document.body.dataset.clientGroupId = id;
  }, fail);
  document.body.dataset.clientId = z.clientID;

  const onState = s => {
    page.state = s.name;
    page.states.push(s.name);
    document.getElementById('state').textContent = s.name;
  };
  onState(z.connection.state.current);
  z.connection.state.subscribe(onState);

  const view = z.materialize(z.query[tableName].orderBy(columns[0], 'asc'));
  view.addListener((rows, resultType) => {
    page.rows = rows.map(r => Object.fromEntries(columns.map(c => [c, r[c]])));
    page.resultType = resultType;
    render(columns);
  });
} catch (e) {
  fail(e);
}
