"""An ``https://`` upstream: verified against the trust store, and a body its close ends is whole only if TLS ended.

The upstream is a TLS server of this module's own (a certificate for ``localhost`` from a CA made per
run), trusted by Keygate through ``SSL_CERT_FILE``, as an operator points OpenSSL at a private CA.
For a body delimited by the close (no Content-Length, not chunked), a TCP FIN is its end only after
TLS's close_notify: a FIN alone can be sent by anyone on the path to cut the body short (RFC 9112
section 9.8), so Keygate then cuts the client's connection without the last chunk, as for a reset.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .harness import Keygate
from .rawhttp import read_response, until_last_chunk

BODY_PARTS = (b"part-one,", b"part-two")


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A CA (``ca.pem``) and a certificate for localhost it signed (``server.pem``, ``server.key``)."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Keygate test CA", ca_key, None, ca_key, ca=True)
    server = _certificate("localhost", server_key, ca.subject, ca_key, ca=False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


class TlsUpstream:
    """Answers each request on a TLS connection of its own, by path:

    - ``/hello``: ``200`` with a Content-Length, then the connection closed (close_notify, then FIN);
    - ``/close-body``: ``200`` whose body is delimited by the close, in two writes, then close_notify and FIN;
    - ``/close-body-fin``: the same body, then a FIN without close_notify (the body cut by the network).
    """

    def __init__(self, certificate: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paths: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()  # a client that did not trust us (or did not speak TLS)
            return
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1].decode()
            self.paths.append(path)
            if path == "/hello":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                             b"Connection: close\r\n\r\nhello\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY_PARTS[0])
                conn.sendall(BODY_PARTS[1])
                if path == "/close-body-fin":
                    conn.shutdown(socket.SHUT_WR)  # (an SSLSocket's shutdown: the TCP FIN alone, no close_notify)
                    conn.recv(1)  # until Keygate closes its side
                    return
            conn.unwrap()  # close_notify, and the client's in answer
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_upstream(pki: tuple[Path, Path, Path]) -> Iterator[TlsUpstream]:
    upstream = TlsUpstream(pki[1], pki[2])
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def kg(tls_upstream: TlsUpstream, pki: tuple[Path, Path, Path],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("tls"), f"https://localhost:{tls_upstream.port}",
                      env={"SSL_CERT_FILE": str(pki[0])}).start()
    yield keygate
    keygate.stop()


@pytest.fixture(scope="module")
def kg_untrusting(tls_upstream: TlsUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A Keygate that does not trust the upstream's CA (the system's trust store only)."""
    keygate = Keygate(tmp_path_factory.mktemp("tls-untrusting"), f"https://localhost:{tls_upstream.port}").start()
    yield keygate
    keygate.stop()


def get(path: str, key: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


async def test_a_verified_upstream_is_forwarded_to(kg: Keygate, tls_upstream: TlsUpstream) -> None:
    _, key = await kg.key(name="tls-hello", role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    try:
        writer.write(get("/hello", key))
        response = await read_response(reader, 5)
    finally:
        writer.close()
    assert response is not None and response.head.startswith(b"HTTP/1.1 200 ") and response.body == b"hello\n"


async def test_an_upstream_certificate_not_trusted_is_a_bad_gateway(
    kg_untrusting: Keygate, tls_upstream: TlsUpstream,
) -> None:
    _, key = await kg_untrusting.key(name="tls-untrusted", role="admin")
    before = list(tls_upstream.paths)
    reader, writer = await asyncio.open_connection("127.0.0.1", kg_untrusting.proxy_port)
    try:
        writer.write(get("/hello", key))
        response = await read_response(reader, 10)
    finally:
        writer.close()
    assert response is not None and response.head.startswith(b"HTTP/1.1 502 ")
    assert tls_upstream.paths == before  # the request never went out


@pytest.mark.parametrize(("path", "whole"), [("/close-body", True), ("/close-body-fin", False)],
                         ids=["close_notify", "fin-alone"])
async def test_a_body_delimited_by_the_close_is_whole_only_after_close_notify(
    kg: Keygate, path: str, whole: bool,
) -> None:
    """close_notify then FIN ends such a body: relayed chunked, with its last chunk. A FIN alone does not: the
    client's connection is cut without the last chunk, so a body cut short is never presented as whole."""
    _, key = await kg.key(name="tls-" + path.strip("/"), role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    writer.write(get(path, key))
    try:
        received = await until_last_chunk(reader)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    data, ended = dechunk(body)
    assert b"".join(BODY_PARTS).startswith(data)
    if whole:
        assert (data, ended) == (b"".join(BODY_PARTS), True)
    else:
        assert not ended  # (however much of the body came before the FIN: its last chunk never does)


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The data of the whole chunks in ``body``, and whether its last chunk (size 0) came."""
    data = b""
    while b"\r\n" in body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data, rest == b"\r\n"
        if len(rest) < size + 2:
            break
        data, body = data + rest[:size], rest[size + 2:]
    return data, False
