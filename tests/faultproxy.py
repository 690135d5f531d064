"""A fault-injecting HTTP proxy for tests: sits between an S3 client and moto on 127.0.0.1.

Each client connection carries one request (the proxy answers with ``Connection: close`` so clients
never reuse a connection). Requests whose first line contains ``match`` take the next action of
``schedule`` (cycled); all others pass. Actions:

    "pass"   forward to the upstream and relay the response
    "reset"  relay the response head and part of the body, then reset the connection (RST)
    "503"    answer a raw HTTP 503 with an S3-style XML error, without asking the upstream
    "stall"  wait ``stall_seconds`` before answering (longer than the client's read timeout)

``counts`` records how many times each action was taken, ``per_object`` how many matched requests
each object path received.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlparse

_ERROR_503 = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
    b"<Message>injected fault</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, schedule: list[str], match: bytes = b".tar", stall_seconds: float = 1.0,
                 port: int = 0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.schedule, self.match, self.stall_seconds = list(schedule), match, stall_seconds
        self.counts: Counter = Counter()
        self.per_object: Counter = Counter()
        self._matched = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", port))  # port: reuse one to simulate a restart
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._server.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            client.settimeout(30.0)  # a handler never outlives a stuck peer by much
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _next_action(self, head: bytes) -> str:
        first_line = head.split(b"\r\n", 1)[0]
        if self.match not in first_line:
            return "pass"
        path = first_line.split(b" ")[1].split(b"?")[0].decode()
        with self._lock:
            action = self.schedule[self._matched % len(self.schedule)]
            self._matched += 1
            self.counts[action] += 1
            self.per_object[path] += 1
        return action

    def _handle(self, client: socket.socket) -> None:
        try:
            head, body = _read_message(client)
            if head is None:
                return
            action = self._next_action(head)
            if action == "503":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_ERROR_503) + _ERROR_503)
                return
            if action == "stall":
                time.sleep(self.stall_seconds)
            self._forward(client, _with_close(head) + body, reset=action == "reset")
        except OSError:
            pass  # the client gave up (e.g. after its read timeout): nothing to do
        finally:
            client.close()

    def _forward(self, client: socket.socket, request: bytes, reset: bool) -> None:
        with socket.create_connection(self.upstream) as upstream:
            upstream.sendall(request)
            head, rest = _read_head(upstream)
            client.sendall(_with_close(head))
            if reset:
                if rest:
                    client.sendall(rest[: max(1, len(rest) // 2)])
                # SO_LINGER with timeout 0: close() sends RST instead of FIN
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            client.sendall(rest)
            while chunk := upstream.recv(1 << 16):
                client.sendall(chunk)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return data, b""
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def _read_message(sock: socket.socket) -> tuple[bytes | None, bytes]:
    head, body = _read_head(sock)
    if not head:
        return None, b""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    return head, body


def _with_close(head: bytes) -> bytes:
    """The message head with any Connection header replaced by ``Connection: close``."""
    lines = [l for l in head.rstrip(b"\r\n").split(b"\r\n") if not l.lower().startswith(b"connection:")]
    return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n"
