"""The hub path, end to end, against a Hugging Face hub on loopback (tests/hub/).

Every source's default reads the hub through `datasets.load_dataset(..., streaming=True)`. Here the
real `datasets` / `huggingface_hub` stream from `tests/hub/server.py` (HF_ENDPOINT points at it; HF_HOME
is a temporary folder), serving the five dataset repos laid out as on the hub and built from the
tests/data slices (`tests/hub/layouts.py`). Nothing in pocketlm is replaced: the commands run as a user
runs them, in a fresh process with the environment set (run_cli.py), and every result is compared with
the same rows read from a local mirror with --data-dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from hub.layouts import DOLLY, DOLLY_FILE, FINEWEB, FINEWEB_FILES, GUTENBERG, GUTENBERG_FILE, OASST1, WIKITEXT, build_mirror, build_repos
from hub.server import Faults, LoopbackHub

import pocketlm

# The checkout whose pocketlm is under test (the one on sys.path), for the commands' PYTHONPATH.
REPO = Path(pocketlm.__file__).resolve().parents[1]
RUN_CLI = Path(__file__).resolve().parent / "hub" / "run_cli.py"
# One spec per hub source; oasst1's slice holds validation rows only (tests/hub/layouts.py).
TOKENIZER_SOURCES = ("fineweb_edu", "gutenberg", "dolly", "oasst1:split=validation")
SPECS = ("fineweb_edu", "dolly", "oasst1:split=validation", "gutenberg", "wikitext")
CACHE_ARGS = ["--pretrain", "fineweb_edu", "gutenberg", "--eval", "wikitext", "--sft", "dolly",
              "oasst1:split=validation", "--workers", "1", "--val-fraction", "0.1"]


class Result(NamedTuple):
    rc: int
    out: str
    err: str


@pytest.fixture(scope="module")
def hub_repos(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repos(data_dir, tmp_path_factory.mktemp("hub_repos"))


@pytest.fixture(scope="module")
def mirror(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mirror(data_dir, tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def hub_server(hub_repos: Path):
    with LoopbackHub(hub_repos) as hub:
        yield hub


@pytest.fixture()
def hub(hub_server: LoopbackHub) -> LoopbackHub:
    """The loopback hub with no faults and an empty request log."""
    hub_server.faults = Faults()
    hub_server.log.clear()
    hub_server.rescan()
    return hub_server


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(tmp: Path, endpoint: str | None, **extra: str) -> dict[str, str]:
    """The environment of a user whose hub is `endpoint`, with empty caches under tmp."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "POCKETLM_DATA_DIR"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_DATASETS_CACHE=str(tmp / "hf_home" / "datasets"),
               PYTHONPATH=str(REPO), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def pocketlm(tmp: Path, env: dict[str, str], *commands: list[str], timeout: float = 400) -> list[Result]:
    """Run `pocketlm ARGS` for each command in one fresh process with `env`."""
    out = tmp / f"cli_{len(list(tmp.glob('cli_*')))}"
    out.mkdir()
    subprocess.run([sys.executable, str(RUN_CLI), str(out), json.dumps(list(commands))], env=env, cwd=tmp,
                   timeout=timeout, check=True)
    return [Result(int((out / f"{k}.rc").read_text()), (out / f"{k}.out").read_text(encoding="utf-8"),
                   (out / f"{k}.err").read_text(encoding="utf-8")) for k in range(len(commands))]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_files(cache: Path) -> dict[str, bytes]:
    """A cache's token files (everything but meta.json, whose tokenizer path differs by folder)."""
    return {k: v for k, v in files_of(cache).items() if k != "meta.json"}


def counts_line(spec: str, err: str) -> str:
    """`data show`'s summary line (`SPEC: N records, M characters`) in its stderr."""
    return next(line for line in err.splitlines() if line.startswith(f"{spec}: ") and " records, " in line)


def no_traceback(r: Result) -> None:
    assert "Traceback" not in r.err, r.err


# --- the real path, end to end ----------------------------------------------------------------------

