"""GCS's download endpoint as the HTTP client sees it, for measuring the client: connections kept alive, over TLS.

The GCS emulator closes every connection after one request and speaks plain HTTP, so a client's CPU per read
there is mostly connecting. This stand-in answers `GET /download/storage/v1/b/<bucket>/o/<name>?alt=media`
with the file `<dir>/<name>` as GCS does: whole (200) with its crc32c in `x-goog-hash`, or the bytes a
`Range: bytes=A-B` asks for (206, no hash); it keeps each connection for the next request, and with `--tls`
speaks TLS with a certificate of its own (`self_signed`).

    python -m tests.support.kept_alive_store DIR [--tls CERT KEY] [--pace-mb-s N]   # prints "listening on PORT"
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.support.http_stand_in import Server


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that vouches for itself, and its key: (cert.pem, key.pem) in `folder`."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def serve(folder: Path, tls: tuple[Path, Path] | None = None, pace_mb_s: int = 0) -> Server:
    """A server on a free 127.0.0.1 port (not yet serving: `serve_forever` it); `pace_mb_s`: each response sent at
    most that fast (0: as fast as it goes)."""
    import base64

    import google_crc32c

    objects = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    hashes = {name: base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
              for name, data in objects.items()}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # kept alive
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait for the client's ACK

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            name = unquote(urlsplit(self.path).path.rsplit("/o/", 1)[-1])
            body, status, crc32c = objects.get(name), 200, hashes.get(name)
            if body is None:
                body, status, crc32c = b"no such object", 404, None
            elif self.headers.get("Range", "").startswith("bytes="):
                first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                body, status, crc32c = body[int(first) : int(last) + 1], 206, None
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if crc32c:
                self.send_header("x-goog-hash", f"crc32c={crc32c}")
            self.end_headers()
            if not pace_mb_s:
                self.wfile.write(body)
                return
            view, step = memoryview(body), pace_mb_s << 18  # each connection at most `pace_mb_s` MB/s, as one stream
            for at in range(0, len(body), step):  # of a store: a quarter-second's bytes at a time
                started = time.monotonic()
                self.wfile.write(view[at : at + step])
                time.sleep(max(0.0, step / (pace_mb_s * 1e6) - (time.monotonic() - started)))

    server = Server(("127.0.0.1", 0), Handler)
    if tls:
        server.socket = server_context(*tls).wrap_socket(server.socket, server_side=True)
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tls", nargs=2, type=Path, metavar=("CERT", "KEY"))
    parser.add_argument("--pace-mb-s", type=int, default=0, help="each response at most this fast (0: unpaced)")
    args = parser.parse_args()
    server = serve(args.folder, tuple(args.tls) if args.tls else None, args.pace_mb_s)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
