"""TLS on every listener when a certificate and key are configured."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import next_message
from tidings.client import Client


def self_signed(tmp: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_tls_everywhere(make_server: Any, tmp_path: Path) -> None:
    """https, wss and TLS-over-TCP all work with the configured certificate; plain TCP fails."""
    cert, key = self_signed(tmp_path)
    h = await make_server(tls_cert=cert, tls_key=key)
    ctx = ssl.create_default_context(cafile=cert)
    async with aiohttp.ClientSession() as s, s.get(h.http_url + "/healthz", ssl=ctx) as r:
        assert r.status == 200
    a = Client(h.ws_url, await h.token("alice"), ssl_context=ctx)
    b = Client(h.tcp_url, await h.token("bob"), ssl_context=ctx)
    h.clients += [a, b]
    await a.connect()
    await b.connect()
    assert h.ws_url.startswith("wss://") and h.tcp_url.startswith("tcps://")
    await a.send(to="bob", text="over tls")
    assert (await next_message(b)).message.body["text"] == "over tls"
    plain = Client(
        f"tcp://127.0.0.1:{h.server.tcp_port}", await h.token("carol"), backoff_max_s=0.1
    )
    h.clients.append(plain)
    try:
        await plain.connect(wait=False)
        await plain.wait_ready(timeout=1.0)
        raise AssertionError("plain TCP must not reach a TLS listener")
    except TimeoutError:
        pass
