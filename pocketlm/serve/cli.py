"""`pocketlm serve`: the inspector page, its SSE stream and the OpenAI-compatible API for one model."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from pocketlm.model.naming import model_id
from pocketlm.serve.deadlines import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEPALIVE_TIMEOUT_S
from pocketlm.serve.guard import DEFAULT_MAX_BODY_BYTES
from pocketlm.serve.prompt import DEFAULT_MAX_MESSAGES


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: web inspector at /, OpenAI-compatible API under /v1")
    p.add_argument("--ckpt", help="a model folder (model.safetensors, model.json, tokenizer.model); with --run, "
                                  "default: the run's newest checkpoint")
    p.add_argument("--run", help="a run folder (runs/NAME), shown live at /run: curves, samples, snapshots")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default: 8000)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cuda | mps | cpu")
    p.add_argument("--max-active", type=int, default=64,
                   help="generations running at once; more get HTTP 429 (default: 64)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host is NAME (repeatable); loopback names and --host are "
                        "always accepted. '*' accepts any name and turns off the DNS-rebinding guard")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get HTTP 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--max-messages", type=positive(int), default=DEFAULT_MAX_MESSAGES,
                   help=f"most messages in one request; more get HTTP 400 (default: {DEFAULT_MAX_MESSAGES})")
    p.add_argument("--header-timeout", type=positive(float), default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                   help="seconds a client has to send a request's headers, from its first byte; slower "
                        f"clients get HTTP 408 and are disconnected (default: {DEFAULT_HEADER_TIMEOUT_S:g})")
    p.add_argument("--body-timeout", type=positive(float), default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                   help=f"seconds a client has to send a request's body (default: {DEFAULT_BODY_TIMEOUT_S:g})")
    p.add_argument("--keepalive-timeout", type=positive(float), default=DEFAULT_KEEPALIVE_TIMEOUT_S, metavar="S",
                   help="seconds an idle connection is kept open between requests "
                        f"(default: {DEFAULT_KEEPALIVE_TIMEOUT_S:g})")
    p.add_argument("--name", help="the model's id in the API and the page (default: from the run's folders)")
    p.set_defaults(handler=run_serve)


def port_number(value: str) -> int:
    """argparse type: a TCP port a server can listen on."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return port


def positive(kind):
    """argparse type: a number of `kind` greater than 0."""
    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            x = 0
        if not x > 0:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number greater than 0")
        return x

    parse.__name__ = kind.__name__
    return parse


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything says it is serving: a port in use is one clear line."""
    from pocketlm import PocketLMError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PocketLMError(f"port {port} on {host} is already in use (another server?); "
                                "pick a free one with --port") from None
        raise PocketLMError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    return sock


def model_name(ckpt: str) -> str:
    """The model's public id, as exports name it (pocketlm/model/naming.py)."""
    return model_id(ckpt)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pocketlm import PocketLMError
    from pocketlm.model.io import load_model
    from pocketlm.serve.app import create_app
    from pocketlm.serve.deadlines import deadline_protocol
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
    app = create_app(model, tok, model_id=name, max_active=args.max_active, guard=guard,
                     max_messages=args.max_messages)
    if args.run:
        app.state.run_dir = Path(args.run).resolve()
    # No `server: uvicorn` banner; read deadlines and the idle timeout from the options (deadlines.py).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", server_header=False,
                            timeout_keep_alive=args.keepalive_timeout,
                            http=deadline_protocol(args.header_timeout, args.body_timeout))
    sock = listen_socket(args.host, args.port)
    print(f"pocketlm serve: {name} on http://{args.host}:{args.port}/ (accepting Host: "
          f"{', '.join(guard.allowed_hosts)})", file=sys.stderr)
    if args.run:
        print(f"pocketlm serve: run {app.state.run_dir.name} on http://{args.host}:{args.port}/run", file=sys.stderr)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
