"""A raw upstream that misbehaves on purpose, by path, for the tests of what Keygate does about it.

Each connection runs on a thread of its own: it reads a request head (and a Content-Length or chunked
body, unless the path says not to), records ``(connection number, method, path, body)`` and answers as
the path asks:

- ``/late-body``: a HEAD is answered with a head announcing a body, then 0.3 s later with that body,
  which is itself a whole HTTP response (``X-Evil: 1``, body ``EVIL``);
- ``/twice``: two responses to one request, the second 0.3 s after the first;
- ``/head-body``: a HEAD answered with a head, then 0.1 s later a body that is the start of a
  response head (``Set-Cookie: session=attacker``, then an unfinished header);
- ``/not-modified-late``: ``304`` with a head announcing a body, then 0.3 s later that body, a whole
  HTTP response (as ``/late-body``);
- ``/coded-chunked``: ``200`` with ``Transfer-Encoding: gzip, chunked`` (a gzip stream, chunked);
- ``/coded-close``: ``200`` with ``Transfer-Encoding: gzip``, the gzip stream delimited by the close;
- ``/switch``: ``101 Switching Protocols`` (``Upgrade: h2c``) to any request, then echoes bytes;
- ``/early-close``: answers ``413`` with ``Connection: close`` at once, unread body and all, and closes;
- ``/early``: answers ``200`` at once without reading the request body, then reads nothing more;
- ``/slow-head``: answers ``200`` after 0.5 s;
- ``/headers/<name>=<value>/...``: ``200`` with those headers (besides its length);
- ``/close-body``: ``200`` whose body (``part-one,part-two``) is delimited by the close, in two writes;
  ``/close-body-reset`` sends the first write, then resets the connection (it crashed mid-body);
- ``/trailers``: ``200`` with 100 header lines and a chunked body ``hello`` with 40 trailer lines;
- ``/raw/<name>``: the head ``RAW_HEADS[name]`` (a status line and header lines, written 64 KiB at a time)
  with a two-byte body ``ok``, then closes (``/raw/<name>/keep``: keeps the connection); ``raw_sent[path]`` is
  how much of it was sent;
- anything else: ``200`` with body ``ok <method> <path>``.
"""

from __future__ import annotations

import gzip
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Response heads for /raw/<name> (each followed by Content-Length: 2 and the body "ok"), made when asked for.
RAW_HEADS: dict[str, Callable[[], bytes]] = {
    "ok": lambda: b"HTTP/1.1 200 OK\r\n",
    "status-099": lambda: b"HTTP/1.1 099 Weird\r\n",
    "status-000": lambda: b"HTTP/1.1 000 Weird\r\n",
    "status-600": lambda: b"HTTP/1.1 600 Weird\r\n",
    "status-599": lambda: b"HTTP/1.1 599 Odd\r\n",
    "reason-control": lambda: b"HTTP/1.1 200 \x01\x7fWeird\r\n",
    "reason-long": lambda: b"HTTP/1.1 200 " + b"R" * 1024 + b"\r\n",
    "reason-huge": lambda: b"HTTP/1.1 200 " + b"R" * (8 << 20) + b"\r\n",
    "lines-127": lambda: b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-N%d: n\r\n" % i for i in range(127)),
    "lines-128": lambda: b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-N%d: n\r\n" % i for i in range(128)),
    "lines-tiny": lambda: b"HTTP/1.1 200 OK\r\n" + b"a:\r\n" * 250_000,
    "line-huge": lambda: b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (64 << 20) + b"\r\n",
    "switch-bare": lambda: b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n",
}


