#!/usr/bin/env python3
"""A producer for weir's socket receiver, protocol `frames` (see ../README.md).

Sends records at least once: each connection sends every record not yet acknowledged, as
`len: u32 BE | payload` frames, then half-closes; the receiver writes back the connection's
cumulative count of durable records (u64 BE) and closes once it is done. Whatever was not
acknowledged is sent again on a new connection.

    python3 frames_producer.py HOST PORT < records.txt     # one record per input line

Over TLS (a listener with `[receiver.tls]`): `--tls-ca CA.pem` verifies the receiver's
certificate; `--tls-cert CERT.pem --tls-key KEY.pem` present a client certificate (needed when
the listener has `client_ca_file`). A TLS connection is not half-closed (Python's TLS sockets
cannot): the producer reads acknowledgements until every record sent is covered, then closes.
"""
import argparse
import socket
import ssl
import struct
import sys
import time


def tls_context(ca, cert=None, key=None):
    """A client context trusting `ca` (PEM), presenting `cert`/`key` if given."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def send_all(records, host, port, retry_delay=1.0, tls=None):
    """Sends `records` (a list of bytes) until every one is acknowledged as durable; over TLS
    when `tls` (an `ssl.SSLContext`, see `tls_context`) is given."""
    pending = list(records)  # not yet acknowledged, in order
    while pending:
        acked = 0  # this connection's cumulative acknowledgement
        try:
            with socket.create_connection((host, port), timeout=30) as raw:
                s = tls.wrap_socket(raw, server_hostname=host) if tls else raw
                s.sendall(b"".join(struct.pack(">I", len(r)) + r for r in pending))
                if not tls:
                    s.shutdown(socket.SHUT_WR)  # end of input: the receiver finishes, then closes
                buf = b""
                while not (tls and acked >= len(pending)):
                    chunk = s.recv(4096)
                    if not chunk:  # closed by the receiver: its last ack has arrived
                        break
                    buf += chunk
                    while len(buf) >= 8:
                        (acked,) = struct.unpack(">Q", buf[:8])
                        buf = buf[8:]
                if tls:
                    s.close()
        except OSError as e:
            print(f"connection failed after {acked} acknowledged: {e}", file=sys.stderr)
        pending = pending[acked:]  # the first `acked` records sent are durable
        if pending:
            time.sleep(retry_delay)  # closed early (limit, failure, restart): resend the rest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Send stdin's lines as frames, at least once.")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", help="client certificate (PEM), with --tls-key")
    parser.add_argument("--tls-key", help="the client certificate's key (PEM)")
    args = parser.parse_args()
    tls = tls_context(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    records = [line.rstrip(b"\n") for line in sys.stdin.buffer]
    send_all(records, args.host, args.port, tls=tls)
    print(f"{len(records)} records durable", file=sys.stderr)
