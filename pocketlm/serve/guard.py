"""What every request passes before it reaches a route: its Host, its Origin, and its body size.

- Host: only names of this machine's loopback (plus the names the user allowed), so a web page whose
  DNS name is re-bound to 127.0.0.1 ("DNS rebinding") cannot talk to the server as if it were local.
- Origin: a browser request that changes state (POST & co.) must come from this server's own page;
  another site's page (`Origin: https://evil.example`, or `null`) gets a 403. Clients that are not
  browsers (curl, the `openai` client) send no Origin and are not affected.
- Body: read whole (bodies are small: a chat within the context) and refused with a 413 past the
  limit, before any JSON parsing or tokenizing, so one huge request cannot stall everyone.

Written as plain ASGI middleware: it runs before FastAPI's routing and body parsing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pocketlm.serve.prompt import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY_BYTES = 1_000_000  # a full 1024-token context is ~4 KB of text: 1 MB is far beyond any chat
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass
class GuardConfig:
    allowed_hosts: tuple[str, ...] = field(default=LOOPBACK_HOSTS)  # "*" allows any Host (no rebinding guard)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def host_name(host: str) -> str:
    """`localhost:8000` -> `localhost`, `[::1]:8000` -> `::1`; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bind_host: str, extra: list[str]) -> tuple[str, ...]:
    """Loopback names, the interface the server binds (unless it is a wildcard) and the user's names."""
    names = list(LOOPBACK_HOSTS)
    if bind_host not in ("0.0.0.0", "::", ""):
        names.append(host_name(bind_host))
    names += [host_name(h) if h != "*" else h for h in extra]
    return tuple(dict.fromkeys(names))


async def _send_error(send, status: int, message: str, param: str) -> None:
    """The same `{"error": {...}}` shape as every other error of this server."""
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, cfg: GuardConfig) -> None:
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if "*" not in self.cfg.allowed_hosts and host_name(host) not in self.cfg.allowed_hosts:
            return await _send_error(send, 400, (
                f"Host {host!r} is not one of this server's names ({', '.join(self.cfg.allowed_hosts)}); "
                "start the server with --allow-host NAME to accept another"), "host")
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not _same_origin(origin, host):
            return await _send_error(send, 403, f"cross-origin request from {origin!r} refused: only this "
                                                "server's own page may change its state", "origin")
        if scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, which the routes listen for

        await self.app(scope, replay, send)

    async def _read_body(self, headers: dict[str, str], receive, send) -> bytes | None:
        """The whole body, or None once a 413 was sent (or the client left)."""
        limit = self.cfg.max_body_bytes
        too_big = (f"the request body is larger than this server's limit of {limit} bytes "
                   "(pocketlm serve --max-body-bytes)")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, too_big, "body")
            return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body with no (or a false) Content-Length
                await _send_error(send, 413, too_big, "body")
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


def _same_origin(origin: str, host: str) -> bool:
    """An Origin is this server's own when its host[:port] is the request's Host."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()
