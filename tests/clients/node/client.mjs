// A real third-party client against syncgate: Node `ws` (zero-cache's own WebSocket stack and
// the one the Zero client uses under Node), through the full path.
//
// Run by tests/real_clients.rs: node client.mjs <url> <protocol> <wsid>. It connects offering
// the protocol value as its only subprotocol (as the Zero client does; `ws` also offers
// permessage-deflate, which the server may decline), and checks:
//   - the handshake completes with the subprotocol echoed verbatim;
//   - the first message is ["connected", {wsid, timestamp}];
//   - ["ping",{}] is answered with ["pong",{}], also when padded to 4 KiB (compressed by the
//     client when permessage-deflate was negotiated);
//   - a WebSocket-level ping is answered with a pong;
//   - a normal close (1000) is answered with a close 1000.
// It prints one line per step (and the negotiated extensions) and exits 0 only if every check
// passed.

import WebSocket from 'ws';

const [url, protocol, wsid] = process.argv.slice(2);
if (!url || !protocol || !wsid) {
  console.error('usage: node client.mjs <url> <protocol> <wsid>');
  process.exit(2);
}

const fail = (why) => {
  console.error(`FAILED: ${why}`);
  process.exit(1);
};
const timer = setTimeout(() => fail('timed out'), 10_000);

const ws = new WebSocket(url, [protocol]);
let step = 'connected';

ws.on('error', (e) => fail(`socket error: ${e.message}`));
ws.on('open', () => {
  if (ws.protocol !== protocol) fail(`subprotocol echo: ${ws.protocol}`);
  console.log('handshake ok');
  console.log(`extensions: ${ws.extensions}`);
});
ws.on('message', (data, isBinary) => {
  if (isBinary) fail('binary frame at protocol 51');
  const msg = JSON.parse(data.toString());
  // After initConnection the server pokes the client; this session looks past the pokes.
  if (step !== 'connected' && ['pokeStart', 'pokePart', 'pokeEnd'].includes(msg[0])) return;
  if (step === 'connected') {
    if (msg[0] !== 'connected' || msg[1].wsid !== wsid) fail(`first message: ${data}`);
    if (!Number.isInteger(msg[1].timestamp) || Math.abs(msg[1].timestamp - Date.now()) > 60_000) {
      fail(`timestamp: ${data}`);
    }
    console.log('connected ok');
    step = 'pong';
    ws.send(JSON.stringify(['ping', {}]));
  } else if (step === 'pong') {
    if (JSON.stringify(msg) !== '["pong",{}]') fail(`answer to ping: ${data}`);
    console.log('ping/pong ok');
    step = 'big-pong';
    ws.send('["ping",{}' + ' '.repeat(4096) + ']');
  } else if (step === 'big-pong') {
    if (JSON.stringify(msg) !== '["pong",{}]') fail(`answer to a big ping: ${data}`);
    console.log('big ping ok');
    step = 'ws-pong';
    ws.ping(Buffer.from('node'));
  } else {
    fail(`unexpected message: ${data}`);
  }
});
ws.on('pong', (data) => {
  if (step !== 'ws-pong' || data.toString() !== 'node') fail(`unexpected pong: ${data}`);
  console.log('websocket ping ok');
  step = 'close';
  ws.close(1000);
});
ws.on('close', (code) => {
  if (step !== 'close') fail(`closed early with ${code}`);
  if (code !== 1000) fail(`close code ${code}`);
  console.log('close ok');
  clearTimeout(timer);
  process.exit(0);
});
