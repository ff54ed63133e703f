#!/usr/bin/env python3
"""Raw TCP throughput over 127.0.0.1: one connection, no protocol, 1 MiB
reads and writes. The floor under any gRPC round that moves the same bytes
on this machine (see BENCHMARKS.md, "Flower 1.42 on the same machine").

    python3 scripts/tcp_loopback.py [BYTES]   # default 95,000,000: one f32 round of 100 x 118,592
"""

import socket
import sys
import threading
import time


def main():
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 95_000_000
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received = {}

    def receive():
        conn, _ = listener.accept()
        buf = memoryview(bytearray(1 << 20))
        got = 0
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        received["at"] = time.perf_counter()
        received["bytes"] = got

    reader = threading.Thread(target=receive)
    reader.start()
    sender = socket.create_connection(("127.0.0.1", port))
    chunk = memoryview(bytes(1 << 20))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        k = min(len(chunk), total - sent)
        sender.sendall(chunk[:k])
        sent += k
    reader.join()
    if received["bytes"] != total:
        sys.exit(f"received {received['bytes']} of {total} bytes")
    secs = received["at"] - start
    print(f"{total / 1e6:.0f} MB in {secs:.4f} s = {total / secs / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
