"""With MONAI Label's authentication on, the app refuses requests without a valid token.

The realm (normally Keycloak) is a small local HTTP server that publishes an RSA public key, the way MONAI Label
fetches it (``MONAI_LABEL_AUTH_REALM_URI`` answering ``{"public_key": ...}``); tokens are signed here with its
private key, or with another key to forge one.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from langmamba.io import read_volume, write_volume
from langmamba.sample_data import sample_path
from tests.servers import MonaiLabelServer, crop


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _token(key, roles: list[str], expires_in: float = 600) -> str:
    claims = {"preferred_username": "radiologist", "realm_access": {"roles": roles}, "exp": int(time.time() + expires_in)}
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture(scope="module")
def realm():
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

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/realms/monailabel", key
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, realm):
    tmp = tmp_path_factory.mktemp("auth")
    studies = tmp / "studies"
    studies.mkdir()
    write_volume(crop(read_volume(sample_path("lung2")), slice(30, 31), slice(192, 256), slice(160, 224)),
                 studies / "tiny.nrrd")
    srv = MonaiLabelServer(studies, tmp, env={"MONAI_LABEL_AUTH_ENABLE": "true",
                                              "MONAI_LABEL_AUTH_REALM_URI": realm[0]})
    yield srv
    srv.stop()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_requests_without_a_valid_token_are_refused(server, realm):
    _, key = realm
    forged = _token(_key(), ["monailabel-user"])
    expired = _token(key, ["monailabel-user"], expires_in=-60)
    no_role = _token(key, ["guest"])
    for headers, status in (({}, 401), (_bearer("not-a-jwt"), 401), (_bearer(forged), 401), (_bearer(expired), 401),
                            (_bearer(no_role), 403)):
        assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == status
        response = server.infer(image="tiny", output="json", params={"explain": False}, headers=headers)
        assert response.status_code == status, response.text
    assert not (server.tmpdir.parent / "studies" / "tiny_langmamba.nrrd").exists()  # nothing ran


def test_a_valid_token_is_served(server, realm):
    headers = _bearer(_token(realm[1], ["monailabel-user"]))
    assert requests.get(f"{server.url}/info/", headers=headers, timeout=30).status_code == 200
    response = server.infer(image="tiny", output="json", params={"explain": False}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["saved"]["image_id"] == "tiny_langmamba"
