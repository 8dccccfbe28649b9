"""Read deadlines for `pocketlm serve`: a client must send its headers, then its body, in bounded time.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but
it has no deadline for reading a request: a client that sends one byte a second keeps its connection
(and its task) forever. This subclass of uvicorn's h11 protocol adds three timers:

- idle: a new connection that sends nothing is closed after the keep-alive timeout, as an idle
  keep-alive connection already is;
- headers: from a request's first byte to the end of its headers, at most `header_timeout` seconds;
- body: from the end of the headers to the end of the body, at most `body_timeout` seconds.

A client past a deadline gets a 408 (the same JSON error shape as every other error) and the
connection is closed; the ASGI app sees a disconnect. Other connections are not affected: each has
its own timers on the event loop. Once a request is read, no deadline applies to its answer (a
stream may run for minutes).
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketlm.serve.guard import SECURITY_HEADERS
from pocketlm.serve.prompt import error_body

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # a 1 MB body (the default limit) in 30 s is 33 KB/s: slower is not a real client
DEFAULT_KEEPALIVE_TIMEOUT_S = 5.0  # uvicorn's own default


def _timeout_response(part: str, seconds: float, option: str) -> bytes:
    body = json.dumps(error_body(408, f"the request's {part} took longer than {seconds:g} s to arrive "
                                      f"(pocketlm serve {option})", part)).encode()
    head = [b"HTTP/1.1 408 Request Timeout", b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(), b"connection: close",
            *(k + b": " + v for k, v in SECURITY_HEADERS)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class DeadlineProtocol(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = None  # (the timer, "headers" | "body") while a request is being read
        # Idle from the start: the same timer uvicorn arms after each response (data cancels it).
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # the first bytes of a request
            self._arm("headers")
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._deadline is not None and self._deadline[1] == "headers":
                self._arm("body")
        elif state is not h11.IDLE:  # read whole (or failed): nothing more to wait for
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, part: str) -> None:
        self._disarm()
        seconds = self.header_timeout if part == "headers" else self.body_timeout
        self._deadline = (self.loop.call_later(seconds, self._expired, part, seconds), part)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline[0].cancel()
            self._deadline = None

    def _expired(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if part == "body" else None  # while headers are read, no request of theirs runs
        if cycle is None or not cycle.response_started:
            option = "--header-timeout" if part == "headers" else "--body-timeout"
            self.transport.write(_timeout_response(part, seconds, option))
        if cycle is not None:  # the app stops waiting for the body; whatever it sends now goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def deadline_protocol(header_timeout: float, body_timeout: float) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these deadlines in seconds."""
    return type("DeadlineProtocol", (DeadlineProtocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
