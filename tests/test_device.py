"""Device and precision choices shared by train, infer and serve, and the MPS guards that depend on the
torch version or on a kernel's self-check (exercised on the CPU through the MPS-rules mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm import PocketLMError
from pocketlm.device import AUTO_PRECISION, pick_device, to_device
from pocketlm.model import GPT, GPTConfig, attention
from pocketlm.train.optim import fused_trusted
from pocketlm.train.plan import plan
from pocketlm.train.precision import Precision, resolve_precision

CPU = torch.device("cpu")


def test_device_errors_name_the_flag_not_a_training_config():
    for name, match in (("tpu", "use auto, cuda, cuda:N, mps or cpu"), ("mps", "MPS is not available")):
        if name == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(PocketLMError, match=match) as e:
            pick_device(name)
        assert str(e.value).startswith("--device") and "TrainConfig" not in str(e.value)
    assert pick_device("cpu") == CPU


def test_one_automatic_precision_for_training_and_planning():
    for device, precision in AUTO_PRECISION.items():
        assert resolve_precision(torch.device(device), "auto") == precision
        assert plan(GPTConfig.tiny(vocab_size=300), 64, device, 16 << 30, 4096).precision == precision


def test_to_device_is_synchronous_off_cuda(mps_rules):
    batch = torch.arange(6)
    assert to_device(batch, CPU) is batch  # no non_blocking: the rules would refuse it


def test_old_torch_on_mps_refuses_bf16_and_the_fused_optimizer(mps_rules, monkeypatch):
    assert fused_trusted(CPU)  # torch 2.13 here: the fused kernel honours found_inf
    monkeypatch.setattr("pocketlm.train.optim.TORCH_VERSION", (2, 12))
    assert not fused_trusted(CPU)
    monkeypatch.setattr("pocketlm.train.precision.TORCH_VERSION", (2, 5))
    with pytest.raises(PocketLMError, match="bf16 on MPS needs torch 2.6"):
        Precision.create(CPU, "bf16")


def test_attention_falls_back_to_the_explicit_path_when_sdpa_disagrees(mps_rules, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=300, block_size=64)).eval()
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        expected, _ = model(ids)
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "_SDPA_TRUSTED", {})
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **kw) + 1e-2)
    with pytest.warns(UserWarning, match="using the explicit path"), torch.no_grad():
        got, _ = model(ids)
    assert attention._SDPA_TRUSTED and not any(attention._SDPA_TRUSTED.values())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
