"""Request pieces shared by both endpoints: messages, prompt building and limits, and errors.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) and name the field at
fault in `param` (dotted path, e.g. `messages.1.role`), for the chat API and the inspector alike.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pocketlm import PocketLMError
from pocketlm.infer.chat import chat_prompt_ids, fit_messages, prompt_limit


# Messages per request: a long chat that still fits a 1024-token context has far fewer (each is at
# least 2 tokens); more is a client's mistake or an attack, refused before any work.
DEFAULT_MAX_MESSAGES = 1024

# Seeds go to torch.Generator.manual_seed, which takes this range; outside it a seed is a 400, not a 500.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class RequestError(Exception):
    """A client error: becomes a 4xx JSON response (see `error_response`)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None) -> dict:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def chat_prompt(tok, messages: list[Message], context: int) -> list[int]:
    """The chat template applied to `messages` (a trailing assistant message is continued), refused
    if it leaves no room in the context."""
    ids = chat_prompt_ids(tok, [m.model_dump() for m in messages])
    check_prompt_length(len(ids), "messages", context)
    return ids


def check_messages(messages: list[Message] | None, limit: int) -> None:
    if messages is not None and len(messages) > limit:
        raise RequestError(400, f"{len(messages)} messages is more than this server takes in one request "
                                f"({limit}, pocketlm serve --max-messages); send fewer", "messages")


def fitted_chat_prompt(tok, messages: list[Message], context: int, max_tokens: int,
                       cancel=None) -> tuple[list[int], int]:
    """(ids, dropped): the oldest turns dropped until the prompt leaves room for a reply (as in `pocketlm
    chat`). `cancel`: a threading.Event that stops the fitting (FitCancelled) once the client has left."""
    try:
        return fit_messages(tok, [m.model_dump() for m in messages], prompt_limit(context, max_tokens), cancel)
    except PocketLMError as e:
        raise RequestError(400, str(e), "messages") from None


def check_prompt_length(n: int, param: str, context: int) -> None:
    # A prompt of exactly `context` tokens still gets one new token; one more cannot be read at all.
    if n > context:
        raise RequestError(400, f"the prompt is {n} tokens but the model's context is {context}; "
                                "send fewer or shorter messages", param)


def check_max_tokens(value: int | None, param: str, context: int) -> None:
    if value is not None and value > context:
        raise RequestError(400, f"{param}={value} is more than the model's context ({context} tokens)", param)
