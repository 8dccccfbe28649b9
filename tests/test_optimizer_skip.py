"""A non-finite step skipped on the device: MuonAdamW takes `found_inf` (from the loop in bf16/fp32, from
GradScaler in fp16), leaves every weight and all its state bit for bit when it is set, computes the same
step as without it when it is not, and the training step never reads a device value on the host."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pocketlm.cache.build_cache import build_cache
from pocketlm.cache.dataset import PretrainData
from pocketlm.model import GPT, GPTConfig
from pocketlm.train.config import TrainConfig
from pocketlm.train.ddp import DistInfo
from pocketlm.train.loop import train_step
from pocketlm.train.muon import MuonAdamW, build_optimizer, orthogonalize
from pocketlm.train.precision import Precision

CPU = torch.device("cpu")
CFG = TrainConfig(lr=1e-3, muon_lr=0.02, weight_decay=0.1)  # decay on: the Muon groups' decay is skipped too


class NoHostRead(TorchDispatchMode):
    """Fails on `aten._local_scalar_dense`, the op behind .item(), float(), int() and bool() of a tensor:
    on a GPU, the host waiting for the device. `allow_integer`: on CPU the device is the host, and the
    training step reads its batch's token counts (integer CPU tensors on every device) by design;
    what a skip would be decided from (grad norm, found_inf, step counts) is float or bool."""

    def __init__(self, allow_integer: bool = False) -> None:
        super().__init__()
        self.allow_integer = allow_integer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if not (self.allow_integer and not t.is_floating_point() and t.dtype != torch.bool):
                raise AssertionError(f"host read of a {t.dtype} tensor")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def batch(small_tokenizer, data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("skip_cache") / "cache"
    build_cache(small_tokenizer.path, [("fineweb_edu:take=100", "pretrain")], out, data_dir=data_dir, workers=1,
                val_fraction=0.1, progress=False)
    return PretrainData(out, {"fineweb_edu": 1.0}, 64, 0).batch(0, 2)


def model_and_optimizer(vocab: int) -> tuple[GPT, MuonAdamW]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=vocab, block_size=64))
    return model, build_optimizer(model, CFG, CFG.lr, CPU)


def backward(model: GPT, batch: dict, step: int, poison: float | None = None) -> None:
    """The batch's gradients, scaled per step so successive steps differ; `poison` in one Muon matrix's
    and one AdamW parameter's gradient."""
    model.zero_grad(set_to_none=True)
    _, loss = model(batch["x"], batch["y"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    (loss * (1 + step)).backward()
    if poison is not None:
        model.blocks[0].mlp.down.weight.grad[0, 0] = poison
        model.ln_final.weight.grad[1] = poison


def step(opt: MuonAdamW, found_inf: float | None) -> None:
    if found_inf is None:
        opt.__dict__.pop("found_inf", None)
    else:
        opt.found_inf = torch.tensor(found_inf)
    with NoHostRead():
        opt.step()


def snapshot(model: GPT, opt: MuonAdamW) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_identical(a, b) -> None:
    """Bit for bit: same tensors (torch.equal, also for the step counts and the momenta), same numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("bad_at", [0, 2])
def test_a_skipped_step_changes_nothing_and_the_run_goes_on_as_if_it_never_came(small_tokenizer, batch, poison, bad_at):
    """Steps 0..3 with step `bad_at` poisoned and skipped through found_inf == 1 give, bit for bit, the run
    that never saw it; right after the bad step weights and state are as before it. At step 0 the skip
    also covers AdamW's bias correction (a count of 0 then) and the state created by the first step."""
    model, opt = model_and_optimizer(small_tokenizer.vocab_size)
    twin, twin_opt = model_and_optimizer(small_tokenizer.vocab_size)
    for s in range(4):
        if s == bad_at:
            before = snapshot(model, opt)
            backward(model, batch, s, poison)
            step(opt, 1.0)
            params, state = snapshot(model, opt)
            assert_identical(params, before[0])
            if before[1]["state"]:
                assert_identical(state, before[1])
            else:  # the first step made zero moments and a count of 0
                assert all(torch.equal(v, torch.zeros_like(v)) for st in state["state"].values() for v in st.values())
        backward(model, batch, s)
        step(opt, 0.0)
        backward(twin, batch, s)
        step(twin_opt, 0.0)
    assert_identical(snapshot(model, opt), snapshot(twin, twin_opt))
    assert all(float(st["step"]) == 4 for st in opt.state_dict()["state"].values() if "step" in st)


def test_found_inf_zero_computes_the_step_without_found_inf(small_tokenizer, batch):
    model, opt = model_and_optimizer(small_tokenizer.vocab_size)
    twin, twin_opt = model_and_optimizer(small_tokenizer.vocab_size)
    for s in range(3):
        backward(model, batch, s)
        step(opt, None)
        backward(twin, batch, s)
        step(twin_opt, 0.0)
        assert_identical(snapshot(model, opt), snapshot(twin, twin_opt))


def test_muon_step_is_the_per_matrix_reference(small_tokenizer, batch):
    """The batched, skippable Muon update against the plain per-matrix math: decoupled decay, Nesterov
    momentum, Newton-Schulz per fused block, scaled by sqrt(max(1, rows/cols))."""
    model, opt = model_and_optimizer(small_tokenizer.vocab_size)
    muon = [(p, g) for g in opt.param_groups if g["muon"] for p in g["params"]]
    expected = {id(p): p.detach().clone() for p, _ in muon}
    momenta = {id(p): torch.zeros_like(p) for p, _ in muon}
    for s in range(3):
        backward(model, batch, s)
        for p, g in muon:
            m = momenta[id(p)].lerp_(p.grad, 1 - g["momentum"])
            nesterov = p.grad.lerp(m, g["momentum"])
            rows, cols = p.shape[0] // g["blocks"], p.shape[1]
            u = orthogonalize(nesterov.view(g["blocks"], rows, cols)).view_as(p) * math.sqrt(max(1.0, rows / cols))
            expected[id(p)].mul_(1 - g["lr"] * g["weight_decay"]).add_(u, alpha=-g["lr"])
        step(opt, 0.0)
        for p, _ in muon:
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["momentum"], momenta[id(p)], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_train_step_reads_nothing_on_the_host_and_skips_a_non_finite_step(small_tokenizer, batch, mode):
    """train_step with Muon: a good step, then a NaN gradient, in every precision, without one host read
    of a device value (fp16: GradScaler hands found_inf to the optimizer instead of reading it)."""
    model, opt = model_and_optimizer(small_tokenizer.vocab_size)
    prec = Precision.create(CPU, mode)
    with NoHostRead(allow_integer=True):
        train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    before = snapshot(model, opt)
    handle = model.blocks[0].mlp.down.weight.register_hook(lambda g: g * math.nan)
    with NoHostRead(allow_integer=True):
        _, grad_norm = train_step(model, opt, [batch], prec, 1.0, CPU, DistInfo())
    handle.remove()
    assert not torch.isfinite(grad_norm)
    assert_identical(snapshot(model, opt), before)
    if mode == "fp16":
        assert prec.scaler.get_scale() == 2.0 ** 15  # GradScaler saw the overflow and halved its scale


def test_still_scaled_gradients_are_unscaled_by_the_step(small_tokenizer, batch):
    """GradScaler.step without unscale_ first hands the step `grad_scale`: the result is the step on the
    unscaled gradients (the scale is a power of two, so bit for bit)."""
    model, opt = model_and_optimizer(small_tokenizer.vocab_size)
    twin, twin_opt = model_and_optimizer(small_tokenizer.vocab_size)
    for m, o, unscale_first in ((model, opt, False), (twin, twin_opt, True)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        _, loss = m(batch["x"], batch["y"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(o)
        with NoHostRead():
            scaler.step(o)
    assert_identical(snapshot(model, opt), snapshot(twin, twin_opt))
