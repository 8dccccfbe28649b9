"""MPS's rules on the CPU: the real training, evaluation, generation and serving paths run under
`MPSRules` (the `mps_rules` fixture) and must not break them; small deliberately wrong functions show
that the mode catches each kind of mistake that crashes or corrupts an Apple-GPU run. (The fp16 steps
with the loss scaler, an overflowed one included, run under the mode in tests/test_train_run.py.)"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from pocketlm.cache.build_cache import build_cache
from pocketlm.cache.dataset import PretrainData
from pocketlm.device import DeviceLock, is_mps
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.generate import generate
from pocketlm.infer.sampling import GenConfig
from pocketlm.model import GPT, GPTConfig
from pocketlm.mps_rules import MPSRuleError, MPSRules, on_host
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.evaluate import evaluate
from pocketlm.train.loop import train_step
from pocketlm.train.optim import build_adamw
from pocketlm.train.precision import Precision
from pocketlm.train.run import train

CPU = torch.device("cpu")


# --- the mode catches each kind of mistake --------------------------------------------------------

def test_float64_on_the_device_path_is_refused(mps_rules):
    losses = torch.rand(64)
    with pytest.raises(MPSRuleError, match="float64"):
        losses.double().sum()  # how evaluation used to pool its sums
    with pytest.raises(MPSRuleError, match="float64"):
        torch.zeros((), dtype=torch.float64)
    with pytest.raises(MPSRuleError, match="complex"):
        torch.polar(torch.ones(3), torch.zeros(3))
    with on_host():  # host work by design is not device work, once the tensor is on the host
        assert losses.cpu().double().sum().dtype == torch.float64
        with pytest.raises(MPSRuleError, match="float64"):  # a device tensor keeps the rules
            losses.double()


def test_non_blocking_copy_from_unpinned_memory_is_refused(mps_rules):
    batch = torch.arange(16).view(2, 8)
    with pytest.raises(MPSRuleError, match="non_blocking"):
        batch.to(CPU, non_blocking=True)
    with pytest.raises(MPSRuleError, match="non_blocking"):
        torch.empty(2, 8, dtype=torch.long).copy_(batch, non_blocking=True)
    assert torch.equal(batch.to(CPU), batch)


def test_unlocked_device_work_from_a_second_thread_is_refused(mps_rules):
    x = torch.rand(8)
    x.sum()  # this thread uses the device without a lock
    errors: list[BaseException] = []

    def second() -> None:
        try:
            x.sum()
        except MPSRuleError as e:
            errors.append(e)
    t = threading.Thread(target=second)
    t.start()
    t.join()
    assert len(errors) == 1 and "pytorch#197805" in str(errors[0])


def test_device_work_while_another_thread_holds_the_device_lock_is_refused(mps_rules):
    lock, held, done = DeviceLock(), threading.Event(), threading.Event()
    x = torch.rand(8)

    def holder() -> None:
        with lock:
            x.sum()
            held.set()
            done.wait()
    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    try:
        with pytest.raises(MPSRuleError, match="holds the device lock"):
            x.sum()
    finally:
        done.set()
        t.join()


def test_threads_that_take_turns_under_the_device_lock_pass(mps_rules):
    lock, x = DeviceLock(), torch.rand(8)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                with lock:
                    (x * 2).sum()
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_known_bad_mps_kernels_are_refused(mps_rules, monkeypatch):
    probs = torch.softmax(torch.rand(100), dim=-1)
    with pytest.raises(MPSRuleError, match="pytorch#192577"):
        torch.multinomial(probs, 1)
    q = torch.rand(1, 5, 2, 8).transpose(1, 2)  # (B, H, S, D) as a view: not contiguous
    F.scaled_dot_product_attention(q, q, q)  # torch 2.13's MPS kernels take strided q/k/v
    monkeypatch.setattr("pocketlm.device.TORCH_VERSION", (2, 12))
    with pytest.raises(MPSRuleError, match="pytorch#163597"):
        F.scaled_dot_product_attention(q, q, q)
    F.scaled_dot_product_attention(q.contiguous(), q.contiguous(), q.contiguous())


def test_rules_are_off_outside_the_mode_and_switch_the_mps_branches():
    assert not is_mps(CPU)
    torch.zeros((), dtype=torch.float64).sum()
    with MPSRules():
        assert is_mps(CPU)
    assert not is_mps(CPU)


# --- the real paths follow the rules -------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(small_tokenizer, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mps_cache") / "cache"
    specs = [("fineweb_edu:take=60", "pretrain"), ("dolly:take=150", "sft")]
    build_cache(small_tokenizer.path, specs, out, data_dir=data_dir, workers=1, val_fraction=0.1, progress=False)
    return out


def fresh_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=vocab, block_size=64))


def test_evaluate_matches_a_host_float64_reference(cache, small_tokenizer):
    data = PretrainData(cache, {"fineweb_edu": 1.0}, 64, split="val")
    model = fresh_model(small_tokenizer.vocab_size)
    lengths = small_tokenizer.token_byte_lengths()
    with MPSRules():
        result = evaluate(model, data.val_batches(4, 3), lengths, CPU)
    nats = n = text_nats = text_bytes = 0.0
    with torch.no_grad():  # the old float64 computation, outside the mode, as the reference
        for b in data.val_batches(4, 3):
            logits, _ = model(b["x"], positions=b["positions"], doc_ids=b["doc_ids"])
            per_token = F.cross_entropy(logits.double().flatten(0, 1), b["y"].flatten(), reduction="none",
                                        ignore_index=-100)
            nbytes = torch.as_tensor(lengths)[b["y"].flatten().clamp(min=0)] * (b["y"].flatten() != -100)
            nats += float(per_token.sum())
            n += int((b["y"] != -100).sum())
            text_nats += float(per_token[nbytes > 0].sum())
            text_bytes += int(nbytes.sum())
    assert result.tokens == n and result.text_bytes == text_bytes
    assert result.loss == pytest.approx(nats / n, rel=1e-5)
    assert result.bpb == pytest.approx(text_nats / (math.log(2) * text_bytes), rel=1e-5)


def test_pretrain_then_sft_in_miniature(mps_rules, cache, tmp_path):
    cfg = TrainConfig(name="m", runs_dir=str(tmp_path), cache=str(cache), model="tiny", seq_len=64, micro_batch=2,
                      accum_steps=2, pretrain_steps=4, sft_steps=4, lr=3e-3, sft_lr=1e-3, warmup_steps=1,
                      eval_every=2, eval_batches=1, log_every=2, sample_tokens=2, device="cpu", precision="fp16",
                      pretrain_mix=("fineweb_edu=1.0",), eval_sources=(), sft_sources=("dolly=1.0",))
    best = train(cfg, pipeline="pretrain_then_sft")
    assert best == tmp_path / "m" / "sft" / "best"
    assert (tmp_path / "m" / "pretrain" / "best" / "model.safetensors").is_file()
    assert (best / "model.safetensors").is_file()


GEN_CONFIG = GenConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=3)
STATS = {"plain": None, "inspector": StatsRequest(top_alternatives=5, logit_lens=True, attn_entropy=True)}


@pytest.mark.parametrize("kind", sorted(STATS))
def test_generate_follows_the_rules_and_matches_the_unchecked_run(tiny_model, kind):
    model, tok = tiny_model
    prompt = tok.encode("The history of the city begins")
    stats = STATS[kind]
    reference = list(generate(model, tok, prompt, GEN_CONFIG, stats=stats))
    with MPSRules():  # host sampling with a host generator: the same draws as on the CPU
        steps = list(generate(model, tok, prompt, GEN_CONFIG, stats=stats))
    assert [s.id for s in steps] == [r.id for r in reference]
    if stats is None:
        assert all(s.stats is None for s in steps)
        return
    assert [s.stats.logprob for s in steps] == pytest.approx([r.stats.logprob for r in reference], abs=1e-4)
    assert [s.stats.entropy for s in steps] == pytest.approx([r.stats.entropy for r in reference], abs=1e-4)
    assert len(steps[0].stats.lens) == model.cfg.n_layer and len(steps[0].stats.attn_entropy[0]) == model.cfg.n_head


def _complete(url: str, seed: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Tell me about number {seed}."}], "max_tokens": 16,
            "temperature": 1.0, "seed": seed, "logprobs": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_two_concurrent_server_requests(mps_rules, tiny_model, live_server):
    from pocketlm.serve.app import create_app

    model, tok = tiny_model
    # The test's own thread uses the device first: from then on, a request thread doing device work
    # outside the server's DeviceLock breaks the rules.
    list(generate(model, tok, tok.encode("Hello"), GenConfig(max_new_tokens=2, temperature=0.0)))
    with live_server(create_app(model, tok, model_id="tiny")) as url:
        one_by_one = [_complete(url, s) for s in (1, 2)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            together = list(pool.map(lambda s: _complete(url, s), (1, 2)))
    assert together == one_by_one


# --- the real paths with a fix taken back out fail in the mode -----------------------------------

def test_a_non_blocking_batch_copy_in_the_training_step_fails(mps_rules, cache, small_tokenizer, monkeypatch):
    monkeypatch.setattr("pocketlm.train.loop.to_device", lambda t, device: t.to(device, non_blocking=True))
    model = fresh_model(small_tokenizer.vocab_size)
    data = PretrainData(cache, {"fineweb_edu": 1.0}, 64, 0)
    with pytest.raises(MPSRuleError, match="pytorch#139550"):
        train_step(model, build_adamw(model, 1e-3, 0.1, 0.95, CPU), [data.batch(0, 2)], Precision.create(CPU, "fp32"),
                   1.0, CPU, DistInfo())


def test_sampling_on_the_device_fails(mps_rules, tiny_model, monkeypatch):
    monkeypatch.setattr("pocketlm.infer.sampling.is_mps", lambda device: False)
    model, tok = tiny_model
    with pytest.raises(MPSRuleError, match="pytorch#192577"):
        list(generate(model, tok, tok.encode("Once upon a time"), GEN_CONFIG))


def test_a_cli_run_under_the_environment_variable(tiny_ckpt, monkeypatch, capsys):
    from pocketlm.cli import main

    args = ["generate", "--ckpt", str(tiny_ckpt), "--device", "cpu", "--prompt", "The river", "--max-new-tokens",
            "6", "--temperature", "1.0", "--seed", "1"]
    monkeypatch.setenv("POCKETLM_MPS_RULES", "1")
    assert main(args) == 0
    monkeypatch.setattr("pocketlm.infer.sampling.is_mps", lambda device: False)  # sampling back on the device
    assert main(args) == 1
    assert "pytorch/pytorch#192577" in capsys.readouterr().err.splitlines()[-1]


def test_a_device_copy_in_the_prefetch_thread_fails(mps_rules, cache, tmp_path, monkeypatch):
    """on_host() exempts host tensors only: the prefetcher's worker copying a batch to the device, unlocked,
    while the main thread trains is device work from two threads at once."""
    from pocketlm.device import to_device
    from pocketlm.train import loop

    real = loop.micro_batches

    def on_the_device(data, step, micro_batch, accum, rank=0, world=1):
        return [{k: to_device(v, CPU) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in real(data, step, micro_batch, accum, rank, world)]
    monkeypatch.setattr(loop, "micro_batches", on_the_device)
    cfg = TrainConfig(name="m", runs_dir=str(tmp_path), cache=str(cache), model="tiny", seq_len=64, micro_batch=2,
                      accum_steps=1, pretrain_steps=6, lr=3e-3, warmup_steps=1, eval_every=6, eval_batches=1,
                      log_every=2, sample_tokens=0, device="cpu", precision="fp32",
                      pretrain_mix=("fineweb_edu=1.0",), eval_sources=())
    with pytest.raises(MPSRuleError, match="pytorch#197805") as caught:
        train(cfg, pipeline="pretrain")
    print(str(caught.value).splitlines()[0])


def test_a_non_blocking_copy_of_the_sampled_id_fails(mps_rules, tiny_model, monkeypatch):
    """The id drawn on the host goes back to the device asynchronously from unpinned memory: refused,
    though the copy is made inside sampling's on_host() block."""
    from pocketlm.infer.sampling import filtered_logits

    def sample_with_async_copy(logits, cfg, generator):
        probs = torch.softmax(filtered_logits(logits, cfg), dim=-1)
        host = probs.cpu()
        with on_host():
            return torch.multinomial(host, 1, generator=generator)[0].to(logits.device, non_blocking=True)
    monkeypatch.setattr("pocketlm.infer.generate.sample_next", sample_with_async_copy)
    model, tok = tiny_model
    with pytest.raises(MPSRuleError, match="pytorch#139550") as caught:
        list(generate(model, tok, tok.encode("Once upon a time"), GEN_CONFIG))
    print(str(caught.value).splitlines()[0])
