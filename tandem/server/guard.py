"""The ASGI guard in front of every route: Host check (DNS rebinding), API key, request body size.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, whose wrapped `receive` hides the client's http.disconnect
from handlers (a non-streaming request could not notice that its client went away).
"""

from __future__ import annotations

import hmac
import json

from tandem.server.protocol import APIError

OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes)


def json_bytes(body: dict) -> bytes:
    """JSON as UTF-8; text that cannot be UTF-8 (a lone surrogate echoed from a request) becomes '?'."""
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")


def host_of(value: str) -> str:
    """'Example.com:8080' -> 'example.com'; '[::1]:8080' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app, *, api_key: str | None, allowed_hosts: list[str] | None, max_body_bytes: int,
                 on_reject=None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed = {host_of(h) for h in allowed_hosts} if allowed_hosts else None
        self.max_body = max_body_bytes
        self.on_reject = on_reject  # callback(path, status): the server's metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = self._check(scope["path"], headers)
        if err is not None:
            return await self._reject(scope, send, err)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                receive = await self._buffered(headers, receive)
            except APIError as e:
                return await self._reject(scope, send, e)
            if receive is None:  # the client left while sending its body
                return
        await self.app(scope, receive, send)

    def _check(self, path: str, headers: dict) -> APIError | None:
        if self.allowed is not None:
            host = headers.get("host")
            if not host:
                return APIError(400, "the request has no Host header", None, "invalid_host")
            if host_of(host) not in self.allowed:
                return APIError(403, f"host {host_of(host)!r} is not in this server's --allowed-hosts", None,
                                "invalid_host")
        if self.api_key is not None and path not in OPEN_PATHS:
            got = headers.get("authorization", "")
            token = got[7:].strip() if got[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key):
                return APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None,
                                "invalid_api_key")
        return None

    async def _buffered(self, headers: dict, receive):
        """Read the whole body (at most max_body bytes), then hand it to the app in one message; later receive()
        calls go to the client (http.disconnect)."""
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_body} bytes",
                           None, "request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay

    async def _reject(self, scope, send, e: APIError) -> None:
        if self.on_reject is not None:
            self.on_reject(scope["path"], e.status)
        payload = json_bytes(e.body())
        await send({"type": "http.response.start", "status": e.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
