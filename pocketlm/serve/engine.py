"""Runs generations for the server: one thread per request, one model forward at a time.

Every request gets its own KVCache and random generator (inside `generate`); the model itself is
shared, so a DeviceLock serialises every step's device work (forward, sampling, statistics: MPS
crashes when two threads run ops at once) and concurrent requests interleave token by token. A
request's steps travel to its async handler through an asyncio queue; when the handler goes away
(client disconnected, stop pressed) the request's cancel event stops its thread before the next step.

Admission is a slot taken on the event loop's thread with no `await` between the check and the
taking (`admit`), before the request does any work, so `max_active` holds under any burst. The slot
is given back when the generation's thread ends, or by `release` if it never started.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from sse_starlette import EventSourceResponse

from pocketlm.device import DeviceLock
from pocketlm.infer.generate import Generation, Step, generate
from pocketlm.infer.config import StatsRequest
from pocketlm.infer.sampling import GenConfig
from pocketlm.serve.prompt import RequestError

_END = object()


@dataclass
class Job:
    id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    gen: Generation | None = None
    running: bool = False  # its thread started; the slot is then given back when the thread ends


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) answer was ready."""


class Engine:
    def __init__(self, model: torch.nn.Module, tok, max_active: int) -> None:
        self.model, self.tok = model, tok
        self.max_active = max_active
        self.lock = DeviceLock()  # one request's device work at a time through the shared model
        self.jobs: dict[str, Job] = {}  # admitted requests, by id (for the inspector's stop button)
        self.finished: Counter[str] = Counter()  # finish reasons of completed requests

    def admit(self) -> Job:
        """Take a slot or refuse with a 429; call on the event loop's thread (no lock needed there)."""
        if len(self.jobs) >= self.max_active:
            raise RequestError(429, f"{self.max_active} generations are running; retry shortly")
        # Unguessable: the id is what the cancel endpoint takes, so another page must not predict it.
        job = Job(f"gen-{secrets.token_urlsafe(16)}")
        self.jobs[job.id] = job
        return job

    def start(self, job: Job, prompt_ids: list[int], cfg: GenConfig, stats: StatsRequest | None = None) -> None:
        """Prepare the job's generation; it runs once `steps(job)` is consumed. `stats`: the per-token
        statistics the caller will read from each step (None: none, the fastest)."""
        job.gen = generate(self.model, self.tok, prompt_ids, cfg, stats=stats, cancel=job.cancel, lock=self.lock)

    async def prepare(self, job: Job, receive, fn, *args):
        """`fn(*args)` (tokenizing, fitting the context: CPU work) in a worker thread, off the event
        loop. If the client disconnects first, the job's cancel event is set (`fn` may watch it) and
        ClientGone is raised at once, without waiting for the thread: the caller's `release` then
        frees the slot. `receive` is the request's ASGI receive."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, lambda: fn(*args))

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                job.cancel.set()  # no await from here to the caller's release: the slot is free at once
                work.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is nobody's now
                raise ClientGone
            return work.result()
        finally:
            gone.cancel()

    def release(self, job: Job) -> None:
        """The request is over (answered, failed or abandoned): stop its generation, free its slot."""
        job.cancel.set()
        if not job.running:
            self.jobs.pop(job.id, None)

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

        if job.cancel.is_set():  # released (the client left) before its first step: nothing to run
            return
        job.running = True
        threading.Thread(target=work, name=job.id, daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()

    async def collect(self, job: Job, receive) -> list[Step]:
        """All of the job's steps, for a non-streaming answer; raises ClientGone (and stops the
        generation) if the client disconnects first. `receive` is the request's ASGI receive."""
        async def gather() -> list[Step]:
            return [s async for s in self.steps(job)]

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise ClientGone
            return work.result()
        finally:
            gone.cancel()
            work.cancel()  # a no-op once done; else its `steps` sets the cancel event on the way out


class JobResponse(EventSourceResponse):
    """An SSE response that gives its job's slot back however it ends, even before its first event
    (a generator that never started has no `finally` to run)."""

    def __init__(self, content, engine: Engine, job: Job) -> None:
        super().__init__(content, ping=15)
        self._engine, self._job = engine, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._engine.release(self._job)
