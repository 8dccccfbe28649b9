"""Hugging Face Llama bridge: a pocketlm model folder <-> a `LlamaForCausalLM` folder.

The model already is a Llama (RMSNorm, half-split RoPE, SwiGLU, no biases, tied embeddings), so the
bridge only renames tensors and splits/joins the fused qkv and gate/up matrices. config.json,
safetensors and tokenizer files are written here directly: transformers is not needed to export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from pocketlm import PocketLMError
from pocketlm.files import publish_dir, publish_files, staging_dir
from pocketlm.model.config import GPTConfig
from pocketlm.model.gpt_v1 import GPT
from pocketlm.model.io import TOKENIZER_FILE, read_model_folder, save_model
from pocketlm.model.naming import export_name
from pocketlm.tokenizer.tokenizer_sp import SPECIAL_TOKENS

SYS_PIECE, USR_PIECE, ASST_PIECE, EOT_PIECE = SPECIAL_TOKENS
# Written into every export folder: it names the files pocketlm wrote, so exporting again into the same
# folder replaces those and nothing else.
EXPORT_MANIFEST = "pocketlm-export.json"
MANIFEST_FORMAT = "pocketlm-export"
EXPORT_FILES = ("README.md", "config.json", "generation_config.json", "model.safetensors", TOKENIZER_FILE,
                "tokenizer.json", "tokenizer_config.json", EXPORT_MANIFEST)
# Below the lowest piece score by more than any text's whole path scores: a piece scored so is never chosen.
_UNREACHABLE_MARGIN = 1e6

# pocketlm's chat layout (tokenizer/chat_template.py) as a Jinja template, for clients that format
# chats from text: transformers' apply_chat_template, mlx-lm, llama.cpp (embedded in the GGUF).
# Rendered to a string and tokenized with the control pieces as special tokens, it gives exactly the
# ids of format_chat_tokens: each role piece, the content as plain text, <|eot|>, and a closing
# <|asst|> when a reply is wanted and the last turn is not the assistant's.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    f"{{%- if message['role'] == 'system' -%}}{SYS_PIECE}"
    f"{{%- elif message['role'] == 'user' -%}}{USR_PIECE}"
    f"{{%- elif message['role'] == 'assistant' -%}}{ASST_PIECE}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{%- endif -%}"
    f"{{{{- message['content'] -}}}}{EOT_PIECE}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}}{ASST_PIECE}{{%- endif -%}}"
)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """pocketlm tensor names -> LlamaForCausalLM names (lm_head is omitted: it is the tied embedding)."""
    C, F = cfg.n_embd, cfg.ffn_hidden
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["ln_final.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split(C, dim=0)
        gate, up = state[src + "mlp.gate_up.weight"].split(F, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "ln1.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ln2.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors -> pocketlm names; an untied lm_head must equal the embedding."""
    embed = hf["model.embed_tokens.weight"]
    if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], embed):
        raise PocketLMError("this Llama has an output head separate from its embedding; pocketlm models tie them, "
                            "so it cannot be imported")
    out = {"embed.weight": embed, "ln_final.weight": hf["model.norm.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out.update({
            dst + "ln1.weight": hf[src + "input_layernorm.weight"],
            dst + "attn.qkv.weight": torch.cat([hf[attn + f"{p}_proj.weight"] for p in "qkv"]),
            dst + "attn.out.weight": hf[attn + "o_proj.weight"],
            dst + "ln2.weight": hf[src + "post_attention_layernorm.weight"],
            dst + "mlp.gate_up.weight": torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]]),
            dst + "mlp.down.weight": hf[mlp + "down_proj.weight"],
        })
    return out


def check_llama_shape(cfg: GPTConfig) -> None:
    """Refuse what a Llama (transformers, llama.cpp, mlx-lm) cannot hold."""
    if cfg.qk_norm:
        raise PocketLMError("this model normalises queries and keys (qk_norm), which a Llama does not: it cannot be "
                            "exported as a Llama (train it with qk_norm = false to export it)")


def hf_config(cfg: GPTConfig, eot_id: int, dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM; rope_theta is written both ways (transformers 4.x and 5.x)."""
    check_llama_shape(cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "initializer_range": cfg.init_std, "bos_token_id": None, "eos_token_id": eot_id, "pad_token_id": eot_id,
        "torch_dtype": dtype, "use_cache": True,
    }


def gpt_config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """The GPTConfig of a Llama config.json, refusing features pocketlm does not have."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PocketLMError(f"{where}: {what}; pocketlm can only import plain Llama models")

    need(hf.get("model_type") == "llama", f"model_type is {hf.get('model_type')!r}, not 'llama'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        need(isinstance(hf.get(key), int), f"{key} is missing or not an integer")
    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act is {hf.get('hidden_act')!r}, not 'silu'")
    need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "it uses biases")
    n_head = hf["num_attention_heads"]
    need((hf.get("num_key_value_heads") or n_head) == n_head, "it uses grouped-query attention")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    need(head_dim * n_head == hf["hidden_size"], "head_dim * num_attention_heads != hidden_size")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    need(rope.get("rope_type", rope.get("type", "default")) == "default", "it uses scaled RoPE")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_embd=hf["hidden_size"], ffn_hidden=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02))


