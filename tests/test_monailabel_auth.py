"""With MONAI Label's authentication on, the app accepts only valid tokens of its realm, for its audience.

The realm (normally Keycloak) is a small local HTTPS server (self-signed certificate, trusted by the server through
``REQUESTS_CA_BUNDLE``) that publishes an RSA public key the way MONAI Label fetches it
(``MONAI_LABEL_AUTH_REALM_URI`` answering ``{"public_key": ...}``); tokens are signed here with its private key,
or with another key to forge one.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from langmamba.io import read_volume, write_volume
from langmamba.sample_data import sample_path
from tests.servers import REPO, MonaiLabelServer, crop

AUDIENCE = "monailabel-app"  # MONAI Label's default client id, the app's default audience


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(tmp, key) -> tuple:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "realm.crt", tmp / "realm.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    """``(realm URL, signing key, CA file)``: an HTTPS realm publishing the key's public half."""
    tmp = tmp_path_factory.mktemp("realm")
    key = _key()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "monailabel", "public_key": base64.b64encode(der).decode()}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    cert, cert_key = _certificate(tmp, _key())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, cert_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/realms/monailabel", key, cert
    httpd.shutdown()


def _token(
    key,
    roles: list[str],
    issuer: str,
    *,
    expires_in: float | None = 600,
    audience: str = AUDIENCE,
    algorithm: str = "RS256",
    **claims,
) -> str:
    payload = {
        "preferred_username": "radiologist",
        "realm_access": {"roles": roles},
        "iss": issuer,
        "aud": audience,
        **claims,
    }
    if expires_in is not None:
        payload["exp"] = int(time.time() + expires_in)
    return jwt.encode(payload, key, algorithm=algorithm)


def _unsigned(issuer: str) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {
        "preferred_username": "radiologist",
        "realm_access": {"roles": ["monailabel-user"]},
        "iss": issuer,
        "aud": AUDIENCE,
        "exp": int(time.time() + 600),
    }
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def server(tmp_path_factory, realm):
    tmp = tmp_path_factory.mktemp("auth")
    studies = tmp / "studies"
    studies.mkdir()
    write_volume(
        crop(read_volume(sample_path("lung2")), slice(30, 31), slice(192, 256), slice(160, 224)), studies / "tiny.nrrd"
    )
    srv = MonaiLabelServer(
        studies,
        tmp,
        conf={"audit_log": str(tmp / "audit.jsonl")},
        env={
            "MONAI_LABEL_AUTH_ENABLE": "true",
            "MONAI_LABEL_AUTH_REALM_URI": realm[0],
            "REQUESTS_CA_BUNDLE": str(realm[2]),
            "LANGMAMBA_WORKERS": "0",
        },
    )
    srv.audit = tmp / "audit.jsonl"
    yield srv
    srv.stop()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _cases(realm) -> list[tuple[str, dict, int]]:
    url, key, _ = realm
    user = ["monailabel-user"]
    return [
        ("no token", {}, 401),
        ("not a JWT", _bearer("not-a-jwt"), 401),
        ("forged", _bearer(_token(_key(), user, url)), 401),
        ("expired", _bearer(_token(key, user, url, expires_in=-120)), 401),
        ("no exp", _bearer(_token(key, user, url, expires_in=None)), 401),
        ("foreign audience", _bearer(_token(key, user, url, audience="another-app")), 401),
        ("foreign issuer", _bearer(_token(key, user, "https://evil.example/realms/monailabel")), 401),
        (
            "no issuer",
            _bearer(
                jwt.encode(
                    {
                        "preferred_username": "x",
                        "realm_access": {"roles": user},
                        "aud": AUDIENCE,
                        "exp": int(time.time() + 600),
                    },
                    key,
                    algorithm="RS256",
                )
            ),
            401,
        ),
        ("unsigned", _bearer(_unsigned(url)), 401),
        ("HMAC with the public key", _bearer(_hmac_with_public_key(key, url)), 401),
        ("no role", _bearer(_token(key, ["guest"], url)), 403),
    ]


