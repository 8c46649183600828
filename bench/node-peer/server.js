'use strict';
// The Node `ws` peer of the syncgate benchmarks: zero-cache's own WebSocket stack, with
// the protocol subset the scenarios use (docs/PROTOCOL.md): the Sec-WebSocket-Protocol header
// echoed, `connected`, ping -> pong, and a CRUD push -> pokeStart/pokePart/pokeEnd to
// every connection of the push's client group. No JWT work.
//
// Written as a fast ws server is written: an http server's 'upgrade' event routes the
// sync path (as zero-cache does) and hands the socket to a `noServer` WebSocketServer;
// messages are JSON.parse'd; a poke is stringified once and the same Buffer is sent to
// every member; constant replies are pre-made Buffers.
//
// Usage: node server.js 127.0.0.1:PORT [--deflate]
// bufferutil (the optional native add-on) is used when installed; WS_NO_BUFFER_UTIL=1
// turns it off, which is how the benchmark measures ws with and without it.
// Prints `ready listen=ADDR` on stderr.

const http = require('node:http');
const { WebSocketServer } = require('ws');

const [host, port] = (process.argv[2] || '127.0.0.1:4851').split(':');
const deflate = process.argv.includes('--deflate');

// The same limits and compression settings as syncgate's defaults (docs/SECURITY.md, limits table): 10 MiB
// messages; when compression is on, window bits at most 13, a 1 KiB threshold and no
// context takeover either way.
const wss = new WebSocketServer({
  noServer: true,
  clientTracking: false,
  maxPayload: 10 * 1024 * 1024,
  perMessageDeflate: deflate
    ? {
        serverNoContextTakeover: true,
        clientNoContextTakeover: true,
        serverMaxWindowBits: 13,
        clientMaxWindowBits: 13,
        threshold: 1024,
      }
    : false,
  // The whole header value is one token; echo it verbatim.
  handleProtocols: (protocols) => protocols.values().next().value,
});

const PONG = Buffer.from('["pong",{}]');
const TEXT = { binary: false };

/** clientGroupID -> { members: Set<WebSocket>, version: number, lastMutation: Map } */
const groups = new Map();

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  const sync = /^(?:\/[^/]+)?\/sync\/v\d+\/[^/]+$/.test(url.pathname);
  const clientID = url.searchParams.get('clientID');
  const groupID = url.searchParams.get('clientGroupID');
  const wsid = url.searchParams.get('wsid') || '';
  if (!sync || !clientID || !groupID || !req.headers['sec-websocket-protocol']) {
    socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, groupID, wsid));
});

function onConnection(ws, groupID, wsid) {
  let group = groups.get(groupID);
  if (!group) {
    group = { members: new Set(), version: 0, lastMutation: new Map() };
    groups.set(groupID, group);
  }
  group.members.add(ws);
  ws.send(JSON.stringify(['connected', { wsid, timestamp: Date.now() }]));

  ws.on('message', (data, isBinary) => {
    let tag, body;
    try {
      [tag, body] = JSON.parse(data);
    } catch (e) {
      ws.close(1002, 'invalid message');
      return;
    }
    if (tag === 'ping') {
      ws.send(PONG, TEXT);
    } else if (tag === 'push') {
      try {
        push(groupID, group, body);
      } catch (e) {
        ws.close(1011, String(e.message).slice(0, 120));
      }
    }
  });

  ws.on('close', () => {
    group.members.delete(ws);
    if (group.members.size === 0) groups.delete(groupID);
  });
}

// Applies a push in order per client (duplicates skipped, gaps refused, as zero-cache
// does) and pokes every member of the group.
function push(groupID, group, body) {
  if (body.clientGroupID !== groupID) throw new Error('InvalidPush: wrong clientGroupID');
  const changes = {};
  const rows = [];
  let applied = false;
  for (const m of body.mutations) {
    const last = group.lastMutation.get(m.clientID) || 0;
    if (m.id <= last) continue;
    if (m.id !== last + 1) throw new Error(`mutation ${m.id} skips ${last + 1}`);
    group.lastMutation.set(m.clientID, m.id);
    changes[m.clientID] = m.id;
    applied = true;
    if (m.type !== 'crud') continue;
    for (const arg of m.args) {
      for (const op of arg.ops) {
        rows.push(
          op.op === 'delete'
            ? { op: 'del', tableName: op.tableName, id: op.value }
            : { op: 'put', tableName: op.tableName, value: op.value },
        );
      }
    }
  }
  if (!applied) return;
  const base = group.version === 0 ? null : String(group.version);
  const pokeID = String(++group.version);
  const poke = [
    Buffer.from(JSON.stringify(['pokeStart', { pokeID, baseCookie: base }])),
    Buffer.from(
      JSON.stringify(['pokePart', { pokeID, lastMutationIDChanges: changes, rowsPatch: rows }]),
    ),
    Buffer.from(JSON.stringify(['pokeEnd', { pokeID, cookie: pokeID }])),
  ];
  for (const member of group.members) {
    for (const msg of poke) member.send(msg, TEXT);
  }
}

server.listen(Number(port), host, 16384, () => {
  const a = server.address();
  const bu = process.env.WS_NO_BUFFER_UTIL ? 'off' : 'on';
  process.stderr.write(`ready listen=${a.address}:${a.port} bufferutil=${bu} deflate=${deflate}\n`);
});