@dataclass
class Seen:
    conn: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedUpstream:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[Seen] = []
        self.connections = 0
        self.open = 0
        # Connections (by number) that were sent bytes after their answer, and those that have ended.
        self.strayed: list[int] = []
        self.raw_sent: dict[str, int] = {}  # /raw/ paths: bytes of the head sent before Keygate stopped reading
        self.ended: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
                number = self.connections
                self.open += 1
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        buffer = b""
        sock.settimeout(30)
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = b""
                if not path.startswith("/early"):
                    if "content-length" in headers:
                        length = int(headers["content-length"])
                        while len(buffer) < length:
                            data = sock.recv(65536)
                            if not data:
                                return
                            buffer += data
                        body, buffer = buffer[:length], buffer[length:]
                    elif headers.get("transfer-encoding") == "chunked":
                        while True:
                            while b"\r\n" not in buffer:
                                buffer += sock.recv(65536)
                            size_line, _, buffer = buffer.partition(b"\r\n")
                            size = int(size_line.split(b";")[0], 16)
                            while len(buffer) < size + 2:
                                buffer += sock.recv(65536)
                            body += buffer[:size]
                            buffer = buffer[size + 2:]
                            if size == 0:
                                break
                with self._lock:
                    self.seen.append(Seen(number, method, path, headers, body))
                if not self._answer(sock, method, path, number):
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self.open -= 1
                self.ended.add(number)
            sock.close()

    def stray_dropped(self, since: int) -> bool:
        """Whether the connections sent stray bytes after the first ``since`` have been, and have all ended."""
        with self._lock:
            strayed = self.strayed[since:]
            return bool(strayed) and all(number in self.ended for number in strayed)

    def _strayed(self, number: int) -> None:
        with self._lock:
            self.strayed.append(number)

    def _answer(self, sock: socket.socket, method: str, path: str, number: int) -> bool:
        ok = f"ok {method} {path}".encode()
        if path.startswith("/late-body"):
            evil = b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 4\r\n\r\nEVIL"
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(evil))
            time.sleep(0.3)
            try:
                sock.sendall(evil)  # the body a HEAD response must not have
            finally:
                self._strayed(number)  # (sent or not: Keygate may have closed the connection)
            return True
        if path.startswith("/not-modified-late"):
            evil = b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 4\r\n\r\nEVIL"
            sock.sendall(b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n" % len(evil))
            time.sleep(0.3)
            try:
                sock.sendall(evil)  # the body a 304 must not have
            finally:
                self._strayed(number)  # (sent or not: Keygate may have closed the connection)
            return True
        if path.startswith("/coded-"):
            coded = gzip.compress(ok)
            if path.startswith("/coded-chunked"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                             % (len(coded), coded))
                return True
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n%s" % coded)
            return False
        if path.startswith("/twice"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ok), ok))
            time.sleep(0.3)
            sock.sendall(b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 4\r\n\r\nEVIL")
            self._strayed(number)
            return True
        if path.startswith("/head-body"):
            # A HEAD answered with its body (a common upstream bug), in a write of its own; the body is a
            # file whose content a client chose: the start of a response head.
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
            time.sleep(0.1)
            sock.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\nX-Pad: ")
            self._strayed(number)
            return True
        if path.startswith("/switch"):
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            while data := sock.recv(65536):
                sock.sendall(data)
            return False
        if path.startswith("/early-close"):
            sock.sendall(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\ntoo big!")
            time.sleep(0.2)
            return False
        if path.startswith("/early"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ok), ok))
            time.sleep(30)
            return False
        if path.startswith("/headers/"):
            lines = b"".join(b"%s: %s\r\n" % tuple(part.encode().split(b"=", 1))  # type: ignore[str-format]
                             for part in path[len("/headers/"):].split("/") if part)
            sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (lines, len(ok), ok))
            return True
        if path.startswith("/close-body"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npart-one,")
            time.sleep(0.2)
            if path.startswith("/close-body-reset"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
            else:
                sock.sendall(b"part-two")
            return False
        if path.startswith("/trailers"):
            # 100 header lines, a chunked body, 40 trailer lines: each within the head's limits on its own.
            sock.sendall(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-N%d: n\r\n" % i for i in range(100))
                         + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                         + b"".join(b"X-T%d: t\r\n" % i for i in range(40)) + b"\r\n")
            return True
        if path.startswith("/raw/"):
            head = RAW_HEADS[path[len("/raw/"):].removesuffix("/keep")]() + b"Content-Length: 2\r\n\r\nok"
            sent = 0
            try:
                for i in range(0, len(head), 65536):
                    sock.sendall(head[i:i + 65536])
                    sent = i + 65536
            except OSError:
                pass  # (Keygate may refuse the head before it is all sent)
            with self._lock:
                self.raw_sent[path] = min(sent, len(head))
            return path.endswith("/keep")
        if path.startswith("/slow-head"):
            time.sleep(0.5)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ok), ok))
        return True
