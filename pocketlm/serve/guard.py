"""What every request passes before it reaches a route (its Host, its Origin, its body), and what
every response carries.

- Host: only names of this machine's loopback (plus the names the user allowed), so a web page whose
  DNS name is re-bound to 127.0.0.1 ("DNS rebinding") cannot talk to the server as if it were local.
  The value is parsed strictly as an RFC 3986 authority (reg-name, IPv4 or [IPv6], then an optional
  port of digits); anything else (`[::1].evil.com`, `localhost:80@evil.com`) is refused.
- Origin: a browser request that changes state (POST & co.) must come from this server's own page;
  another site's page (`Origin: https://evil.example`, or `null`) gets a 403. Clients that are not
  browsers (curl, the `openai` client) send no Origin and are not affected.
- Body: read whole (bodies are small: a chat within the context) and refused with a 413 past the
  limit, before any JSON parsing or tokenizing, so one huge request cannot stall everyone. A JSON
  string holding a lone UTF-16 surrogate (`"\\ud800"`) is not text: it gets a 400 naming its field,
  whichever endpoint and field it is in, before any route or tokenizer sees it.
- Responses: every one (pages, files, API, errors) carries SECURITY_HEADERS, so no other site can frame
  the page or make the browser guess content types; a 429 says when to retry.

Written as plain ASGI middleware around the whole app (create_app puts it outside even the 500
handler), so routes added later get all of this too.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pocketlm import PocketLMError

from pocketlm.serve.prompt import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY_BYTES = 1_000_000  # a full 1024-token context is ~4 KB of text: 1 MB is far beyond any chat
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# On every response. No inline script or style anywhere in the page, so `'self'` is the whole policy;
# frame-ancestors / X-Frame-Options: no other page may frame this one (clickjacking).
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
RETRY_AFTER_S = 1  # generations take seconds; a client told to wait 1 s finds a free slot soon enough


@dataclass
class GuardConfig:
    allowed_hosts: tuple[str, ...] = field(default=LOOPBACK_HOSTS)  # "*" allows any Host (no rebinding guard)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


# RFC 3986 authority without userinfo: host = IP-literal / IPv4address / reg-name, then [":" port].
# (An IPv4 address is also a reg-name; IPvFuture literals are not accepted.)
_REG_NAME = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
_AUTHORITY = re.compile(rf"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>{_REG_NAME}))(?::[0-9]*)?")


def host_name(host: str) -> str | None:
    """The host of a Host header value: `localhost:8000` -> `localhost`, `[::1]:8000` -> `::1` (lower
    case); None when the value is not an RFC 3986 authority (`[::1]evil`, `a:1@b`)."""
    m = _AUTHORITY.fullmatch(host)
    if m is None:
        return None
    if m["ip6"] is None:
        return m["name"].lower()
    try:
        return ipaddress.IPv6Address(m["ip6"]).compressed
    except ValueError:
        return None


def _name_arg(value: str, flag: str) -> str:
    """A host name given on the command line: a Host-style value, or a bare IPv6 address (`::1`)."""
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        pass
    name = host_name(value)
    if not name:
        raise PocketLMError(f"{flag} {value!r} is not a host name; give a name, an IPv4 address or [IPv6] "
                            "address, optionally with :PORT")
    return name


def allowed_hosts(bind_host: str, extra: list[str]) -> tuple[str, ...]:
    """Loopback names, the interface the server binds (unless it is a wildcard) and the user's names."""
    names = list(LOOPBACK_HOSTS)
    if bind_host not in ("0.0.0.0", "::", ""):
        names.append(_name_arg(bind_host, "--host"))
    names += [_name_arg(h, "--allow-host") if h != "*" else h for h in extra]
    return tuple(dict.fromkeys(names))


# A JSON escape that could be half of a surrogate pair, or a surrogate written as (invalid) UTF-8
# bytes, which Python's json.loads lets through too: only bodies that have one are searched.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # only a lone surrogate cannot be encoded
        return False


def lone_surrogate(value, path: str = "") -> tuple[str, str] | None:
    """(field, the bad code point as `\\udXXX`) of the first string, or object key, of a parsed JSON
    value that holds a lone UTF-16 surrogate; None if there is none. Fields are dotted paths
    (`messages.0.content`), as in every other error of this server; `body` is the whole body."""
    def where(key) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(value, str):
        if _is_text(value):
            return None
        bad = next(c for c in value if not _is_text(c))
        return path or "body", f"\\u{ord(bad):04x}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        if isinstance(key, str) and not _is_text(key):  # the key itself: named with the surrogate escaped
            return lone_surrogate(key, where(key.encode("utf-8", "backslashreplace").decode()))
        found = lone_surrogate(sub, where(key))
        if found:
            return found
    return None


async def _send_error(send, status: int, message: str, param: str | None) -> None:
    """The same `{"error": {...}}` shape as every other error of this server."""
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, cfg: GuardConfig) -> None:
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, asgi_send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, asgi_send)

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if message["status"] == 429:
                    extra.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                given = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in extra if k not in given)]}
            await asgi_send(message)

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
        bad = _SURROGATE_ESCAPE.search(body) and _lone_surrogate_in(body)
        if bad:
            param, code = bad
            return await _send_error(send, 400, f"{param}: {code} is a lone UTF-16 surrogate, not a character; "
                                                "send valid Unicode text", param)
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


def _lone_surrogate_in(body: bytes) -> tuple[str, str] | None:
    try:
        return lone_surrogate(json.loads(body))
    except ValueError:  # not JSON (or not UTF-8): the route's own parsing says so
        return None


def _same_origin(origin: str, host: str) -> bool:
    """An Origin is this server's own when its host[:port] is the request's Host."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()
