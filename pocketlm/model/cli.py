"""`pocketlm export hf|gguf` and `pocketlm import hf`: move models between pocketlm, Hugging Face Llama
and llama.cpp's GGUF."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="convert a pocketlm model folder to another format")
    exp_fmt = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = exp_fmt.add_parser("hf", help="write a LlamaForCausalLM folder (transformers can load it)")
    p.add_argument("--ckpt", required=True, help="pocketlm model folder, e.g. runs/x/sft/best")
    p.add_argument("--out", required=True,
                   help="folder to write: new, empty, or an earlier export (replaced); any other folder needs --force")
    p.add_argument("--name", help="the model's name in the export (default: as `pocketlm serve` names it, "
                                  "e.g. mine-sft-best for runs/mine/sft/best)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that holds other files: they are kept, files named as the export's "
                        "are replaced")
    p.set_defaults(handler=_export_hf)
    p = exp_fmt.add_parser("gguf", help="write a .gguf file (llama.cpp, llama-cpp-python, ollama)")
    p.add_argument("--ckpt", required=True, help="pocketlm model folder, e.g. runs/x/sft/best")
    p.add_argument("--out", required=True, help=".gguf file to write (an earlier GGUF there is replaced)")
    p.add_argument("--dtype", default="f16", help="weight type: f32, f16 or q8_0; norms stay f32 (default: %(default)s)")
    p.add_argument("--name", help="the model's name (general.name) (default: as `pocketlm serve` names it, "
                                  "e.g. mine-sft-best for runs/mine/sft/best)")
    p.add_argument("--force", action="store_true", help="replace an existing file that is not a GGUF")
    p.set_defaults(handler=_export_gguf)

    imp = sub.add_parser("import", help="convert a model from another format to a pocketlm model folder")
    imp_fmt = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = imp_fmt.add_parser("hf", help="read a LlamaForCausalLM folder with a sentencepiece tokenizer.model")
    p.add_argument("--src", required=True, help="Hugging Face Llama folder")
    p.add_argument("--out", required=True, help="pocketlm model folder to write (replaced if it exists)")
    p.set_defaults(handler=_import_hf)


def _export_hf(args: argparse.Namespace) -> int:
    from pocketlm.model.hf_bridge import export_hf

    print(f"wrote {export_hf(args.ckpt, args.out, args.name, args.force)}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from pocketlm.model.gguf_export import export_gguf

    print(f"wrote {export_gguf(args.ckpt, args.out, args.dtype, args.name, args.force)}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from pocketlm.model.hf_bridge import import_hf

    print(f"wrote {import_hf(args.src, args.out)}")
    return 0
