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
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from hub.layouts import DOLLY, FINEWEB, GUTENBERG, OASST1, WIKITEXT, build_mirror, build_repos
from hub.server import Faults, LoopbackHub

REPO = Path(__file__).resolve().parents[1]
RUN_CLI = Path(__file__).resolve().parent / "hub" / "run_cli.py"
# One spec per hub source; oasst1's slice holds validation rows only (tests/hub/layouts.py).
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
    return next(line for line in err.splitlines() if line.startswith(f"{spec}: "))


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


def test_tokenizer_and_cache_from_the_hub_equal_the_mirror_byte_for_byte(hub, mirror, tmp_path):
    sources = ["fineweb_edu", "gutenberg", "dolly", "oasst1:split=validation"]
    tok_hub, tok_mirror = tmp_path / "tok_hub", tmp_path / "tok_mirror"
    results = pocketlm(
        tmp_path, hub_env(tmp_path, hub.url),
        ["tokenizer", "train", "--sources", *sources, "--vocab-size", "800", "--out", str(tok_hub)],
        ["tokenizer", "train", "--sources", *sources, "--vocab-size", "800", "--out", str(tok_mirror),
         "--data-dir", str(mirror)],
        ["cache", "build", "--tokenizer", str(tok_hub / "tokenizer.model"), "--out", str(tmp_path / "c_hub"),
         *CACHE_ARGS],
        ["cache", "build", "--tokenizer", str(tok_hub / "tokenizer.model"), "--out", str(tmp_path / "c_mirror"),
         "--data-dir", str(mirror), *CACHE_ARGS])
    for r in results:
        no_traceback(r)
        assert r.rc == 0, r.err
    assert (tok_hub / "tokenizer.model").read_bytes() == (tok_mirror / "tokenizer.model").read_bytes()
    hub_files, mirror_files = shard_files(tmp_path / "c_hub"), shard_files(tmp_path / "c_mirror")
    assert sorted(hub_files) == sorted(mirror_files)
    assert [k for k in hub_files if hub_files[k] != mirror_files[k]] == []
    meta_hub, meta_mirror = (json.loads((tmp_path / c / "meta.json").read_text()) for c in ("c_hub", "c_mirror"))
    assert meta_hub["sources"] == meta_mirror["sources"]
    assert all(meta_hub["sources"][s]["counts"]["train"]["docs"] > 0 for s in ("fineweb_edu", "dolly"))
