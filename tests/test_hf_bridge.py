"""HF Llama bridge: transformers is the oracle. Logits and greedy generations match in both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm import PocketLMError
from pocketlm.cli import main
from pocketlm.model.kv_cache import KVCache
from pocketlm.model import GPT, GPTConfig
from pocketlm.model.hf_bridge import export_hf, import_hf
from pocketlm.model.io import load_model, save_model
from pocketlm.tokenizer.chat_template import format_chat_tokens


transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle (test extra)")


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm gains start at 1; make them distinct so a mixed-up norm mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _greedy(model: GPT, prompt: list[int], n: int, eot: int = 4) -> list[int]:
    """The simplest cached decode loop: prefill, then one token at a time, stopping after <|eot|>."""
    cache = KVCache(model.cfg, 1, len(prompt) + n, "cpu", torch.float32)
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits, _ = model(ids, cache=cache)
        ids = logits[0, -1].argmax().view(1, 1)
        out.append(int(ids))
        if out[-1] == eot:
            break
    return out


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _assert_parity(ours: GPT, hf_model, vocab: int, prompt: list[int]) -> list[int]:
    idx = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_model(idx).logits, rtol=0, atol=1e-4)
        generated = _greedy(ours, prompt, 24)
        assert _hf_greedy(hf_model, prompt, 24) == generated
    return generated


def _export_and_load(model: GPT, tok, tmp_path: Path):
    ckpt = save_model(tmp_path / "ckpt", model, tok.path, {"special_ids": tok.special_token_ids()})
    out = export_hf(ckpt, tmp_path / "hf")
    return out, transformers.AutoModelForCausalLM.from_pretrained(out).eval()


def test_export_random_model_matches_transformers(small_tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size)).eval()
    _perturb_norms(model, 0)
    out, hf_model = _export_and_load(model, small_tokenizer, tmp_path)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "pocketlm-export.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 4
    _assert_parity(model, hf_model, small_tokenizer.vocab_size, [10, 11, 12])


def test_export_trained_model_matches_transformers(small_tokenizer, tmp_path: Path):
    """50 AdamW steps on a counting sequence: the model learns it, and transformers generates the same."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = 5 + (torch.randint(0, 64, (8, 1), generator=g) + torch.arange(17)) % 64  # 5..68, then wraps
        _, loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    model.eval()
    _, hf_model = _export_and_load(model, small_tokenizer, tmp_path)
    generated = _assert_parity(model, hf_model, small_tokenizer.vocab_size, [60, 61, 62])
    assert generated[:12] == [63, 64, 65, 66, 67, 68, 5, 6, 7, 8, 9, 10]


def test_import_random_transformers_model(small_tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=small_tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=96, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, eos_token_id=4, bos_token_id=None)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    _perturb_norms(hf_model, 1)
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    (src / "tokenizer.model").write_bytes(small_tokenizer.path.read_bytes())
    assert main(["import", "hf", "--src", str(src), "--out", str(tmp_path / "ours")]) == 0
    model, tok, meta = load_model(tmp_path / "ours")
    cfg = model.cfg
    assert (cfg.ffn_hidden, cfg.rope_theta, cfg.norm_eps, cfg.block_size) == (160, 50000.0, 1e-6, 96)
    assert tok.hash == small_tokenizer.hash and meta == {"imported_from": str(src)}
    _assert_parity(model, hf_model, small_tokenizer.vocab_size, [7, 8, 9])


def test_exported_tokenizer_gives_the_same_ids(small_tokenizer, tmp_path: Path):
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size))
    out, _ = _export_and_load(model, small_tokenizer, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == 4
    for text in ["Hello, world!", "  two spaces\n\ttab and newline\n\n", "emoji 🙂 and 漢字 café",
                 "<|usr|>What is 2+2?<|eot|><|asst|>4<|eot|>", "1234567 digits", "a byte piece's spelling: <0x41>"]:
        ids = small_tokenizer.encode(text, allow_special=True)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok.decode(ids) == text


def test_export_cli_and_round_trip(small_tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=small_tokenizer.vocab_size)).eval()
    ckpt = save_model(tmp_path / "ckpt", model, small_tokenizer.path, {})
    assert main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _, _ = load_model(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert main(["export", "hf", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1


def test_import_refuses_what_pocketlm_cannot_represent(small_tokenizer, tmp_path: Path):
    hf_cfg = transformers.LlamaConfig(vocab_size=small_tokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "gqa"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(src)
    (src / "tokenizer.model").write_bytes(small_tokenizer.path.read_bytes())
    with pytest.raises(PocketLMError, match="grouped-query attention"):
        import_hf(src, tmp_path / "out")
    hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings = 4, False
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(src)
    with pytest.raises(PocketLMError, match="output head separate from its embedding"):
        import_hf(src, tmp_path / "out")


def test_chat_template_gives_pocketlm_ids_and_replies(tiny_ckpt: Path, tmp_path: Path, export_chats, pocketlm_reply,
                                                      reply_tokens):
    """From plain text: transformers' chat template on a 3-turn conversation gives pocketlm's prompt ids,
    and greedy generation (as the README's transformers line runs it) gives pocketlm's reply."""
    model, tok, _ = load_model(tiny_ckpt)
    out = export_hf(tiny_ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for chat in export_chats:
        prompt, reply = pocketlm_reply(model, tok, chat)
        assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == prompt
        assert _hf_greedy(hf_model, prompt, reply_tokens) == reply
    # A conversation ending with the assistant's turn gets no generation prompt, as in pocketlm.
    done = export_chats[0][:3]
    assert hf_tok.apply_chat_template(done, add_generation_prompt=True, return_dict=False) == format_chat_tokens(tok, done)
    # The README's line: a text-generation pipeline given the messages.
    pipe = transformers.pipeline("text-generation", model=str(out))
    text = pipe(export_chats[1], max_new_tokens=reply_tokens, do_sample=False)[0]["generated_text"][-1]["content"]
    assert text == tok.decode(pocketlm_reply(model, tok, export_chats[1])[1], skip_special=True)
