"""Runs generations for the server: one thread per request, one model forward at a time.

Every request gets its own KVCache and random generator (inside `generate`); the model itself is
shared, so a DeviceLock serialises every step's device work (forward, sampling, statistics: MPS
crashes when two threads run ops at once) and concurrent requests interleave token by token. A
request's steps travel to its async handler through an asyncio queue; when the handler goes away
(client disconnected, stop pressed) the request's cancel event stops its thread before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from pocketlm.device import DeviceLock
from pocketlm.infer.generate import Generation, Step, generate
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.sampling import GenConfig

_END = object()


@dataclass
class Job:
    id: str
    gen: Generation
    cancel: threading.Event


class Engine:
    def __init__(self, model: torch.nn.Module, tok, max_active: int) -> None:
        self.model, self.tok = model, tok
        self.max_active = max_active
        self.lock = DeviceLock()  # one request's device work at a time through the shared model
        self.jobs: dict[str, Job] = {}  # running requests, by id (for the inspector's stop button)
        self.finished: Counter[str] = Counter()  # finish reasons of completed requests
        self._ids = itertools.count(1)

    @property
    def busy(self) -> bool:
        return len(self.jobs) >= self.max_active

    def start(self, prompt_ids: list[int], cfg: GenConfig, stats: StatsRequest | None = None) -> Job:
        """Prepare a generation; it runs (and counts as running) once `steps(job)` is consumed.
        `stats`: the per-token statistics the caller will read from each step (None: none)."""
        cancel = threading.Event()
        gen = generate(self.model, self.tok, prompt_ids, cfg, stats=stats, cancel=cancel, lock=self.lock)
        return Job(f"gen-{next(self._ids)}", gen, cancel)

    def _finish(self, job: Job, queue: asyncio.Queue) -> None:
        """Bookkeeping on the event loop's thread, so the counters need no lock of their own."""
        self.finished[job.gen.finish_reason or "error"] += 1
        self.jobs.pop(job.id, None)
        queue.put_nowait(_END)

    async def steps(self, job: Job) -> AsyncIterator[Step]:
        """The job's steps as they are made. Leaving early (or being cancelled) stops the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                for step in job.gen:
                    loop.call_soon_threadsafe(queue.put_nowait, step)
            except BaseException as e:  # handed to the handler, which re-raises it there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(self._finish, job, queue)

        self.jobs[job.id] = job
        threading.Thread(target=work, name=job.id, daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()
