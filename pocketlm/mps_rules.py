"""The MPS-rules mode: run any code on the CPU and fail where an Apple GPU would refuse or go wrong.

MPS refuses or miscomputes things that CPU and CUDA accept, and CI has no Mac. Inside `MPSRules()`
(tests use it through a fixture; `POCKETLM_MPS_RULES=1` turns it on for a whole `pocketlm` run) the
CPU plays the device, every torch op is checked, and the first broken rule raises `MPSRuleError`:

- a float64 or complex tensor (MPS has neither: pytorch#122602);
- an asynchronous (`non_blocking`) host->device copy from unpinned memory (pytorch#139550);
- device work from two threads at once (pytorch#197805): device work while another thread holds a
  `DeviceLock`, or unlocked device work while another live thread has also done unlocked device work;
- an op listed in `mps_gaps.GAPS`.

The CPU being the device, a tensor's device cannot tell host from device, so the mode keeps track:
a tensor is a device tensor when an op made it outside `on_host()`, when an op on a device tensor
made it, when `.to(device)` copied it to the device, or when it is a model parameter. Code that is on
the host by design (fp64 accumulation, sampling from a row of floats, building tables before they
move to the device, the prefetcher building batches) says so with `on_host()`: inside it, ops on host
tensors only are exempt, while an op that touches a device tensor and every `.to(device)` (a copy to
the device, even of a host tensor) keep every rule, in any thread. `.cpu()` of a device tensor is a
copy to the host (device work too), as it is on MPS. Under the mode `.to(a device)` always means the
device: host code that means the host writes `.cpu()`. Tensors the mode never saw (made before it
started, or by `torch.from_numpy`) count as host tensors. While the rules are on,
`pocketlm.device.is_mps` is true for every device, so the MPS branches are what runs.

What differs from a real MPS run: torch's GradScaler reciprocates the scale in fp64 on every device
but MPS (where it uses fp32), so that one call site is allowed; kernels that are merely wrong on some
macOS versions (e.g. SDPA with KV lengths that are not a multiple of 32) cannot be detected by name
(`model/attention.py` checks them at start-up on the real device instead).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pocketlm import PocketLMError
from pocketlm.mps_gaps import BY_OP

_BAD_DTYPES = (torch.float64, torch.complex64, torch.complex128, torch.complex32)
# Call sites in torch itself that use float64 on CPU/CUDA but take an fp32 branch on MPS.
_TORCH_MPS_BRANCHES = (("torch/amp/grad_scaler.py", "unscale_"),)


class MPSRuleError(PocketLMError):
    """Code that would fail or compute wrongly on MPS."""


class _State:
    def __init__(self) -> None:
        self.depth = 0  # nested MPSRules
        self.meta = threading.Lock()  # guards the two tables below
        self.lock_owner: dict[int, threading.Thread] = {}  # id(DeviceLock) -> holding thread
        self.unlocked_users: dict[int, threading.Thread] = {}  # thread ident -> thread


_state = _State()
_local = threading.local()  # .host: inside on_host(); .raw: the mode's own copies, unchecked
_TAG = "_pocketlm_on_device"  # attribute set on device tensors while the mode runs


def active() -> bool:
    return _state.depth > 0


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Work that runs on the host by design: ops on host tensors only are exempt from the rules in
    this block (this thread only); ops on device tensors and copies to the device are still checked."""
    before = getattr(_local, "host", False)
    _local.host = True
    try:
        yield
    finally:
        _local.host = before


def _in_host_block() -> bool:
    return getattr(_local, "host", False)


def _raw() -> bool:
    return getattr(_local, "raw", False)


@contextlib.contextmanager
def _unchecked() -> Iterator[None]:
    before = _raw()
    _local.raw = True
    try:
        yield
    finally:
        _local.raw = before


def on_device(t: torch.Tensor) -> bool:
    """Whether the mode counts `t` as a device tensor (see the module docstring)."""
    return getattr(t, _TAG, False) or isinstance(t, torch.nn.Parameter)


def _mark_device(out: Any) -> None:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            setattr(t, _TAG, True)


def lock_taken(lock: object) -> None:
    with _state.meta:
        _state.lock_owner[id(lock)] = threading.current_thread()


def lock_released(lock: object) -> None:
    with _state.meta:
        _state.lock_owner.pop(id(lock), None)


def _check_thread() -> None:
    me = threading.current_thread()
    with _state.meta:
        holders = list(_state.lock_owner.values())
        if any(t is not me for t in holders):
            other = next(t for t in holders if t is not me)
            raise MPSRuleError(f"device work in thread {me.name!r} while thread {other.name!r} holds the "
                               "device lock: MPS crashes with two threads at once (pytorch#197805)")
        if holders:
            return
        others = [t for ident, t in _state.unlocked_users.items() if ident != me.ident and t.is_alive()]
        if others:
            raise MPSRuleError(f"device work in thread {me.name!r} without the device lock while thread "
                               f"{others[0].name!r} also uses the device: MPS crashes with two threads at "
                               "once (pytorch#197805); do all device work under one DeviceLock")
        _state.unlocked_users[me.ident] = me


