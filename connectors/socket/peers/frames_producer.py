#!/usr/bin/env python3
"""A producer for weir's socket receiver, protocol `frames` (see ../README.md).

Sends records at least once: each connection sends every record not yet acknowledged, as
`len: u32 BE | payload` frames, then half-closes; the receiver writes back the connection's
cumulative count of durable records (u64 BE) and closes once it is done. Whatever was not
acknowledged is sent again on a new connection.

    python3 frames_producer.py HOST PORT < records.txt     # one record per input line
"""
import socket
import struct
import sys
import time


def send_all(records, host, port, retry_delay=1.0):
    """Sends `records` (a list of bytes) until every one is acknowledged as durable."""
    pending = list(records)  # not yet acknowledged, in order
    while pending:
        acked = 0  # this connection's cumulative acknowledgement
        try:
            with socket.create_connection((host, port), timeout=30) as s:
                s.sendall(b"".join(struct.pack(">I", len(r)) + r for r in pending))
                s.shutdown(socket.SHUT_WR)  # end of input: the receiver finishes, then closes
                buf = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:  # closed by the receiver: its last ack has arrived
                        break
                    buf += chunk
                    while len(buf) >= 8:
                        (acked,) = struct.unpack(">Q", buf[:8])
                        buf = buf[8:]
        except OSError as e:
            print(f"connection failed after {acked} acknowledged: {e}", file=sys.stderr)
        pending = pending[acked:]  # the first `acked` records sent are durable
        if pending:
            time.sleep(retry_delay)  # closed early (limit, failure, restart): resend the rest


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    records = [line.rstrip(b"\n") for line in sys.stdin.buffer]
    send_all(records, host, port)
    print(f"{len(records)} records durable", file=sys.stderr)
