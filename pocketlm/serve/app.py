"""The inspector server: the OpenAI-compatible API, the inspector stream, and the web page at `/`.

`create_app` takes an already loaded model, so tests build apps around small models directly;
`pocketlm serve` loads a model folder and runs this app under uvicorn.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from pocketlm import __version__
from pocketlm.serve import inspect, openai_api
from pocketlm.serve.engine import Engine
from pocketlm.serve.prompt import RequestError, error_response
from pocketlm.serve.tokens import TokenTable

STATIC = Path(__file__).parent / "static"


def create_app(model: torch.nn.Module, tok, model_id: str = "pocketlm", max_active: int = 64) -> FastAPI:
    """`max_active`: generations allowed at once (each holds a KV cache); more get a 429."""
    app = FastAPI(title="pocketlm", version=__version__)
    app.state.model = model.eval()
    app.state.tok = tok
    app.state.model_id = model_id
    app.state.engine = Engine(model, tok, max_active)
    app.state.tokens = TokenTable(tok)
    app.include_router(openai_api.router)
    app.include_router(inspect.router)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"][1:]]  # drop the leading "body"
        if err["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                  "body")
        param = ".".join(loc) or "body"
        return error_response(400, f"{param}: {err['msg']}", param)

    @app.get("/api/info")
    async def info() -> dict:
        engine: Engine = app.state.engine
        p = next(model.parameters())
        return {"model": model_id, "version": __version__, "schema": inspect.SCHEMA, "config": model.cfg.to_dict(),
                "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                "vocab_size": tok.vocab_size, "active": len(engine.jobs), "finished": dict(engine.finished)}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
