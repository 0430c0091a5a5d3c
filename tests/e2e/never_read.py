"""A client that makes a server answer and never reads: it opens N connections to a keybroker
endpoint (a Unix socket path, or a loopback port), pipelines GET requests on each until the
daemon stops taking them, and reads nothing. It prints one JSON line once every connection has
been tried, then holds the open ones until its stdin closes.

    never_read.py TARGET N PATH
"""

import json
import socket
import sys

# Enough requests on one connection to fill the daemon's answer buffers many times over.
MAX_BYTES_PER_CONNECTION = 4 << 20


def connect(target):
    if target.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(target)
    else:
        s = socket.create_connection(("127.0.0.1", int(target)))
    s.setblocking(False)
    return s


def fill(s, chunk):
    """Sends until the daemon stops reading (the kernel's buffers are full) or closes."""
    sent = 0
    while sent < MAX_BYTES_PER_CONNECTION:
        try:
            sent += s.send(chunk)
        except BlockingIOError:
            return sent, True
        except OSError:
            return sent, False
    return sent, True


def main():
    target, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    chunk = f"GET {path} HTTP/1.1\r\nHost: keybroker\r\n\r\n".encode() * 128
    held, closed, failed, sent = [], 0, 0, 0
    for _ in range(n):
        try:
            s = connect(target)
        except OSError:
            failed += 1
            continue
        n_sent, still_open = fill(s, chunk)
        sent += n_sent
        if still_open:
            held.append(s)
        else:
            closed += 1
            s.close()
    print(json.dumps({"held": len(held), "closed": closed, "failed": failed, "sent": sent}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
