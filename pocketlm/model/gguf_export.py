"""GGUF export: a pocketlm model folder -> one `.gguf` file that llama.cpp (and its bindings) can chat with.

Written with the maintained `gguf` package (llama.cpp's own writer). The model is llama.cpp's `llama`
architecture; the tokenizer is declared as llama.cpp's unigram tokenizer (`t5`, "UGM"), which runs the
same Viterbi search over the same piece scores as SentencePiece, with no space prefix, no extra-space
folding, no BOS/EOS added, and `<|eot|>` as the end-of-generation token. The chat template is embedded.

One gap needs care: llama.cpp's unigram tokenizer has no byte fallback (a character that is no piece
becomes `<unk>`), where SentencePiece writes it as byte pieces. For a single-byte (ASCII) character
the byte piece *is* the character, so those byte pieces are declared as normal pieces spelling their
character: llama.cpp then picks them exactly where SentencePiece falls back to them (nothing else can
cover that character), and they still detokenize to their byte. A multi-byte character that is no
piece (a rare emoji, say) still becomes `<unk>` in llama.cpp; pocketlm's tests report how often.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch

from pocketlm import PocketLMError
from pocketlm.files import plain_mode
from pocketlm.model.config import GPTConfig
from pocketlm.model.hf_bridge import CHAT_TEMPLATE, EOT_PIECE, check_llama_shape, to_hf_state_dict
from pocketlm.model.io import TOKENIZER_FILE, read_model_folder
from pocketlm.model.naming import export_name
from pocketlm.tokenizer.tokenizer_sp import _SPACE_MARK

DTYPES = ("f32", "f16", "q8_0")
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# SentencePiece scores an unknown character at the lowest piece score minus this (kUnkPenalty).
_UNK_PENALTY = 10.0

# LlamaForCausalLM tensor names (per layer, after "model.layers.N.") -> llama.cpp names (after "blk.N.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _interleave_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k output rows from half-split RoPE (pocketlm, HF) to llama.cpp's adjacent pairs.

    The same permutation as llama.cpp's convert_hf_to_gguf.py applies to Llama q_proj/k_proj.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """pocketlm tensors -> llama.cpp names (no output.weight: llama.cpp ties it to token_embd)."""
    hf = to_hf_state_dict(state, cfg)
    out = {"token_embd.weight": hf.pop("model.embed_tokens.weight"), "output_norm.weight": hf.pop("model.norm.weight")}
    for name, t in hf.items():
        _, _, layer, rest = name.split(".", 3)
        if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            t = _interleave_rope(t, cfg.n_head)
        out[f"blk.{layer}.{_LAYER_NAMES[rest]}"] = t
    return out


def gguf_vocab(model_file: Path, n_vocab: int) -> dict[str, Any]:
    """tokens, scores and token types for llama.cpp's unigram tokenizer, plus the special ids.

    Ids beyond the tokenizer (a model padded to a rounder vocabulary) become unreachable control pieces.
    """
    import gguf

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    if n > n_vocab:
        raise PocketLMError(f"{model_file} has {n} pieces but the model only {n_vocab} embeddings: "
                            "the tokenizer does not belong to this model")
    pieces = [sp.id_to_piece(i) for i in range(n)]
    normal = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    unk_score = min(sp.get_score(i) for i in normal) - _UNK_PENALTY
    known = {pieces[i] for i in normal}
    tokens, scores, types = [], [], []
    for i, piece in enumerate(pieces):
        text, score, kind = piece, sp.get_score(i), gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
            byte = int(piece[3:5], 16)
            char = _SPACE_MARK if byte == 0x20 else chr(byte)
            if 0 < byte < 0x80 and char not in known:  # see the module docstring
                text, score, kind = char, unk_score, gguf.TokenType.NORMAL
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(n, n_vocab):
        tokens.append(f"<|pad_{i}|>")
        scores.append(0.0)
        types.append(gguf.TokenType.CONTROL)
    eot = sp.piece_to_id(EOT_PIECE)
    if eot == 0:
        raise PocketLMError(f"{model_file} has no {EOT_PIECE} token: it is not a pocketlm chat tokenizer")
    return {"tokens": tokens, "scores": scores, "types": types, "eot": eot, "unk": sp.unk_id()}


def _tensor_data(name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, ggml type): norms stay f32 in every file, as in llama.cpp's converter; q8_0 needs rows
    that are whole 32-value blocks, and a matrix whose rows are not stays f16."""
    import gguf

    a = t.detach().to(torch.float32).numpy()
    if dtype == "f32" or a.ndim == 1:
        return a, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def _check_out(out: Path, name: str, force: bool) -> None:
    """Refuse an `--out` that is a folder, or a file other than a GGUF (unless `force`)."""
    if out.is_dir():
        raise PocketLMError(f"--out {out} is a folder; pass the .gguf file to write, e.g. --out {out / name}.gguf")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PocketLMError(f"--out {out}: {parent} is a file, not a folder; pass another path")
            break
    if out.exists() and not force:
        try:
            with open(out, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = b""
        if magic != GGUF_MAGIC:
            raise PocketLMError(f"--out {out} exists and is not a GGUF file; pass another path, or --force to "
                                "replace it")


def export_gguf(ckpt: str | Path, out: str | Path, dtype: str = "f16", name: str | None = None,
                force: bool = False) -> Path:
    """Write `out` (a .gguf file) from a pocketlm model folder: weights in f32, f16 or q8_0. The model is
    named `name`, by default as the server names it (`runs/mine/sft/best` -> `mine-sft-best`)."""
    try:
        import gguf
    except ImportError as e:
        raise PocketLMError("GGUF export needs the 'gguf' package: pip install 'pocketlm[export]'") from e
    if dtype not in DTYPES:
        raise PocketLMError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    name = export_name(ckpt, name)
    out = Path(out).expanduser()
    _check_out(out, name, force)
    cfg, state, _ = read_model_folder(ckpt)
    check_llama_shape(cfg)
    vocab = gguf_vocab(Path(ckpt).expanduser() / TOKENIZER_FILE, cfg.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("t5")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_add_space_prefix(False)
        w.add_remove_extra_whitespaces(False)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_unk_token_id(vocab["unk"])
        w.add_eos_token_id(vocab["eot"])
        w.add_eot_token_id(vocab["eot"])
        w.add_pad_token_id(vocab["eot"])
        w.add_chat_template(CHAT_TEMPLATE)
        for name, t in gguf_state_dict(state, cfg).items():
            data, qtype = _tensor_data(name, t, dtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        plain_mode(tmp)  # a .tmp left by a killed export keeps its old mode
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out
