"""`POST /v1/chat/completions` and `GET /v1/models`, shaped exactly like the OpenAI API.

So the official `openai` client works unchanged. Generation ends on the `<|eot|>` id
(`finish_reason: "stop"`) or at `max_tokens` / the context end (`"length"`); the eot token itself is
never part of the content or the logprobs. `frequency_penalty` and `presence_penalty` count the tokens
sampled in the reply (the prompt is not counted). Logprobs are the model's own (temperature 1, before
the penalties and top-p), in nats, clamped at -9999.0 (JSON has no -inf). A trailing assistant message
is continued: the reply carries on from its last word (its `<|eot|>` is left off), so callers can
prefill an answer.
An error during a stream ends it with an `{"error": {...}}` chunk and `[DONE]`, as the OpenAI API does.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pocketlm.infer.generate import Step
from pocketlm.infer.config import PENALTY_RANGE, StatsRequest
from pocketlm.infer.sampling import GenConfig
from pocketlm.serve.engine import ClientGone, JobResponse
from pocketlm.serve.prompt import (SEED_MAX, SEED_MIN, Message, chat_prompt, check_max_tokens, check_messages,
                                   error_body)

router = APIRouter()
log = logging.getLogger("pocketlm.serve")
# A generation is only cancelled when its client went away, so no client ever reads "cancelled".
FINISH = {"eot": "stop", "length": "length", "cancelled": "stop"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields this server has no use for (user, metadata, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    # OpenAI's semantics (infer/sampling.py Penalties): counts of the tokens sampled in this reply.
    # null, as some clients send for "not set", means 0.
    frequency_penalty: float | None = Field(default=None, ge=-PENALTY_RANGE, le=PENALTY_RANGE)
    presence_penalty: float | None = Field(default=None, ge=-PENALTY_RANGE, le=PENALTY_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: Literal[1] = 1
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop_strings(cls, v: str | list[str] | None) -> None:
        # Text stop strings would need substring matching; the model ends its turn with <|eot|> instead.
        if v:
            raise ValueError("stop sequences are not supported: generation stops at the <|eot|> token")
        return None


def _model_id(request: Request) -> str:
    return request.app.state.model_id


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [{"id": _model_id(request), "object": "model", "created": 0,
                                        "owned_by": "pocketlm"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    context = state.model.cfg.block_size
    max_tokens = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    check_max_tokens(max_tokens, field, context)
    check_messages(body.messages, state.max_messages)
    engine = state.engine
    job = engine.admit()  # before any work: a 429 costs nothing
    try:
        prompt = await engine.prepare(job, request.receive, chat_prompt, state.tok, body.messages, context)
        cfg = GenConfig(max_new_tokens=max_tokens or context, temperature=body.temperature,
                        top_p=body.top_p, seed=body.seed, frequency_penalty=body.frequency_penalty or 0.0,
                        presence_penalty=body.presence_penalty or 0.0)
        # Per-token statistics only when the client asked for logprobs: without them decoding is fastest.
        engine.start(job, prompt, cfg, StatsRequest(top_alternatives=body.top_logprobs or 0) if body.logprobs
                     else None)
    except ClientGone:  # left while its prompt was prepared: nobody to answer, its slot is free
        engine.release(job)
        return Response(status_code=499)
    except BaseException:
        engine.release(job)
        raise
    head = {"id": f"chatcmpl-{job.id}", "created": int(time.time()), "model": body.model or _model_id(request),
            "system_fingerprint": None}
    table = state.tokens

    def openai_entry(token_id: int, logprob: float) -> dict:
        e = table.entry(token_id, logprob)
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    def logprobs(step: Step) -> dict:
        return {**openai_entry(step.id, step.stats.logprob),
                "top_logprobs": [openai_entry(i, lp) for i, lp in step.stats.top]}

    def usage(n: int) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def visible(step: Step) -> bool:
        return step.id != state.tok.eot_id

    if not body.stream:
        try:
            steps = await engine.collect(job, request.receive)
        except ClientGone:  # nobody is left to read an answer; the generation has been stopped
            return Response(status_code=499)
        finally:
            engine.release(job)
        shown = [s for s in steps if visible(s)]
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(s.text for s in shown)},
                  "logprobs": {"content": [logprobs(s) for s in shown]} if body.logprobs else None,
                  "finish_reason": FINISH[job.gen.finish_reason]}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(len(steps))}

    def chunk(delta: dict, finish: str | None = None, lp: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [choice]},
                                   allow_nan=False)}

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            n = 0
            async for step in engine.steps(job):
                n += 1
                if visible(step):
                    yield chunk({"content": step.text}, lp={"content": [logprobs(step)]} if body.logprobs else None)
            yield chunk({}, FINISH[job.gen.finish_reason])
            if body.stream_options and body.stream_options.include_usage:
                yield {"data": json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(n)})}
        except Exception as e:  # the stream still ends properly: an error chunk, then [DONE]
            log.exception("generation %s failed", job.id)
            yield {"data": json.dumps(error_body(500, f"{type(e).__name__}: {e}", None))}
        yield {"data": "[DONE]"}

    return JobResponse(events(), engine, job)
