"""Access (issue 8): MONAI Label's own authentication, enabled on a real server running the app.

MONAI Label 0.8.5 validates bearer tokens itself (``monailabel/endpoints/user/auth.py``): with
``MONAI_LABEL_AUTH_ENABLE=true`` it fetches the realm's RSA public key from
``GET {MONAI_LABEL_AUTH_REALM_URI}`` (Keycloak's realm document, ``{"public_key": <base64 DER>}``),
checks every token's RS256 signature and expiry with PyJWT, reads the user's roles from
``realm_access.roles`` and answers 401 (no or invalid token) or 403 (missing role). ``POST /auth/token``
forwards a username/password to the realm's ``token_endpoint`` (from its OpenID configuration).

Keycloak itself (a Java server) cannot run here, so `Realm` serves exactly those two Keycloak
documents and a password-grant token endpoint from loopback, signing tokens with an RSA key made for
the test. Everything on the server side -- settings, key fetch, signature and role checks -- is
MONAI Label's real code. See docs/RELIABILITY.md ("Running with authentication").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from conftest import Server, reported, free_port, make_studies, wait_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN, ANNOTATOR, USER = "monailabel-admin", "monailabel-annotator", "monailabel-user"
NUMBERS: dict[str, object] = reported("authentication numbers")


class Realm:
    """A loopback stand-in for a Keycloak realm: the realm document with its public key, the OpenID
    configuration, and a password-grant token endpoint issuing RS256 tokens for ``users``.

    Args:
        users: ``{username: (password, roles)}``.
    """

    def __init__(self, users: dict[str, tuple[str, list[str]]]):
        self.users = users
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/realms/monailabel"
        self.requests: list[str] = []
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                realm.requests.append(f"GET {self.path}")
                if self.path == "/realms/monailabel":
                    return self._json(200, {"realm": "monailabel", "public_key": realm.public_key_b64()})
                if self.path == "/realms/monailabel/.well-known/openid-configuration":
                    token = f"{realm.url}/protocol/openid-connect/token"
                    return self._json(200, {"issuer": realm.url, "token_endpoint": token})
                self._json(404, {"error": "not found"})

            def do_POST(self):
                realm.requests.append(f"POST {self.path}")
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                user, password = form.get("username", [""])[0], form.get("password", [""])[0]
                known = realm.users.get(user)
                if self.path.endswith("/protocol/openid-connect/token") and known and known[0] == password:
                    return self._json(200, {"access_token": realm.token(user, known[1]), "token_type": "Bearer",
                                            "expires_in": 300})
                self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def public_key_b64(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def token(self, username: str, roles: list[str], key=None, expires_in: int = 300) -> str:
        """A Keycloak-shaped access token signed with the realm's key (or ``key``)."""
        now = int(time.time())
        claims = {"iss": self.url, "sub": username, "preferred_username": username, "email": f"{username}@example.org",
                  "name": username.title(), "realm_access": {"roles": roles}, "iat": now, "exp": now + expires_in}
        return jwt.encode(claims, key or self.key, algorithm="RS256")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def auth(tmp_path_factory, tiny_model):
    realm = Realm({"ada": ("ada-pass", [ADMIN, ANNOTATOR, USER]), "uma": ("uma-pass", [USER])})
    root = tmp_path_factory.mktemp("auth")
    model = root / "model" / "segdiff.pt"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    studies, _ = make_studies(root / "studies", unlabeled=1)
    for image in sorted(studies.glob("phantom_*.nii.gz"))[2:-1]:  # 2 labelled, 1 unlabelled
        image.unlink()
        (studies / "labels" / "final" / image.name).unlink()
    conf = {"model_path": str(model), "scoring_samples": "1", "scoring_steps": "1"}
    with pytest.MonkeyPatch.context() as mp:  # the server process inherits them; this one is left unchanged
        mp.setenv("MONAI_LABEL_AUTH_ENABLE", "true")
        mp.setenv("MONAI_LABEL_AUTH_REALM_URI", realm.url)
        server = Server(studies, conf, root / "server.log")
    try:
        # /info/ needs a token now: ready when the public /auth/ endpoint answers
        wait_for(lambda: server.proc.poll() is not None or _answers(f"{server.url}/auth/"), timeout=180,
                 interval=1, what="server start")
        assert server.proc.poll() is None, server.tail()
        yield {"url": server.url, "realm": realm, "server": server}
    finally:
        server.stop()
        realm.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routes(url: str) -> list[tuple[str, str]]:
    """Every ``(method, path)`` of the server's API (``/openapi.json``), path parameters filled in."""
    spec = requests.get(f"{url}/openapi.json", timeout=60).json()
    fill = {"{model}": "segdiff", "{strategy}": "random", "{method}": "segdiff_uncertainty", "{session_id}": "x",
            "{path}": "x", "{image}": "x", "{label}": "x"}
    out = []
    for path, methods in spec["paths"].items():
        for key, value in fill.items():
            path = path.replace(key, value)
        out += [(m.upper(), path) for m in methods]
    return out


