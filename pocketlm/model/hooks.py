"""Hook points with TransformerLens names, and the methods to observe or edit activations through them.

Every activation worth looking at passes through an identity `HookPoint`, so its name is its module path
(`blocks.3.attn.hook_pattern`). With no hook attached a HookPoint returns its input object unchanged,
so observing never changes the logits. A hook is `fn(tensor, hook) -> tensor | None`: returning a
tensor replaces the activation (ablation), returning None only observes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pocketlm import PocketLMError

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
# Which hook points to act on: one name, a list of names, a predicate on the name, or None for all.
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """An identity module whose only job is to be a place to attach hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # filled in with the module path by HookedModule.setup_hooks

    def has_hooks(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # nn.Module.__call__ costs microseconds even with nothing attached: ~10% of an eager v1 decode
        # step on an H100 over 146 hook points. Go through it only when a hook is attached.
        # (Global nn.Module hooks therefore don't fire on hook points.)
        if self.has_hooks():
            return super().__call__(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HookedModule(nn.Module):
    """Mixin for the root model: finds its HookPoints and runs forwards with hooks attached."""

    def setup_hooks(self) -> None:
        """Name every HookPoint after its module path; call at the end of the root's __init__."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name
                self.hook_dict[name] = mod

    def hook_names(self, names: NameFilter = None) -> list[str]:
        """The hook point names selected by `names` (all of them for None), in forward order."""
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.hook_dict]
        if unknown:
            raise PocketLMError(f"unknown hook point(s) {', '.join(unknown)}; see model.hook_names() for the list")
        return wanted

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = ()) -> Iterator[HookedModule]:
        """Attach `(names, fn)` hooks for the duration of a `with` block; they are removed on exit."""
        handles = []
        try:
            for names, fn in fwd_hooks:
                for name in self.hook_names(names):
                    handles.append(self.hook_dict[name].register_forward_hook(_adapt(fn)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def run_with_hooks(self, idx: torch.Tensor, fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
                       **forward_kwargs: Any) -> Any:
        """One forward with hooks attached; returns what forward returns (`(logits, loss)`)."""
        with self.hooks(fwd_hooks):
            return self(idx, **forward_kwargs)

    def run_with_cache(self, idx: torch.Tensor, names: NameFilter = None,
                       **forward_kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward that records the selected activations (detached): `(logits, {name: tensor})`.

        Recording `hook_attn_scores` / `hook_pattern` makes those layers compute attention explicitly,
        which matches the fused kernel only to fp tolerance, not bit for bit.
        """
        store: dict[str, torch.Tensor] = {}

        def save(t: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = t.detach()

        with self.hooks([(names, save)]):
            logits, _ = self(idx, **forward_kwargs)
        return logits, store


def _adapt(fn: HookFn) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
    """torch forward hooks get (module, inputs, output); ours get (activation, hook point)."""

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output, module)  # type: ignore[arg-type]

    return hook
