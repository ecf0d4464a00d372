#!/usr/bin/env python3
"""Open COUNT idle TCP connections to HOST:PORT and hold them until SIGTERM/SIGINT.

Used by scripts/bench-proxy.sh to measure a proxy's memory per idle keep-alive client
connection. Nothing is sent after connect. Prints "connected N" (flushed) once every
connection is established, then waits; on SIGTERM or SIGINT it closes them all and exits 0.
Exits 1 (with a message on stderr) if any connect fails or the fd limit is too low.
Usage: idle_conns.py HOST PORT COUNT
"""
import resource
import signal
import socket
import sys
import time


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 64
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            print(f"idle_conns: cannot raise RLIMIT_NOFILE to {want}: {e}", file=sys.stderr)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            print(f"idle_conns: RLIMIT_NOFILE {soft} (hard {hard}) < {want} needed", file=sys.stderr)
            return 1

    # SIGTERM/SIGINT are blocked and then collected with sigwait: no handler races.
    sigs = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    socks = []
    t0 = time.monotonic()
    try:
        for i in range(count):
            if i % 256 == 0 and signal.sigpending() & sigs:
                return 0
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect((host, port))
            except OSError as e:
                s.close()
                print(f"idle_conns: connect #{i + 1} to {host}:{port} failed: {e}", file=sys.stderr)
                return 1
            socks.append(s)
        print(f"connected {len(socks)} in {time.monotonic() - t0:.2f}s", flush=True)
        signal.sigwait(sigs)
        return 0
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
