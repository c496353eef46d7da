"""Exposure controls in one ASGI middleware: HTTP basic auth, Host and Origin checks, body caps.

- Auth (A1111's `--api-auth`) covers every route, the web UI included; user and password are
  compared in constant time (`hmac.compare_digest`), all entries checked.
- Host: a loopback server answers only loopback names (or `--allowed-host`), which stops DNS
  rebinding; a `--listen` server accepts any Host (it has credentials, or was told --insecure).
- Origin: a state-changing request from a browser must come from this server's own origin;
  `Origin: null`, foreign origins and `Sec-Fetch-Site: cross-site` get 403. No CORS headers are
  ever sent, so other sites cannot read responses either.
- Bodies: over the cap, 413 from Content-Length, or as soon as the streamed bytes pass it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _split_host(value: str) -> str:
    """The host part of a Host header or netloc, without the port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": "HTTPException", "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps the app; refuses a request before it reaches a route when a check fails."""

    def __init__(self, app: ASGIApp, *, credentials: dict[str, str], allowed_hosts: tuple[str, ...],
                 any_host: bool, max_body_bytes: int):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials.items()]
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_NAMES, *allowed_hosts)}
        self.any_host = any_host
        self.max_body_bytes = max_body_bytes

    def _authorized(self, header: str | None) -> bool:
        if not self.credentials:
            return True
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        matched = False
        for known_user, known_password in self.credentials:
            # both comparisons always run, for every entry, so timing reveals nothing
            same_user = hmac.compare_digest(user, known_user)
            same_password = hmac.compare_digest(password, known_password)
            matched |= same_user and same_password
        return matched

    def _origin_allowed(self, headers: dict[str, str], host: str) -> bool:
        if headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = headers.get("origin")
        if origin is None:
            return True  # not a browser cross-origin request (curl, Python clients)
        parts = urlsplit(origin)
        return origin != "null" and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        """Why a request with these (lower-cased) headers is refused: (status, detail, extra headers),
        or None when it may go on. The same decision for every way a request arrives."""
        host = headers.get("host", "")
        if not self.any_host and _split_host(host) not in self.allowed_hosts:
            return 403, f"unknown Host header {host!r}; start the server with --allowed-host", {}
        if not self._authorized(headers.get("authorization")):
            return 401, "Incorrect username or password", {"WWW-Authenticate": 'Basic realm="sdgen"'}
        if method not in SAFE_METHODS and not self._origin_allowed(headers, host):
            return 403, "cross-origin request refused", {}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return 413, f"request body over {self.max_body_bytes} bytes", {}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self.refusal(scope["method"], headers)
        if refused is not None:
            await _reply(send, *refused)
            return
        await self._call_capped(scope, receive, send)

    async def _call_capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read a request body whole (it is capped) before the app sees it, then replay it."""
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