def _hmac_with_public_key(key, issuer: str) -> str:
    """The algorithm-confusion attack: an HS256 token whose secret is the realm's (public) key."""
    import hashlib
    import hmac

    def part(data: dict) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")

    claims = {
        "preferred_username": "radiologist",
        "realm_access": {"roles": ["monailabel-user"]},
        "iss": issuer,
        "aud": AUDIENCE,
        "exp": int(time.time() + 600),
    }
    signing = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
    signature = hmac.new(_public_pem(key), signing, hashlib.sha256).digest()
    return (signing + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


@pytest.mark.server
def test_requests_without_a_valid_token_are_refused(server, realm):
    for what, headers, status in _cases(realm):
        assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == status, what
        response = server.infer(image="tiny", output="json", params={"explain": False}, headers=headers)
        assert response.status_code == status, (what, response.text)
        assert requests.get(f"{server.url}/docs", headers=headers, timeout=30).status_code == 401, what
    assert not (server.tmpdir.parent / "studies" / "tiny_langmamba.nrrd").exists()  # nothing ran


@pytest.mark.server
def test_a_valid_token_is_served_within_the_clock_skew(server, realm):
    url, key, _ = realm
    headers = _bearer(_token(key, ["monailabel-user"], url))
    assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{server.url}/docs", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{server.url}/openapi.json", headers=headers, timeout=30).status_code == 200
    response = server.infer(image="tiny", output="json", params={"explain": False}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["saved"]["image_id"] == "tiny_langmamba"
    # 10 s past exp is within the default 30 s skew; 120 s past (above) is not
    late = _bearer(_token(key, ["monailabel-user"], url, expires_in=-10))
    assert requests.get(f"{server.url}/info/", headers=late, timeout=30).status_code == 200
    records = [json.loads(line) for line in server.audit.read_text().splitlines()]
    assert any(r["user"] == "radiologist" and r["image"] == "tiny" and r["status"] == 200 for r in records)
    assert any(r["user"] == "anonymous" for r in records) is False  # refused tokens never reach the route


@pytest.mark.server
def test_stock_write_routes_stay_off_for_every_role(server, realm):
    url, key, _ = realm
    admin = _bearer(_token(key, ["monailabel-user", "monailabel-admin", "monailabel-annotator"], url))
    for method, path in (
        ("PUT", "/datastore/image?image=x"),
        ("DELETE", "/datastore/image?id=tiny"),
        ("GET", "/logs/"),
        ("POST", "/batch/infer/langmamba_denoise"),
    ):
        response = requests.request(method, f"{server.url}{path}", headers=admin, timeout=30)
        assert response.status_code == 404, (path, response.text)


@pytest.fixture()
def auth_module(monkeypatch):
    """The app's ``lib.auth`` in this process, with authentication on (MONAI Label's settings object)."""
    monkeypatch.syspath_prepend(str(REPO / "monailabel_app"))
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        monkeypatch.delitem(sys.modules, name)
    from lib import auth
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    for name in (
        "LANGMAMBA_AUTH_PUBLIC_KEY",
        "LANGMAMBA_AUTH_ISSUER",
        "LANGMAMBA_AUTH_AUDIENCE",
        "LANGMAMBA_AUTH_LEEWAY_S",
    ):
        monkeypatch.delenv(name, raising=False)
    return auth, settings


def test_a_plain_http_realm_is_refused_unless_the_key_is_pinned(auth_module, monkeypatch, tmp_path):
    auth, settings = auth_module
    from fastapi import HTTPException

    key = _key()
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", "http://127.0.0.1:9/realms/monailabel")
    token = _token(key, ["monailabel-user"], "http://127.0.0.1:9/realms/monailabel")
    with pytest.raises(HTTPException) as refused:
        auth.from_token(token)
    assert refused.value.status_code == 503  # never fetched over plain HTTP (port 9 would not answer anyway)

    pinned = tmp_path / "realm.pem"
    pinned.write_bytes(_public_pem(key))
    monkeypatch.setenv("LANGMAMBA_AUTH_PUBLIC_KEY", str(pinned))
    assert auth.from_token(token).username == "radiologist"
    with pytest.raises(jwt.InvalidTokenError):
        auth.from_token(_token(_key(), ["monailabel-user"], "http://127.0.0.1:9/realms/monailabel"))


def test_clock_skew_is_bounded(auth_module, monkeypatch):
    auth, _ = auth_module
    monkeypatch.setenv("LANGMAMBA_AUTH_LEEWAY_S", "3600")
    with pytest.raises(ValueError, match="LEEWAY"):
        auth.TokenPolicy.from_env()
