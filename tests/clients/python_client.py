"""A real third-party client against syncgate: Python `websockets`, through the full path.

Run by tests/real_clients.rs, which starts the daemon and passes the URL, the
Sec-WebSocket-Protocol value and the wsid. The script connects offering that value as its
only subprotocol (as the Zero client does), and checks:
  - the handshake completes and the server echoed the subprotocol verbatim;
  - the first message is ["connected", {"wsid": <wsid>, "timestamp": <int ms>}];
  - ["ping",{}] is answered with ["pong",{}], also when padded to 4 KiB (compressed by the
    client when permessage-deflate was negotiated);
  - a WebSocket-level ping is answered with a pong;
  - a normal close (1000) is answered with a close 1000.
It prints one line per step (and the negotiated extensions) and exits 0 only if every
check passed.
"""

import argparse
import json
import sys
import time

from websockets.sync.client import connect

TIMEOUT = 5.0


POKE_TAGS = ("pokeStart", "pokePart", "pokeEnd")


def recv_skipping_pokes(ws):
    """The next message that is not part of a poke (the server pokes after initConnection)."""
    while True:
        msg = json.loads(ws.recv(timeout=TIMEOUT))
        if msg[0] not in POKE_TAGS:
            return msg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--wsid", required=True)
    args = ap.parse_args()

    with connect(args.url, subprotocols=[args.protocol], open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        assert ws.subprotocol == args.protocol, f"subprotocol echo: {ws.subprotocol!r}"
        print("handshake ok", flush=True)
        print(f"extensions: {ws.response.headers.get('Sec-WebSocket-Extensions', '')}", flush=True)

        connected = json.loads(ws.recv(timeout=TIMEOUT))
        assert connected[0] == "connected", connected
        assert connected[1]["wsid"] == args.wsid, connected
        ts = connected[1]["timestamp"]
        assert isinstance(ts, int) and abs(ts - time.time() * 1000) < 60_000, connected
        print("connected ok", flush=True)

        ws.send(json.dumps(["ping", {}]))
        pong = recv_skipping_pokes(ws)
        assert pong == ["pong", {}], pong
        print("ping/pong ok", flush=True)

        ws.send('["ping",{}' + " " * 4096 + "]")
        pong = recv_skipping_pokes(ws)
        assert pong == ["pong", {}], pong
        print("big ping ok", flush=True)

        assert ws.ping(b"py").wait(TIMEOUT), "no answer to a WebSocket ping"
        print("websocket ping ok", flush=True)

        ws.close(1000)
        assert ws.close_code == 1000, f"close code {ws.close_code}"
        print("close ok", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - any failure is a failed check
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
