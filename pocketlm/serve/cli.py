"""`pocketlm serve`: the inspector page, its SSE stream and the OpenAI-compatible API for one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm.model.naming import model_id
from pocketlm.serve.guard import DEFAULT_MAX_BODY_BYTES


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: web inspector at /, OpenAI-compatible API under /v1")
    p.add_argument("--ckpt", help="a model folder (model.safetensors, model.json, tokenizer.model); with --run, "
                                  "default: the run's newest checkpoint")
    p.add_argument("--run", help="a run folder (runs/NAME), shown live at /run: curves, samples, snapshots")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cuda | mps | cpu")
    p.add_argument("--max-active", type=int, default=64,
                   help="generations running at once; more get HTTP 429 (default: 64)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host is NAME (repeatable); loopback names and --host are "
                        "always accepted. '*' accepts any name and turns off the DNS-rebinding guard")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get HTTP 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--name", help="the model's id in the API and the page (default: from the run's folders)")
    p.set_defaults(handler=run_serve)


def model_name(ckpt: str) -> str:
    """The model's public id, as exports name it (pocketlm/model/naming.py)."""
    return model_id(ckpt)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pocketlm import PocketLMError
    from pocketlm.model.io import load_model
    from pocketlm.serve.app import create_app
    from pocketlm.device import pick_device
    from pocketlm.serve.guard import GuardConfig, allowed_hosts

    if args.max_body_bytes < 1024:
        raise PocketLMError(f"--max-body-bytes {args.max_body_bytes} is too small for any chat; use 1024 or more")
    ckpt = args.ckpt
    if args.run:
        from pocketlm.serve.run_page import CONFIG_FILE, default_checkpoint, read_config

        if not (Path(args.run) / CONFIG_FILE).is_file():
            raise PocketLMError(f"--run {args.run}: no {CONFIG_FILE} there; pass a run folder (runs/NAME) that "
                                "pocketlm train has started")
        ckpt = ckpt or default_checkpoint(Path(args.run))
        if ckpt is None:
            every = (read_config(Path(args.run)) or {}).get("train", {}).get("eval_every", "?")
            raise PocketLMError(f"--run {args.run}: no checkpoint yet (training saves the first at step {every}, "
                                "its first evaluation); start serve after it, or pass --ckpt MODEL_DIR")
    elif not ckpt:
        raise PocketLMError("give --ckpt MODEL_DIR (a model to serve), --run runs/NAME (a run to watch), or both")
    # Load before binding the port, so a bad checkpoint fails at start with the loader's message.
    model, tok, _meta = load_model(ckpt, pick_device(args.device))
    guard = GuardConfig(allowed_hosts(args.host, args.allow_host), args.max_body_bytes)
    name = args.name or model_name(str(ckpt))
    app = create_app(model, tok, model_id=name, max_active=args.max_active, guard=guard)
    if args.run:
        app.state.run_dir = Path(args.run).resolve()
    print(f"pocketlm serve: {name} on http://{args.host}:{args.port}/ (accepting Host: "
          f"{', '.join(guard.allowed_hosts)})", file=sys.stderr)
    if args.run:
        print(f"pocketlm serve: run {app.state.run_dir.name} on http://{args.host}:{args.port}/run", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