def tokenizer_json(model_file: Path) -> dict[str, Any]:
    """A `tokenizers` Unigram description of the sentencepiece model, so AutoTokenizer gives the same ids.

    Spaces become U+2581 and the whole text goes through one Viterbi pass (identity normalisation, no
    dummy prefix), as in sentencepiece; control tokens are added special tokens. Control, unknown and
    byte pieces get a score no path of text pieces can lose to, so the Viterbi pass never spells them
    from text, as in sentencepiece: text "<|eot|>" (with `split_special_tokens=True`) or "<0x41>" is
    written with ordinary pieces. One rare input differs from pocketlm's Tokenizer: a literal U+2581.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    unreachable = min(sp.get_score(i) for i in range(n) if sp.is_unused(i) or not (
        sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))) - _UNREACHABLE_MARGIN
    vocab, added = [], []
    for i in range(n):
        piece = sp.id_to_piece(i)
        special = sp.is_control(i) or sp.is_unknown(i)
        vocab.append([piece, unreachable if special or sp.is_byte(i) else sp.get_score(i)])
        if special:
            added.append({"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": True},
    }


def _eot_id(model_file: Path) -> int:
    i = spm.SentencePieceProcessor(model_file=str(model_file)).piece_to_id(EOT_PIECE)
    if i == 0:
        raise PocketLMError(f"{model_file} has no {EOT_PIECE} token: it is not a pocketlm chat tokenizer")
    return i


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_card(name: str) -> str:
    """README.md: the model's name in the front matter, where the Hub and llama.cpp's converter read it."""
    return (f"---\nmodel_name: {json.dumps(name)}\nlibrary_name: transformers\npipeline_tag: text-generation\n"
            f"tags:\n- pocketlm\n---\n\n# {name}\n\nA pocketlm model as a `LlamaForCausalLM`, with its tokenizer "
            "and chat template (`<|eot|>` ends a turn).\n")


def _earlier_export_files(folder: Path) -> set[str]:
    """The files an earlier export wrote into `folder`, as its manifest lists them (none without one)."""
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") == MANIFEST_FORMAT:
            names = {f for f in manifest["files"]  # plain names only: a manifest never points outside
                     if isinstance(f, str) and Path(f).name == f and f not in ("", ".", "..")}
            return names | {EXPORT_MANIFEST}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return set()


def export_folder_check(out: Path, force: bool) -> list[str]:
    """Refuse an `--out` that pocketlm must not replace; returns the files in it that pocketlm did not write."""
    if out.exists() and not out.is_dir():
        raise PocketLMError(f"--out {out} is a file; pass a folder to write the export in (a new one, or an earlier "
                            "export to replace)")
    if not out.is_dir():
        return []
    theirs = sorted(p.name for p in out.iterdir() if p.name not in _earlier_export_files(out))
    if in_the_way := [f for f in EXPORT_FILES if (out / f).is_dir() and not (out / f).is_symlink()]:
        raise PocketLMError(f"--out {out} holds a folder named {in_the_way[0]}, where the export writes a file; "
                            "pass another folder")
    if theirs and not force:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise PocketLMError(f"--out {out} holds files pocketlm did not write ({shown}); pass a new or empty folder, "
                            "or add --force to write the export among them (they are kept; files of the same "
                            "names as the export's are replaced)")
    return theirs


def export_hf(ckpt: str | Path, out: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Write a LlamaForCausalLM folder (config, weights, tokenizer, generation config, model card) from a model
    folder. `out` may be new, empty or an earlier export; a folder holding other files needs `force`, and
    even then only the export's own files are written there."""
    name = export_name(ckpt, name)
    out = Path(os.path.abspath(Path(out).expanduser()))  # `--out .` has a name to stage beside
    export_folder_check(out, force)
    cfg, state, info = read_model_folder(ckpt)
    tmp = staging_dir(out)
    tok_file = Path(ckpt).expanduser() / TOKENIZER_FILE
    eot = _eot_id(tok_file)
    save_file(to_hf_state_dict(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "config.json", hf_config(cfg, eot, info.get("dtype", "float32")))
    _write_json(tmp / "generation_config.json", {"eos_token_id": eot, "pad_token_id": eot, "do_sample": False})
    shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)
    _write_json(tmp / "tokenizer.json", tokenizer_json(tok_file))
    _write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
        "eos_token": EOT_PIECE, "pad_token": EOT_PIECE, "unk_token": "<unk>", "bos_token": None,
        # No BOS, no EOS, no space in front of the text: what converters (llama.cpp's among them) read.
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE})
    (tmp / "README.md").write_text(_model_card(name), encoding="utf-8")
    files = sorted(p.name for p in tmp.iterdir())
    assert set(files) | {EXPORT_MANIFEST} == set(EXPORT_FILES), files
    _write_json(tmp / EXPORT_MANIFEST, {"format": MANIFEST_FORMAT, "format_version": 1, "name": name,
                                        "files": files})
    if not out.is_dir():
        publish_dir(tmp, out)
        return out
    stale = _earlier_export_files(out) - set(files) - {EXPORT_MANIFEST}  # an older export's files
    publish_files(tmp, out)
    for f in stale:
        (out / f).unlink(missing_ok=True)
    return out


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard listed in model.safetensors.index.json."""
    single = src / "model.safetensors"
    if single.is_file():
        return load_file(str(single), device="cpu")
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        raise PocketLMError(f"{src}: no model.safetensors (or .index.json); save the HF model with safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(str(src / shard), device="cpu").items()}


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Write a pocketlm model folder from a LlamaForCausalLM folder that has a sentencepiece tokenizer.model."""
    src = Path(src).expanduser()
    for name in ("config.json", TOKENIZER_FILE):
        if not (src / name).is_file():
            raise PocketLMError(f"{src / name} is missing: pass a Llama folder with config.json and a "
                                "sentencepiece tokenizer.model")
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg = gpt_config_from_hf(hf, str(src / "config.json"))
    model = GPT(cfg)
    model.load_state_dict(from_hf_state_dict(_read_hf_weights(src), cfg), strict=True)
    return save_model(out, model, src / TOKENIZER_FILE, {"imported_from": str(src)})