def _torch_mps_branch() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if any(path.endswith(p) and frame.f_code.co_name == fn for p, fn in _TORCH_MPS_BRANCHES):
            return True
        frame = frame.f_back
    return False


def _check_dtypes(func: Any, tensors: list[torch.Tensor]) -> None:
    bad = next((t.dtype for t in tensors if t.dtype in _BAD_DTYPES), None)
    if bad is not None and not _torch_mps_branch():
        raise MPSRuleError(f"{func} on a {bad} tensor: MPS has no float64 or complex (pytorch#122602); "
                           "use float32 on the device, or accumulate on the host")


_TORCH_DIR = os.path.dirname(torch.__file__)
# Frames between an op's caller and this mode: this file and torch's dispatch plumbing.
_PLUMBING = (__file__, *(os.path.join(_TORCH_DIR, p) for p in ("_dynamo", "_compile.py", "_ops.py",
                                                                 os.path.join("utils", "_python_dispatch.py"))))


def _check_non_blocking(t: torch.Tensor) -> None:
    # torch's own non_blocking copies (GradScaler's found_inf) are device->device on a real device:
    # only copies asked for outside torch count.
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PLUMBING):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        return
    if t.device.type == "cpu" and not t.is_pinned():
        raise MPSRuleError("non_blocking copy to the device from unpinned host memory: MPS may read the buffer "
                           "after the host reused it (pytorch#139550); copy synchronously off CUDA")


class _Mode(TorchDispatchMode):
    """Checks every op of one thread (dispatch modes are per thread)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _state.depth == 0 or _raw():
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if _in_host_block() and not any(on_device(t) for t in tensors):
            return func(*args, **kwargs)  # host work by design
        name = f"aten.{func.overloadpacket.__name__}"
        gap = BY_OP.get(name)
        if gap is not None and gap.applies(args, kwargs):
            raise MPSRuleError(f"{func} is a known MPS problem ({gap.source}): {gap.what}")
        if func is torch.ops.aten.copy_.default and (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
            _check_non_blocking(args[1])
        _check_thread()
        _check_dtypes(func, tensors)
        out = func(*args, **kwargs)
        _check_dtypes(func, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        _mark_device(out)
        return out


_original_to = torch.Tensor.to
_original_cpu = torch.Tensor.cpu
_original_run = threading.Thread.run


def _checked_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`.to()` under the mode. On the CPU a same-device `.to()` returns the tensor itself without an op
    reaching the dispatch mode, so copies to the device are checked here, where the caller's intent is
    still visible, in `on_host()` blocks too."""
    if _state.depth == 0 or _raw():
        return _original_to(self, *args, **kwargs)
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})
    to_host_tensor = bool(args) and isinstance(args[0], torch.Tensor) and not on_device(args[0])
    if device is None or to_host_tensor:  # a dtype conversion where the tensor is
        return _original_to(self, *args, **kwargs)
    if non_blocking:
        _check_non_blocking(self)
    if on_device(self):  # already there: at most a dtype conversion, which the dispatch mode checks
        return _original_to(self, *args, **kwargs)
    # A host tensor copied to the device: device work, whichever thread or block it is in.
    _check_thread()
    out = _original_to(self, *args, **kwargs)
    if out is self:  # on MPS the copy is a new tensor; here too, so the host tensor stays a host tensor
        with _unchecked():
            out = self.clone()
    _check_dtypes("Tensor.to(device)", [out])
    setattr(out, _TAG, True)
    return out


def _checked_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`.cpu()` under the mode: of a device tensor, a copy to the host (device work), as on MPS."""
    if _state.depth == 0 or _raw() or not on_device(self):
        return _original_cpu(self, *args, **kwargs)
    _check_thread()
    out = _original_cpu(self, *args, **kwargs)
    with _unchecked():
        return self.clone() if out is self else out


def _run_with_rules(self: threading.Thread) -> None:
    # New threads start with an empty dispatch-mode stack: carry the rules into them.
    with _Mode():
        _original_run(self)


class MPSRules:
    """Context manager: the rules hold for this thread and every thread started while it is active."""

    def __enter__(self) -> MPSRules:
        if _state.depth == 0:
            torch.Tensor.to = _checked_to  # type: ignore[method-assign]
            torch.Tensor.cpu = _checked_cpu  # type: ignore[method-assign]
            threading.Thread.run = _run_with_rules  # type: ignore[method-assign]
            _state.unlocked_users.clear()
        _state.depth += 1
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        _state.depth -= 1
        if _state.depth == 0:
            torch.Tensor.to = _original_to  # type: ignore[method-assign]
            torch.Tensor.cpu = _original_cpu  # type: ignore[method-assign]
            threading.Thread.run = _original_run  # type: ignore[method-assign]
            _state.unlocked_users.clear()
