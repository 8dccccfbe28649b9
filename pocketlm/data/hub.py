"""Streaming from the Hugging Face hub: a quick reach check, resume after a fault, one-line errors.

`datasets.load_dataset(..., streaming=True)` reads through huggingface_hub, which retries each HTTP
request on its own (5 retries over about 23 s for a timeout, a dropped connection or a 5xx). What it
cannot do is survive an outage longer than that in the middle of a stream, and what it raises then,
or for a missing, gated or broken dataset, is a traceback. This module adds:

- `check_reachable`: one TCP connect to the hub (or the proxy in front of it), at most
  PROBE_TIMEOUT_S, before anything else; without a network the command stops in a second or two
  with one line, instead of after ~30 s of retries.
- `stream`: rows of a hub dataset that survive faults the libraries gave up on: the dataset is
  reopened after a backoff and the rows already given are skipped (`IterableDataset.skip`), so no row
  is given twice or lost. What cannot be retried ends in one PocketLMError naming the dataset and
  what to do (`--data-dir`, `HF_TOKEN`).

HF_ENDPOINT (a hub mirror) and HF_HUB_OFFLINE are read from the environment by huggingface_hub and
datasets when they are imported; this module reads the values they hold.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from pocketlm import PocketLMError
from pocketlm.data.sources import DATA_DIR_ENV, SOURCES, SourceSpec

PROBE_TIMEOUT_S = 2.0
# pocketlm's reopen waits after the libraries' own retries failed: an outage of up to ~1 min is ridden out.
BACKOFF_S = (1.0, 4.0, 15.0, 40.0)
# Exceptions (by class name, anywhere in the cause chain) that mean "the network failed, try again".
TRANSIENT = {"TimeoutException", "NetworkError", "RemoteProtocolError", "ConnectError", "ReadError",
             "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "TimeoutError",
             "IncompleteRead", "ProtocolError"}

_reached: set[str] = set()


def endpoint() -> str:
    import huggingface_hub.constants

    return huggingface_hub.constants.ENDPOINT


def offline() -> bool:
    import datasets.config
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _mirror_hint(names: list[str]) -> str:
    where = f"DIR/{names[0]}/" if len(names) == 1 else "DIR/<source>/"
    return (f"pass --data-dir DIR (or set {DATA_DIR_ENV}) where {where} holds a local copy, "
            "or set HF_ENDPOINT to a hub mirror you can reach")


def _probe_target(url: str) -> tuple[str, int, str]:
    """(host, port, what) to connect to: the hub itself, or the proxy httpx would go through."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80, f"the proxy {p.hostname}:{p.port or 80}"
    return host, port, f"{host}:{port}"


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (or its proxy) opens within `timeout`, else why not.

    The connect runs in a thread so that a name lookup which hangs (no network, a resolver that
    does not answer) is cut at the same deadline."""
    host, port, what = _probe_target(url)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {what} in {timeout:g} s"
    return None if result[0] is None else f"cannot connect to {what}: {result[0]}"


def check_reachable(names: list[str], hub_ids: list[str]) -> None:
    """Stop with one line when the hub cannot be reached; nothing to do when offline mode is on
    (datasets then reads only its cache) or the endpoint answered before in this process."""
    url = endpoint()
    if offline() or url in _reached:
        return
    why = probe(url)
    if why is None:
        _reached.add(url)
        return
    which = ", ".join(f"{n} ({h})" for n, h in zip(names, hub_ids))
    raise PocketLMError(f"cannot reach the Hugging Face hub at {url} for {which}: {why}; {_mirror_hint(names)}")


def reads_hub(spec: SourceSpec, data_dir: Path | None) -> bool:
    """Whether `spec` will stream from the hub: a hub source with no path= and no mirror folder."""
    info = SOURCES[spec.name]
    if info.hub_id is None or "path" in spec.options or "mirror" in spec.options:
        return False
    folders = ("fineweb_edu", "fineweb_legal") if spec.name == "fineweb_edu" else (spec.name,)
    return data_dir is None or not any((data_dir / f).is_dir() for f in folders)


# --- errors -----------------------------------------------------------------------------------------

def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def transient(e: BaseException) -> bool:
    """A fault worth retrying: a network error or a 5xx/429 answer, anywhere in the cause chain."""
    for x in _chain(e):
        if any(c.__name__ in TRANSIENT for c in type(x).__mro__):
            return True
        status = _status(x)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if type(x) is ConnectionError and "Couldn't reach" in str(x) and not offline():
            return True
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def explain(name: str, hub_id: str, e: BaseException, rows_done: int) -> str:
    """One line: what went wrong with `hub_id` and what to do."""
    chain = list(_chain(e))
    kinds = {c.__name__ for x in chain for c in type(x).__mro__}
    text = " ".join(str(x) for x in chain)
    url = f"{endpoint().rstrip('/')}/datasets/{hub_id}"
    after = f" after {rows_done:,} rows" if rows_done else ""
    if "GatedRepoError" in kinds or "is a gated dataset" in text:
        return (f"{name}: {hub_id} is gated on the hub: accept its terms at {url} and set HF_TOKEN "
                f"(or run `hf auth login`); or {_mirror_hint([name])}")
    if offline() and ("OfflineModeIsEnabled" in kinds or type(e) is ConnectionError):
        return (f"cannot reach the Hugging Face hub for {name} ({hub_id}: HF_HUB_OFFLINE is set, and streaming "
                f"reads nothing from a cache); unset HF_HUB_OFFLINE, or {_mirror_hint([name])}")
    if "RepositoryNotFoundError" in kinds or "DatasetNotFoundError" in kinds:
        return (f"{name}: {hub_id} is not on the hub at {endpoint()} (renamed, removed, or private: then set "
                f"HF_TOKEN); {_mirror_hint([name])}")
    if transient(e):
        return (f"cannot reach the Hugging Face hub for {name} ({hub_id}{after}: {_first_line(e)}; gave up after "
                f"{len(BACKOFF_S)} reopens); run the command again later, or {_mirror_hint([name])}")
    if "ArrowInvalid" in kinds or "ArrowException" in kinds or "JSONDecodeError" in kinds:
        return (f"{name}: a data file of {hub_id} on the hub cannot be read{after} ({_first_line(e)}); "
                f"the hub's copy may be broken or changed: try again later, or {_mirror_hint([name])}")
    return (f"{name}: datasets cannot stream {hub_id}{after} ({_first_line(e)}); check the spec's name=/split=, "
            f"or {_mirror_hint([name])}")


# --- streaming --------------------------------------------------------------------------------------

def stream(name: str, hub_id: str, split: str, config: str | None,
           records: Any, sleep: Any = time.sleep) -> Iterator[dict[str, Any]]:
    """The rows of one hub dataset split, in order, each once, across faults.

    `records(ds)` turns a streamed dataset into row dicts (rows.py converts a batch at a time). On a
    transient fault the dataset is opened again after BACKOFF_S[k] seconds and the rows already
    given are skipped; the count of reopens starts again once rows flow. Any other failure, or a
    fault that outlasts the backoff, raises one PocketLMError.
    """
    import datasets

    # datasets logs a failed parquet read on its own (a second line before ours): ours names the fix.
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    if not Path(hub_id).exists():  # datasets reads a local folder of that name without the network
        check_reachable([name], [hub_id])
    done = 0  # rows given to the caller
    failures, done_at_failure = 0, -1
    while True:
        try:
            ds = datasets.load_dataset(hub_id, name=config, split=split, streaming=True)
            for data in records(ds.skip(done) if done else ds):
                yield data
                done += 1
            return
        except Exception as e:  # noqa: BLE001 - every failure becomes a retry or one line
            if done != done_at_failure:
                failures, done_at_failure = 0, done
            if not transient(e) or failures >= len(BACKOFF_S):
                raise PocketLMError(explain(name, hub_id, e, done)) from None
            wait = BACKOFF_S[failures]
            failures += 1
            sys.stderr.write(f"{name}: the hub failed after {done:,} rows ({_first_line(e)}); reopening "
                             f"{hub_id} in {wait:g} s and resuming at row {done + 1:,} "
                             f"[{failures}/{len(BACKOFF_S)}]\n")
            sleep(wait)
