"""`POST /api/inspect`: the step-by-step stream of a generation, as named SSE events.

Events `prefill`, `token` (one per new token), `done`, `error`; the schema (version `SCHEMA`) is
documented in docs/INSPECTOR.md. `POST /api/inspect/{id}/cancel` stops a generation from another
connection (the page's stop button); closing the stream stops it too.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pocketlm.infer.generate import Generation, Step
from pocketlm.infer.config import MAX_REPEAT_PENALTY, PENALTY_RANGE, StatsRequest
from pocketlm.infer.sampling import GenConfig
from pocketlm.serve.engine import ClientGone, JobResponse
from pocketlm.serve.prompt import (SEED_MAX, SEED_MIN, Message, RequestError, chat_prompt, check_max_tokens,
                                   check_messages, check_prompt_length, fitted_chat_prompt)
from pocketlm.serve.tokens import TokenTable, finite_logprob

SCHEMA = 1
router = APIRouter()
log = logging.getLogger("pocketlm.serve")


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # our own API: a misspelt option is an error, not ignored

    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)  # raw text to continue, no chat template
    max_tokens: int | None = Field(default=None, ge=1)  # None: until <|eot|> or the end of the context
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=MAX_REPEAT_PENALTY)
    repeat_last_n: int = Field(default=64, ge=-1)
    frequency_penalty: float = Field(default=0.0, ge=-PENALTY_RANGE, le=PENALTY_RANGE)
    presence_penalty: float = Field(default=0.0, ge=-PENALTY_RANGE, le=PENALTY_RANGE)
    top_alternatives: int = Field(default=5, ge=0, le=20)
    logit_lens: bool = False
    lens_top: int = Field(default=3, ge=1, le=10)
    attn_entropy: bool = False
    # Drop the oldest turns until the prompt leaves room for the reply (the prefill event says how many).
    fit_context: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> InspectRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (a chat) or 'prompt' (text to continue)")
        return self


def _event(name: str, data: dict) -> dict:
    # allow_nan=False: a NaN or inf that slipped through fails loudly instead of writing invalid JSON.
    return {"event": name, "data": json.dumps({"v": SCHEMA, **data}, allow_nan=False)}


def token_event(step: Step, table: TokenTable) -> dict:
    s = step.stats  # the inspector always asks for statistics
    data = {**table.entry(step.id, s.logprob), "index": step.index, "text": step.text,
            "entropy": s.entropy, "top": [table.entry(i, lp) for i, lp in s.top],
            "cache_len": step.cache_len, "cache_bytes": step.cache_bytes, "ms": step.ms}
    if s.lens is not None:
        data["lens"] = [[{"id": i, "token": table.labels[i], "prob": p} for i, p in layer] for layer in s.lens]
    if s.attn_entropy is not None:
        data["attn_entropy"] = s.attn_entropy
    if s.penalized_logprob is not None:  # penalties were on: the chosen token's logprob after them
        data["penalized_logprob"] = finite_logprob(s.penalized_logprob)
    return data


def done_event(gen: Generation, text: str) -> dict:
    return {"finish_reason": gen.finish_reason, "new_tokens": gen.n_tokens, "prefill_ms": gen.prefill.ms,
            "decode_ms": gen.decode_ms, "decode_tok_s": gen.decode_tok_s, "text": text}


def _prompt(state, body: InspectRequest, context: int, cancel) -> tuple[list[int], int]:
    """(prompt ids, messages dropped to fit). Tokenizing is CPU work: it runs in a worker thread, and
    fitting stops once `cancel` is set (the client left)."""
    if body.prompt is not None:
        prompt = state.tok.encode(body.prompt)
        check_prompt_length(len(prompt), "prompt", context)
        return prompt, 0
    if body.fit_context:
        return fitted_chat_prompt(state.tok, body.messages, context, body.max_tokens or context, cancel)
    return chat_prompt(state.tok, body.messages, context), 0


@router.post("/api/inspect")
async def inspect(body: InspectRequest, request: Request) -> JobResponse:
    state = request.app.state
    context = state.model.cfg.block_size
    check_max_tokens(body.max_tokens, "max_tokens", context)
    check_messages(body.messages, state.max_messages)
    engine = state.engine
    job = engine.admit()  # before any work: a 429 costs nothing
    try:
        prompt, dropped = await engine.prepare(job, request.receive, _prompt, state, body, context, job.cancel)
        cfg = GenConfig(max_new_tokens=body.max_tokens or context, temperature=body.temperature, top_k=body.top_k,
                        top_p=body.top_p, seed=body.seed, repeat_penalty=body.repeat_penalty,
                        repeat_last_n=body.repeat_last_n, frequency_penalty=body.frequency_penalty,
                        presence_penalty=body.presence_penalty)
        stats = StatsRequest(top_alternatives=body.top_alternatives, logit_lens=body.logit_lens,
                             lens_top=body.lens_top, attn_entropy=body.attn_entropy)
        engine.start(job, prompt, cfg, stats)
    except ClientGone:  # left while its prompt was prepared: nobody to answer, its slot is free
        engine.release(job)
        return Response(status_code=499)
    except BaseException:
        engine.release(job)
        raise
    table: TokenTable = state.tokens

    async def events():
        text = []
        try:
            async for step in engine.steps(job):
                if step.index == 0:
                    p = job.gen.prefill
                    yield _event("prefill", {
                        "request_id": job.id, "n_tokens": p.n_tokens, "ms": p.ms, "cache_len": p.cache_len,
                        "cache_bytes": p.cache_bytes, "context": context, "dropped": dropped,
                        "tokens": [{"id": i, "token": table.labels[i], "bytes": list(table.bytes[i])} for i in prompt]})
                text.append(step.text)
                yield _event("token", token_event(step, table))
            yield _event("done", done_event(job.gen, "".join(text)))
        except Exception as e:  # reported to the client as an `error` event, and logged in full
            log.exception("generation %s failed", job.id)
            yield _event("error", {"message": f"{type(e).__name__}: {e}"})

    return JobResponse(events(), engine, job)


@router.post("/api/inspect/{job_id}/cancel")
async def cancel(job_id: str, request: Request) -> dict:
    job = request.app.state.engine.jobs.get(job_id)
    if job is None:
        raise RequestError(404, f"no running generation {job_id!r} (it may have finished already)", "job_id")
    job.cancel.set()
    return {"id": job_id, "cancelled": True}
