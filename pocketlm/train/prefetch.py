"""Build the next steps' batches in a background thread while this step trains.

`Prefetcher(make, start, stop, device)` calls `make(step)` for start, start + 1, ... stop - 1 in one
worker thread, at most `depth` steps ahead of the training loop, and hands the results out in step
order. Each step's batches are whatever `make(step)` returns, so the batches and their order are the
synchronous loop's, and a resumed run (another `start`) still gets the batches of its steps.

The worker only touches host memory: building a batch is numpy work on the memory-mapped cache (its
copies release the GIL), and on CUDA it pins the batch so the step's host->device copies can be
asynchronous (`pocketlm.device.to_device`). It never pins elsewhere (MPS reads pageable memory
synchronously; pinning there buys nothing) and never runs a device op, which the MPS-rules mode
would refuse from a thread that does not hold the DeviceLock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from pocketlm import mps_rules

Batches = list[dict[str, Any]]  # one step's micro-batches: tensors plus e.g. "sources"


def pinned(batches: Batches) -> Batches:
    return [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]


class Prefetcher:
    """Steps [start, stop) of `make`, built `depth` steps ahead; `get(step)` in order, then `close()`
    (or use it as a context manager): close stops and joins the worker, also mid-range."""

    def __init__(self, make: Callable[[int], Batches], start: int, stop: int, device: torch.device,
                 depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth {depth}: prefetch at least one step ahead")
        self.make, self.start, self.stop, self.device = make, start, stop, device
        self.pin = device.type == "cuda"
        self.next = start  # the step the next get() must ask for
        self._ready: queue.Queue[tuple[int, Batches | None, BaseException | None]] = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"prefetch steps {start}-{stop - 1}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        if self.pin and self.device.index is not None:
            # Pinning allocates through the thread's current CUDA device: without this, each DDP rank
            # would also open a context on GPU 0.
            torch.cuda.set_device(self.device)
        with mps_rules.on_host():  # host tensors by design, whatever device the rules play
            for step in range(self.start, self.stop):
                if self._closing.is_set():
                    return
                try:
                    batches = self.make(step)
                    self._ready.put((step, pinned(batches) if self.pin else batches, None))
                except BaseException as e:  # handed to the caller, who re-raises it
                    self._ready.put((step, None, e))
                    return

    def get(self, step: int) -> Batches:
        """Step `step`'s batches; steps must be asked for in order, from `start`."""
        if step != self.next or step >= self.stop:
            raise ValueError(f"asked for step {step}; the prefetcher's next step is {self.next} "
                             f"(range {self.start}-{self.stop - 1})")
        built, batches, error = self._ready.get()
        assert built == step, (built, step)
        if error is not None:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"raised while building the batches of step {step} in the prefetch thread")
            raise error
        self.next += 1
        return batches

    def close(self) -> None:
        """Stop the worker and wait for it. The queue is emptied after `_closing` is set, so a worker
        blocked on a full queue gets one last put through, then sees the flag and returns."""
        self._closing.set()
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