def test_data_show_streams_every_source_from_the_hub_as_the_mirror_reads_it(hub, mirror, tmp_path):
    results = pocketlm(tmp_path, hub_env(tmp_path, hub.url),
                       *[["data", "show", s] for s in SPECS],
                       *[["data", "show", s, "--data-dir", str(mirror)] for s in SPECS])
    via_hub, via_mirror = results[:len(SPECS)], results[len(SPECS):]
    for spec, h, m in zip(SPECS, via_hub, via_mirror):
        no_traceback(h)
        assert (h.rc, m.rc) == (0, 0), (spec, h.err, m.err)
        assert h.out == m.out and h.out, spec  # the same records, ids and meta, in the same order
        assert counts_line(spec, h.err) == counts_line(spec, m.err)
    # ... and they did come from the hub: every repo's data file was read through /resolve/.
    reads = {p for method, p, _ in hub.log if method == "GET" and "/resolve/" in p and not p.endswith("README.md")}
    for repo in (FINEWEB, DOLLY, OASST1, GUTENBERG, WIKITEXT):
        assert any(f"/datasets/{repo}/resolve/" in p for p in reads), (repo, sorted(reads))


@pytest.fixture(scope="module")
def hub_build(hub_server: LoopbackHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer trained on hub sources and a cache built from the hub with it (no faults), in one folder."""
    tmp = tmp_path_factory.mktemp("hub_build")
    hub_server.faults = Faults()
    results = pocketlm(
        tmp, hub_env(tmp, hub_server.url),
        ["tokenizer", "train", "--sources", *TOKENIZER_SOURCES, "--vocab-size", "800", "--out", str(tmp / "tok")],
        ["cache", "build", "--tokenizer", str(tmp / "tok" / "tokenizer.model"), "--out", str(tmp / "cache"),
         *CACHE_ARGS])
    for r in results:
        no_traceback(r)
        assert r.rc == 0, r.err
    return tmp


def test_tokenizer_and_cache_from_the_hub_equal_the_mirror_byte_for_byte(hub_build, hub, mirror, tmp_path):
    results = pocketlm(
        tmp_path, hub_env(tmp_path, None),  # no endpoint: the mirror path must not touch any hub
        ["tokenizer", "train", "--sources", *TOKENIZER_SOURCES, "--vocab-size", "800", "--out", str(tmp_path / "tok"),
         "--data-dir", str(mirror)],
        ["cache", "build", "--tokenizer", str(hub_build / "tok" / "tokenizer.model"), "--out",
         str(tmp_path / "cache"), "--data-dir", str(mirror), *CACHE_ARGS])
    for r in results:
        no_traceback(r)
        assert r.rc == 0, r.err
    assert (hub_build / "tok" / "tokenizer.model").read_bytes() == (tmp_path / "tok" / "tokenizer.model").read_bytes()
    hub_files, mirror_files = shard_files(hub_build / "cache"), shard_files(tmp_path / "cache")
    assert sorted(hub_files) == sorted(mirror_files)
    assert [k for k in hub_files if hub_files[k] != mirror_files[k]] == []
    meta_hub, meta_mirror = (json.loads((c / "meta.json").read_text()) for c in (hub_build / "cache", tmp_path / "cache"))
    assert meta_hub["sources"] == meta_mirror["sources"]
    assert all(meta_hub["sources"][s]["counts"]["train"]["docs"] > 0 for s in ("fineweb_edu", "dolly"))


# --- faults -----------------------------------------------------------------------------------------

def test_cache_built_through_faults_equals_the_clean_one(hub_build, hub, tmp_path):
    """Each retryable fault, on its own source, in one build: a connection dropped mid-file (dolly),
    answers slower than the read timeout (gutenberg), 502s (wikitext's README), and an outage that
    outlasts huggingface_hub's own retries in the middle of a stream (fineweb_edu's second file answers
    503 to six requests once 16 rows were given): pocketlm reopens the stream and resumes at row 17. The cache is the clean build's, byte for byte."""
    f = hub.faults
    f.drop_after(f"/{DOLLY_FILE}", 20_000)
    f.delay(f"/{GUTENBERG_FILE}", 4.0, method="GET")  # > HF_HUB_DOWNLOAD_TIMEOUT below
    f.fail_status(f"/{WIKITEXT}/resolve/main/README.md", 502, times=2, method="*")
    # Only its resolve URL holds the file name. Rows are given in batches of 16 (rows.HUB_ROW_BATCH):
    # the second batch spans the two files, so the first 16 rows are given before the outage.
    f.fail_status(f"/{FINEWEB_FILES[1]}", 503, times=6)
    [r] = pocketlm(tmp_path, hub_env(tmp_path, hub.url, HF_HUB_DOWNLOAD_TIMEOUT="2"),
                   ["cache", "build", "--tokenizer", str(hub_build / "tok" / "tokenizer.model"), "--out",
                    str(tmp_path / "cache"), *CACHE_ARGS])
    no_traceback(r)
    assert r.rc == 0, r.err
    assert [fault for fault, _ in f.status + f.drop + f.slow if fault.times] == []  # each one fired
    assert "fineweb_edu: the hub failed after 16 rows" in r.err and "resuming at row 17" in r.err, r.err
    assert shard_files(tmp_path / "cache") == shard_files(hub_build / "cache")
    meta, clean = (json.loads((c / "meta.json").read_text()) for c in (tmp_path / "cache", hub_build / "cache"))
    assert meta["sources"] == clean["sources"]


def one_line_error(r: Result) -> str:
    no_traceback(r)
    assert r.rc == 1 and r.out == ""
    errors = [line for line in r.err.splitlines() if line.startswith("pocketlm: error: ")]
    assert len(errors) == 1, r.err
    return errors[0]


def test_missing_gated_and_broken_datasets_stop_with_one_line(hub_build, hub, tmp_path):
    broken = hub.root / FINEWEB / FINEWEB_FILES[1]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # the hub serves a truncated parquet
    hub.rescan()
    hub.faults.missing.add(OASST1)
    hub.faults.gated.add(DOLLY)
    try:
        missing, gated, truncated, bad_split = pocketlm(
            tmp_path, hub_env(tmp_path, hub.url), ["data", "show", "oasst1"], ["data", "show", "dolly"],
            ["cache", "build", "--tokenizer", str(hub_build / "tok" / "tokenizer.model"), "--out", str(tmp_path / "c"), "--pretrain", "fineweb_edu"],
            ["data", "show", "gutenberg:split=xx"])
    finally:
        broken.write_bytes(good)
        hub.rescan()
    line = one_line_error(missing)
    assert f"oasst1: {OASST1} is not on the hub at {hub.url}" in line and "--data-dir DIR" in line
    line = one_line_error(gated)
    assert f"dolly: {DOLLY} is gated on the hub" in line and "set HF_TOKEN" in line and "--data-dir DIR" in line
    line = one_line_error(truncated)
    assert f"fineweb_edu: a data file of {FINEWEB} on the hub cannot be read after 16 rows" in line
    assert "--data-dir DIR" in line
    assert not (tmp_path / "c" / "meta.json").exists()  # no cache that looks finished
    line = one_line_error(bad_split)
    assert f"gutenberg: datasets cannot stream {GUTENBERG}" in line and "xx" in line


# --- offline ----------------------------------------------------------------------------------------

@pytest.fixture()
def partial_mirror(mirror: Path, tmp_path: Path) -> Path:
    """A data dir with gutenberg only: the other sources need the hub."""
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "gutenberg").symlink_to(mirror / "gutenberg")
    return tmp_path / "partial"


