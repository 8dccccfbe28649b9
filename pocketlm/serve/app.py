"""The inspector server: the OpenAI-compatible API, the inspector stream, and the web page at `/`.

`create_app` takes an already loaded model, so tests build apps around small models directly;
`pocketlm serve` loads a model folder and runs this app under uvicorn. Nothing is loaded from outside
the machine: the interactive API docs (which pull Swagger UI from a CDN) are off; the schema itself is
at /openapi.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from pocketlm import __version__
from pocketlm.serve import inspect, openai_api, run_page
from pocketlm.serve.engine import Engine
from pocketlm.serve.guard import Guard, GuardConfig
from pocketlm.serve.prompt import DEFAULT_MAX_MESSAGES, RequestError, error_response
from pocketlm.serve.tokens import TokenTable

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("pocketlm.serve")
# What the page starts its controls with; max_tokens is further capped at half the context.
PAGE_DEFAULTS = {"max_tokens": 200, "temperature": 0.8, "top_alternatives": 8}


class GuardedApp(FastAPI):
    """FastAPI with the Guard (pocketlm/serve/guard.py) outside everything else, the 500 handler
    included: every response, whichever route or middleware made it, passes through it."""

    def build_middleware_stack(self):
        return Guard(super().build_middleware_stack(), self.state.guard)


def create_app(model: torch.nn.Module, tok, model_id: str = "pocketlm", max_active: int = 64,
               guard: GuardConfig | None = None, max_messages: int = DEFAULT_MAX_MESSAGES) -> FastAPI:
    """`max_active`: generations allowed at once (each holds a KV cache); more get a 429.
    `guard`: accepted Host names and the body size limit (default: loopback names, 1 MB).
    `max_messages`: messages allowed in one request; more get a 400."""
    app = GuardedApp(title="pocketlm", version=__version__, docs_url=None, redoc_url=None)
    app.state.guard = guard or GuardConfig()
    app.state.model = model.eval()
    app.state.tok = tok
    app.state.model_id = model_id
    app.state.max_messages = max_messages
    app.state.engine = Engine(model, tok, max_active)
    app.state.tokens = TokenTable(tok)
    app.include_router(openai_api.router)
    app.include_router(inspect.router)
    app.include_router(run_page.router)  # /run: a training run (app.state.run_dir, set by `serve --run`)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"][1:]]  # drop the leading "body" (or "path")
        if err["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                  "body")
        param = ".".join(loc) or "body"
        return error_response(400, f"{param}: {err['msg']}", param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):  # unknown paths, wrong methods: the same JSON shape
        # FastAPI's own 400 is a body it could not read at all (e.g. not UTF-8): the body is at fault.
        return error_response(e.status_code, str(e.detail), "body" if e.status_code == 400 else None)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):  # a bug, not the client's fault: logged, said in JSON
        log.exception("request failed")
        return error_response(500, f"internal error ({type(e).__name__}); see the server's log", None)

    @app.get("/api/info")
    async def info() -> dict:
        engine: Engine = app.state.engine
        p = next(model.parameters())
        context = model.cfg.block_size
        defaults = {**PAGE_DEFAULTS, "max_tokens": min(PAGE_DEFAULTS["max_tokens"], context // 2)}
        return {"model": app.state.model_id,  # the run page may load another checkpoint of the run
                "version": __version__, "schema": inspect.SCHEMA, "config": model.cfg.to_dict(),
                "context": context, "defaults": defaults,
                "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                "vocab_size": tok.vocab_size, "active": len(engine.jobs), "finished": dict(engine.finished)}

    # HEAD as well as GET: a HEAD gets the GET's headers and no body (FileResponse sends none for it).
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
