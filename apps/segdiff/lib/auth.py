"""Fixes for MONAI Label 0.8.5's authentication, applied when the app loads with authentication on.

With ``MONAI_LABEL_AUTH_ENABLE=true`` MONAI Label checks every request's bearer token in
``monailabel.endpoints.user.auth.from_token`` with ``jwt.decode(token, key, options=...)``: it passes no
``algorithms``, which PyJWT >= 2 (MONAI Label 0.8.5 requires ``pyjwt>=2.8.0``) refuses for any token
("It is required that you pass in a value for the "algorithms" argument"), so every request, signed or
not, is answered 401 and nobody can use the server. `fix_token_validation` gives that module a ``jwt``
whose ``decode`` defaults ``algorithms`` to the asymmetric ones a Keycloak realm key signs with; the
rest of MONAI Label's check (realm public key, signature, expiry, roles) is unchanged. No HMAC
algorithm is allowed (an HS256 token "signed" with the public key must not pass), nor ``none``.

`close_open_routes` removes ``POST /reload``, which MONAI Label serves without any authentication: it
drops the app instance (sessions, caches, active-learning reservations) and builds it anew on the next
request -- a denial of service anyone could trigger.

`answer_refused_logins` makes ``POST /auth/token`` answer a wrong user name or password with 401 and a
reason: MONAI Label forwards the login to the realm and calls ``raise_for_status()`` on its answer, so
the realm's 401 reached the client (Slicer's login) as a bare 500.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import jwt
import requests
from fastapi import Depends, HTTPException
from fastapi.security import OAuth2PasswordRequestForm  # module level: FastAPI resolves the annotation here

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class _PyJWT:
    """PyJWT, with ``decode`` defaulting ``algorithms`` to `ALGORITHMS`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jwt, name)

    @staticmethod
    def decode(token: str, key: Any = "", **kwargs: Any) -> dict:
        if not kwargs.get("algorithms"):
            kwargs["algorithms"] = ALGORITHMS
        return jwt.decode(token, key, **kwargs)


def fix_token_validation() -> bool:
    """Patch MONAI Label's auth module if it still calls ``jwt.decode`` without algorithms; True if patched."""
    try:
        from monailabel.endpoints.user import auth
    except ImportError:  # another MONAI Label layout: nothing to fix here
        return False
    if getattr(auth, "jwt", None) is not jwt:
        return False
    auth.jwt = _PyJWT()
    logger.info(f"MONAI Label token validation: algorithms {', '.join(ALGORITHMS)}")
    return True


def _server_router() -> Any:
    """The router of the running MONAI Label server's FastAPI app, or None outside the server."""
    server = sys.modules.get("monailabel.app")
    return getattr(getattr(server, "app", None), "router", None)


OPEN_ROUTES = ("/reload",)


def close_open_routes() -> list[str]:
    """Remove `OPEN_ROUTES` from the running MONAI Label server (no-op outside the server); the paths removed."""
    router = _server_router()
    if router is None:
        return []
    removed = [r.path for r in router.routes if getattr(r, "path", None) in OPEN_ROUTES]
    router.routes[:] = [r for r in router.routes if getattr(r, "path", None) not in OPEN_ROUTES]
    if removed:
        logger.info(f"authentication on: removed the unauthenticated route(s) {', '.join(removed)}")
    return removed


TOKEN_ROUTE = "/auth/token"


def answer_refused_logins() -> bool:
    """Put a wrapper of MONAI Label's ``POST /auth/token`` first in the running server's routes (no-op
    outside it): the realm refusing the login -> 401 with a reason, the realm failing or unreachable ->
    502. True if added."""
    router = _server_router()
    try:
        from monailabel.endpoints import login
    except ImportError:  # another MONAI Label layout: nothing to fix here
        return False
    original = getattr(login, "access_token", None)
    if router is None or original is None:
        return False

    async def access_token(form_data: OAuth2PasswordRequestForm = Depends()):
        try:
            return await original(form_data)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (400, 401):  # Keycloak: 401 invalid_grant "Invalid user credentials"
                raise HTTPException(401, "login refused: wrong user name or password",
                                    headers={"WWW-Authenticate": "Bearer"}) from None
            raise HTTPException(502, f"the authentication server answered {status}") from None
        except requests.RequestException as e:
            raise HTTPException(502, f"the authentication server cannot be reached ({type(e).__name__})") from None

    router.add_api_route(TOKEN_ROUTE, access_token, methods=["POST"], response_model=getattr(login, "Token", None),
                         summary="Fetch new access code/token", tags=["Auth"])
    router.routes.insert(0, router.routes.pop())  # matched before MONAI Label's own route
    logger.info(f"authentication on: {TOKEN_ROUTE} answers a refused login with 401")
    return True
