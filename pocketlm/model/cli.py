"""`pocketlm export hf|gguf` and `pocketlm import hf`: move models between pocketlm, Hugging Face Llama
and llama.cpp's GGUF."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="convert a pocketlm model folder to another format")
    exp_fmt = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = exp_fmt.add_parser("hf", help="write a LlamaForCausalLM folder (transformers can load it)")
    p.add_argument("--ckpt", required=True, help="pocketlm model folder, e.g. runs/x/sft/best")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.set_defaults(handler=_export_hf)
    p = exp_fmt.add_parser("gguf", help="write a .gguf file (llama.cpp, llama-cpp-python, ollama)")
    p.add_argument("--ckpt", required=True, help="pocketlm model folder, e.g. runs/x/sft/best")
    p.add_argument("--out", required=True, help=".gguf file to write (replaced if it exists)")
    p.add_argument("--dtype", default="f16", help="weight type: f32, f16 or q8_0; norms stay f32 (default: %(default)s)")
    p.set_defaults(handler=_export_gguf)

    imp = sub.add_parser("import", help="convert a model from another format to a pocketlm model folder")
    imp_fmt = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = imp_fmt.add_parser("hf", help="read a LlamaForCausalLM folder with a sentencepiece tokenizer.model")
    p.add_argument("--src", required=True, help="Hugging Face Llama folder")
    p.add_argument("--out", required=True, help="pocketlm model folder to write (replaced if it exists)")
    p.set_defaults(handler=_import_hf)


def _export_hf(args: argparse.Namespace) -> int:
    from pocketlm.model.hf_bridge import export_hf

    print(f"wrote {export_hf(args.ckpt, args.out)}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from pocketlm.model.gguf_export import export_gguf

    print(f"wrote {export_gguf(args.ckpt, args.out, args.dtype)}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from pocketlm.model.hf_bridge import import_hf

    print(f"wrote {import_hf(args.src, args.out)}")
    return 0