def test_no_network_is_one_line_at_once_naming_every_source_that_needs_the_hub(hub_build, partial_mirror, tmp_path):
    """HF_ENDPOINT at a closed loopback port: a connect probe answers before datasets' retries start
    (no "Retrying" line: today they take ~30 s). A build names every source that would stream, and
    not the ones with a mirror folder or no hub dataset; nothing is written."""
    closed = f"http://127.0.0.1:{closed_port()}"
    show, build = pocketlm(
        tmp_path, hub_env(tmp_path, closed), ["data", "show", "dolly"],
        ["cache", "build", "--tokenizer", str(hub_build / "tok" / "tokenizer.model"), "--out", str(tmp_path / "c"),
         "--data-dir", str(partial_mirror), "--pretrain", "fineweb_edu", "gutenberg", "--sft", "dolly",
         "oasst1", "primer"])
    for r in (show, build):
        assert "Retrying" not in r.err
    line = one_line_error(show)
    assert line.startswith(f"pocketlm: error: cannot reach the Hugging Face hub at {closed} for dolly "
                           f"({DOLLY}): cannot connect to {closed[7:]}: ConnectionRefusedError")
    assert line.endswith("pass --data-dir DIR (or set POCKETLM_DATA_DIR) where DIR/dolly/ holds a local copy, "
                         "or set HF_ENDPOINT to a hub mirror you can reach")
    line = one_line_error(build)
    assert (f"for fineweb_edu ({FINEWEB}), dolly ({DOLLY}), oasst1 ({OASST1}): cannot connect" in line
            and "DIR/<source>/" in line)
    assert not (tmp_path / "c").exists()


