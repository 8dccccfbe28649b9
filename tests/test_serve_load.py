"""A bounded load test on loopback: 64 concurrent streams, many of them dropped midway, then a seeded
request must equal its unloaded result, every slot must be free again, and RSS growth is reported."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import httpx
import pytest

from pocketlm.serve.app import create_app

STREAMS = 64


def rss_mib() -> float:
    """This process's resident memory (the server runs in it, in a thread)."""
    kib = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)
    return int(kib) / 1024


async def one_stream(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
    """Stream i: the inspector or the OpenAI stream; leaves after a random number of events, or reads
    to the end. Returns (status, events read)."""
    rng = random.Random(i)
    leave_after = rng.choice([0, 1, 3, 8, None, None])  # None: read to the end
    msg = [{"role": "user", "content": f"Tell me about river number {i}."}]
    if i % 2:
        path, body = "/api/inspect", {"messages": msg, "max_tokens": 32, "seed": i, "logit_lens": bool(i % 4 == 1),
                                      "attn_entropy": bool(i % 4 == 3)}
    else:
        path, body = "/v1/chat/completions", {"messages": msg, "max_tokens": 32, "seed": i, "stream": True,
                                              "logprobs": True, "top_logprobs": 5}
    n = 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, 0
        async for line in r.aiter_lines():
            if leave_after is not None and n >= leave_after:
                break  # leaving the block closes the connection mid-stream
            n += line.startswith("data:")
    return 200, n


async def burst(url: str) -> list[tuple[int, int]]:
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one_stream(client, i) for i in range(STREAMS)))


def test_64_streams_with_disconnects_leave_nothing_behind(tiny_model, record_property, live_server, complete,
                                                          wait_idle):
    model, tok = tiny_model
    with live_server(create_app(model, tok, max_active=STREAMS)) as url:
        unloaded = complete(url, 7)
        rss_before = rss_mib()
        results = asyncio.run(burst(url))
        info = wait_idle(url)
        loaded = complete(url, 7)
        rss_after = rss_mib()
    assert [s for s, _ in results] == [200] * STREAMS
    assert info["active"] == 0 and sum(info["finished"].values()) >= STREAMS
    assert info["finished"].get("cancelled", 0) > 0  # some clients really left midway
    assert loaded["content"] == unloaded["content"] and loaded["finish"] == unloaded["finish"]
    assert loaded["logprobs"] == pytest.approx(unloaded["logprobs"], abs=1e-5)
    growth = rss_after - rss_before
    record_property("rss_growth_mib", round(growth, 1))
    print(f"\nload: {STREAMS} streams, {sum(n for _, n in results)} events read, finished {info['finished']}; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB ({growth:+.1f} MiB)")
    assert growth < 256  # per-request state (KV caches, queues) must not pile up
