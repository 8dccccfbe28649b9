"""Request pieces shared by both endpoints: messages, prompt building and limits, and errors.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) and name the field at
fault in `param` (dotted path, e.g. `messages.1.role`), for the chat API and the inspector alike.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pocketlm.tokenizer.chat_template import format_chat_tokens


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class RequestError(Exception):
    """A client error: becomes a 4xx JSON response (see `error_response`)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def chat_prompt(tok, messages: list[Message], context: int) -> list[int]:
    """The chat template applied to `messages`, refused if it leaves no room in the context."""
    ids = format_chat_tokens(tok, [m.model_dump() for m in messages], add_generation_prompt=True)
    check_prompt_length(len(ids), "messages", context)
    return ids


def check_prompt_length(n: int, param: str, context: int) -> None:
    # A prompt of exactly `context` tokens still gets one new token; one more cannot be read at all.
    if n > context:
        raise RequestError(400, f"the prompt is {n} tokens but the model's context is {context}; "
                                "send fewer or shorter messages", param)


def check_max_tokens(value: int | None, param: str, context: int) -> None:
    if value is not None and value > context:
        raise RequestError(400, f"{param}={value} is more than the model's context ({context} tokens)", param)