def test_offline_mode_and_what_the_caches_hold(hub_build, hub, mirror, tmp_path):
    """HF_HUB_OFFLINE=1 after online streaming runs in the same HF_HOME (hub_build's): streaming reads no
    cache, so each hub source stops with one line and no request is sent. A dataset downloaded with
    huggingface_hub (`hf download --repo-type dataset ID --local-dir DIR/oasst1`) is a mirror for --data-dir."""
    from huggingface_hub import snapshot_download

    snapshot_download(OASST1, repo_type="dataset", local_dir=tmp_path / "dl" / "oasst1", endpoint=hub.url)
    sent = len(hub.log)
    offline_show, from_download, from_mirror = pocketlm(
        tmp_path, hub_env(hub_build, hub.url, HF_HUB_OFFLINE="1"), ["data", "show", "dolly"],
        ["data", "show", "oasst1:split=validation", "--data-dir", str(tmp_path / "dl")],
        ["data", "show", "oasst1:split=validation", "--data-dir", str(mirror)])
    line = one_line_error(offline_show)
    assert line.startswith(f"pocketlm: error: cannot reach the Hugging Face hub for dolly ({DOLLY}: HF_HUB_OFFLINE "
                           "is set, and streaming reads nothing from a cache)")
    assert len(hub.log) == sent
    assert from_download.rc == 0, from_download.err
    # The mirror's records are the hub's (test_data_show_streams_every_source_...).
    assert from_download.out == from_mirror.out and from_mirror.out


# --- quickstart --config, the recipe path ------------------------------------------------------------

RECIPE = """
[recipe]
vocab_size = 800
pretrain = ["fineweb_edu", "gutenberg"]
eval = ["wikitext"]
sft = ["dolly", "oasst1:split=validation"]
val_fraction = 0.1

[train]
name = "run"
model = "tiny"
pretrain_mix = ["fineweb_edu=0.8", "gutenberg=0.2"]
seq_len = 256
micro_batch = 2
accum_steps = 1
pretrain_steps = 2
sft_steps = 2
warmup_steps = 1
eval_every = 2
eval_batches = 1
log_every = 1
sample_tokens = 0
optimizer = "adamw"

[model]
n_layer = 1
n_embd = 32
n_head = 2
block_size = 256
"""


def test_quickstart_config_streams_the_recipe_from_the_hub_as_from_the_mirror(hub, mirror, tmp_path):
    """`pocketlm quickstart --config` with a small recipe of the five hub sources, without --data-dir,
    runs every stage; its tokenizer, cache and checkpoints equal those of the same recipe on the mirror."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    args = ["quickstart", "--config", str(recipe), "--device", "cpu", "--out"]
    via_hub, via_mirror = pocketlm(tmp_path, hub_env(tmp_path, hub.url), [*args, str(tmp_path / "q_hub")],
                                   [*args, str(tmp_path / "q_mirror"), "--data-dir", str(mirror)])
    for r in (via_hub, via_mirror):
        no_traceback(r)
        assert r.rc == 0, r.err
        assert "[6/6] a sample chat (greedy)" in r.out
    hub_dir, mirror_dir = tmp_path / "q_hub", tmp_path / "q_mirror"
    assert (hub_dir / "tokenizer" / "tokenizer.model").read_bytes() == \
        (mirror_dir / "tokenizer" / "tokenizer.model").read_bytes()
    assert shard_files(hub_dir / "cache") == shard_files(mirror_dir / "cache")
    for ckpt in ("pretrain/best", "sft/best"):
        weights = [d / "run" / ckpt / "model.safetensors" for d in (hub_dir, mirror_dir)]
        assert weights[0].read_bytes() == weights[1].read_bytes(), ckpt
    assert any(f"/datasets/{WIKITEXT}/resolve/" in p for _, p, _ in hub.log)


def test_the_reach_check_connects_to_the_proxy_users_set(monkeypatch):
    """Behind a proxy the hub itself may not be reachable directly: the check connects to the proxy
    httpx will use, unless NO_PROXY exempts the hub's host."""
    from pocketlm.data.hub import _probe_target, probe

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert _probe_target("https://huggingface.co")[:2] == ("huggingface.co", 443)
    assert _probe_target("http://127.0.0.1:8080")[:2] == ("127.0.0.1", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _probe_target("https://huggingface.co") == ("proxy.example", 3128, "the proxy proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert _probe_target("https://huggingface.co")[:2] == ("huggingface.co", 443)
    port = closed_port()
    assert probe(f"http://127.0.0.1:{port}").startswith(f"cannot connect to 127.0.0.1:{port}: ConnectionRefusedError")
