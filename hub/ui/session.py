"""Who is signed in to the dashboard, and whether a form really came from its pages.

Signing in stores the user's API token in an HttpOnly, SameSite=Strict cookie
(Secure over HTTPS); every request checks it again with `tokens.authenticate`,
so a revoked token ends the session at once and the role is always current.
The CSRF token is an HMAC of a fixed label keyed with the session's API
token: stable for the session, unguessable without the cookie, and nothing to
store. The sign-in form itself is protected by a double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from hub import tokens
from hub.errors import BadRequest, Forbidden, Unauthorized
from hub.storage.db import Database
from hub.tokens import Principal

COOKIE = "edgefleet_session"
SIGNIN_COOKIE = "edgefleet_signin"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_FORM_BYTES = 64 * 1024
SESSION_SECONDS = 12 * 3600


class SignInNeeded(Exception):
    """No session, or its token no longer works: the page sends the user to sign in."""


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), b"edgefleet-ui-csrf", hashlib.sha256).hexdigest()


def current(request: Request, db: Database) -> tuple[Principal, str]:
    """The signed-in principal and their CSRF token; SignInNeeded if there is none."""
    secret = request.cookies.get(COOKIE, "")
    if not secret.startswith(tokens.TOKEN_PREFIX):
        raise SignInNeeded()
    try:
        principal = tokens.authenticate(db, secret)
    except Unauthorized:
        raise SignInNeeded() from None
    request.state.principal = principal  # the audit log names the actor from this
    return principal, csrf_token(secret)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def start(response: Response, request: Request, secret: str) -> None:
    response.set_cookie(COOKIE, secret, max_age=SESSION_SECONDS, path="/ui", httponly=True,
                        samesite="strict", secure=_secure(request))
    response.delete_cookie(SIGNIN_COOKIE, path="/ui")


def end(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")


def signin_nonce(request: Request) -> str:
    """The sign-in form's CSRF value: the browser's, or a new one."""
    return request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(24)


def keep_signin_nonce(response: Response, request: Request, nonce: str) -> None:
    """Set as a cookie too: the POST must send the same value in the form."""
    response.set_cookie(SIGNIN_COOKIE, nonce, max_age=3600, path="/ui", httponly=True,
                        samesite="strict", secure=_secure(request))


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form body, at most MAX_FORM_BYTES; the last value of a repeated field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest(f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        return dict(parse_qsl(body.decode("utf-8"), max_num_fields=100))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form is not valid url-encoded UTF-8") from None


def check_origin(request: Request) -> None:
    """A browser names the page a POST comes from; another site's page is refused."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise Forbidden(f"this form was sent from {origin[:100]}, not from the hub's own pages")


def check_csrf(request: Request, expected: str, form: dict[str, str]) -> None:
    check_origin(request)
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")
