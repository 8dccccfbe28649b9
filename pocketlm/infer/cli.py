"""`pocketlm generate` (one prompt, streamed) and `pocketlm chat` (multi-turn in the terminal)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading

from pocketlm import PocketLMError

# GenConfig fields offered as flags, with their types; the inspector-only ones live in the server.
SAMPLING_FLAGS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
                  "repeat_penalty": float, "repeat_last_n": int}


def _add_common(p: argparse.ArgumentParser) -> None:
    from pocketlm.infer.config import GenConfig

    p.add_argument("--ckpt", required=True, help="a model folder (model.safetensors, model.json, tokenizer.model)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cuda | mps | cpu")
    fields = {f.name: f for f in dataclasses.fields(GenConfig)}
    for name, tp in SAMPLING_FLAGS.items():
        f = fields[name]
        # default=None: `config.resolve` then takes the dataclass default, so defaults live only there.
        p.add_argument("--" + name.replace("_", "-"), type=tp, default=None,
                       help=f"{f.metadata['help']} (default: {f.default})")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    _add_common(g)
    g.add_argument("--prompt", required=True, help="text to continue (use `pocketlm chat` for a conversation)")
    g.set_defaults(handler=run_generate)
    c = sub.add_parser("chat", help="talk to a trained model in the terminal (/reset, /system TEXT)")
    _add_common(c)
    c.add_argument("--system", default=None, help="system prompt for the conversation")
    c.set_defaults(handler=run_chat)


def _load(args: argparse.Namespace):
    from pocketlm.config import resolve
    from pocketlm.infer.config import GenConfig
    from pocketlm.model.io import load_model
    from pocketlm.device import pick_device

    cfg = resolve(GenConfig, args)
    cfg.validate()
    model, tok, _meta = load_model(args.ckpt, pick_device(args.device))
    return model.eval(), tok, cfg


def run_generate(args: argparse.Namespace) -> int:
    from pocketlm.infer.generate import generate

    model, tok, cfg = _load(args)
    ids = tok.encode(args.prompt)
    if not ids:
        raise PocketLMError("--prompt is empty: give some text to continue")
    gen = generate(model, tok, ids, cfg)
    for step in gen:
        sys.stdout.write(step.text)
        sys.stdout.flush()
    print(file=sys.stdout)
    reason = gen.finish_reason
    if reason == "length" and gen.n_tokens < cfg.max_new_tokens:  # stopped by the context, not --max-new-tokens
        reason = f"length (the model's {model.cfg.block_size}-token context)"
    elif reason == "length":
        reason = f"length (--max-new-tokens {cfg.max_new_tokens})"
    print(f"[{reason}: {gen.n_tokens} tokens, prefill {gen.prefill.ms:.1f} ms for "
          f"{gen.prefill.n_tokens} tokens, decode {gen.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


def line_editing() -> None:
    """Arrow keys, line editing and this session's history at the prompt, where Python has readline."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        pass


def run_chat(args: argparse.Namespace) -> int:
    from pocketlm.infer.chat import HELP, ChatSession

    model, tok, cfg = _load(args)
    session = ChatSession(model, tok, cfg, system=args.system)
    line_editing()
    print(f"pocketlm chat: {args.ckpt}. {HELP}. Ctrl-C clears the line or stops a reply, Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # the REPL convention: Ctrl-C drops the line, the conversation stays
            print(file=sys.stderr)
            continue
        if not line:
            continue
        note = session.command(line)
        if note is not None:
            print(f"[{note}]", file=sys.stderr)
            continue
        cancel = threading.Event()
        # While a reply streams, Ctrl-C only asks it to stop.
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
        try:
            stream = session.reply(session.message_text(line), cancel)
            # The prompt is fitted before the first piece: a message too long for the context is refused
            # here, before "model>" is shown.
            first = next(stream, "")
            sys.stdout.write("model> " + first)
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except PocketLMError as e:  # a message too long for the context: say so, keep the session
            print(f"[{e}]", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        print(" [stopped]" if session.last_finish == "cancelled" else "")