def hs256_with_public_key(realm: Realm) -> str:
    """The algorithm-confusion forgery: an HMAC token whose secret is the realm's (public) key text."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"preferred_username": "mallory", "realm_access": {"roles": [ADMIN]}, "exp": int(time.time()) + 300}
    head = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    secret = f"-----BEGIN PUBLIC KEY-----\n{realm.public_key_b64()}\n-----END PUBLIC KEY-----".encode()
    return f"{head}.{b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


def test_unauthenticated_requests_are_refused(auth):
    url = auth["url"]
    checked = {}
    for method, path in routes(url):
        if path.startswith("/auth/") and path != "/auth/token/valid":
            continue  # the login endpoints themselves
        r = requests.request(method, f"{url}{path}", timeout=60)
        checked[f"{method} {path}"] = r.status_code
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert len(checked) >= 30 and "POST /infer/segdiff" in checked and "PUT /datastore/label" in checked
    # routes MONAI Label keeps out of the schema (deprecated aliases, OHIF, DICOMweb proxy)
    hidden = [("PUT", "/datastore/"), ("DELETE", "/datastore/"), ("POST", "/train/"), ("POST", "/scoring/"),
              ("PUT", "/datastore/updatelabelinfo"), ("GET", "/ohif/index.html"), ("GET", "/proxy/dicom/studies")]
    for method, path in hidden:
        r = requests.request(method, f"{url}{path}", timeout=60)
        checked[f"{method} {path}"] = r.status_code
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
    # POST /reload (drop and rebuild the app) has no authentication in MONAI Label: the app removes it
    assert requests.post(f"{url}/reload", timeout=60).status_code == 404
    NUMBERS["routes refused without a token"] = len(checked)
    assert requests.get(f"{url}/auth/", timeout=30).json()["enabled"] is True  # how clients learn to log in
    realm = auth["realm"]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad_tokens = {
        "garbage": "not-a-jwt",
        "signed by another key": realm.token("mallory", [ADMIN, ANNOTATOR, USER], key=stranger),
        "expired": realm.token("ada", [ADMIN, ANNOTATOR, USER], expires_in=-60),
        "unsigned (alg none)": jwt.encode({"preferred_username": "mallory", "realm_access": {"roles": [ADMIN]},
                                           "exp": int(time.time()) + 300}, key=None, algorithm="none"),
        "HS256 keyed with the public key": hs256_with_public_key(realm),
    }
    for what, token in bad_tokens.items():
        r = requests.get(f"{url}/info/", headers=bearer(token), timeout=30)
        assert r.status_code == 401, (what, r.status_code, r.text)
    requests.get(f"{url}/info/", timeout=30)  # still serving
    assert any(r == "GET /realms/monailabel" for r in realm.requests)  # the key came from the realm


def test_signed_tokens_are_accepted_and_roles_enforced(auth):
    from monailabel.client import MONAILabelClient

    url, realm = auth["url"], auth["realm"]
    client = MONAILabelClient(url)
    assert client.auth_enabled()
    # the login flow of 3D Slicer and MONAILabelClient: username/password -> the realm -> a token
    client.update_auth(client.auth_token("ada", "ada-pass"))
    info = client.info()
    assert "segdiff" in info["models"] and info["labels"] == ["organ", "lesion", "background"]
    assert client.auth_valid_token()
    result, out = client.infer("segdiff", "phantom_027", {})
    assert out["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
    r = requests.get(f"{url}/auth/token/valid", headers=client._headers, timeout=30)
    assert r.status_code == 200 and r.json()["username"] == "ada"
    # an admin passes authentication, then the app's own checks (no training is started here)
    admin = {"Authorization": client._headers["Authorization"]}
    r = requests.post(f"{url}/train/segdiff_train", json={"network": "nope"}, headers=admin, timeout=30)
    assert r.status_code == 422 and "unknown network" in r.text

    # a plain user may read and infer, not label or train
    user = bearer(realm.token("uma", [USER]))
    assert requests.get(f"{url}/info/", headers=user, timeout=30).status_code == 200
    r = requests.put(f"{url}/datastore/label", params={"image": "phantom_027"}, headers=user,
                     files={"label": ("x.nii.gz", b"x")}, data={"params": "{}"}, timeout=30)
    assert r.status_code == 403 and ANNOTATOR in r.text
    r = requests.post(f"{url}/train/segdiff_train", json={}, headers=user, timeout=30)
    assert r.status_code == 403 and ADMIN in r.text
    r = requests.put(f"{url}/model/segdiff", headers=user, files={"file": ("m.pt", b"x")}, timeout=30)
    assert r.status_code == 403
    # a wrong password gets no token, and a 401 with the reason (MONAI Label alone: a bare 500)
    r = requests.post(f"{url}/auth/token", data={"username": "uma", "password": "guess"}, timeout=30)
    assert r.status_code == 401 and "access_token" not in r.text, (r.status_code, r.text[:200])
    assert r.json()["detail"] == "login refused: wrong user name or password"
    NUMBERS["wrong password status"] = r.status_code
