"""`pocketlm serve`: the inspector page, its SSE stream and the OpenAI-compatible API for one model."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: web inspector at /, OpenAI-compatible API under /v1")
    p.add_argument("--ckpt", required=True, help="a model folder (model.safetensors, model.json, tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cuda | mps | cpu")
    p.add_argument("--max-active", type=int, default=64,
                   help="generations running at once; more get HTTP 429 (default: 64)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pocketlm.model.io import load_model
    from pocketlm.serve.app import create_app
    from pocketlm.device import pick_device

    # Load before binding the port, so a bad checkpoint fails at start with the loader's message.
    model, tok, _meta = load_model(args.ckpt, pick_device(args.device))
    # The folder as given (e.g. runs/x/sft/best) names the model: its last part alone is often just "best".
    app = create_app(model, tok, model_id=args.ckpt.rstrip("/"), max_active=args.max_active)
    print(f"pocketlm serve: {args.ckpt} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
