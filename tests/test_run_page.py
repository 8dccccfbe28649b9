"""The run page: a tiny CPU run watched while it trains (Chromium), the routes behind it, comparing two
checkpoints against a direct computation, opening a snapshot in the inspector, and who may read a run."""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from pocketlm.model.io import load_model
from pocketlm.serve.app import STATIC, create_app
from pocketlm.train import metrics
from pocketlm.train.config import TrainConfig
from pocketlm.train.run import train

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
_REQUIRED = os.environ.get("POCKETLM_REQUIRE_BROWSER") == "1"
TEXT = "The meaning of life is to find your gift."


@pytest.fixture(scope="module")
def cache(small_cache, data_dir) -> Path:
    return small_cache([("fineweb_edu:take=200", "pretrain"), ("wikitext", "eval")], data_dir)


def tiny(cache: Path, runs: Path) -> TrainConfig:
    """30 steps, an evaluation (and a snapshot) every 10."""
    return TrainConfig(name="watched", runs_dir=str(runs), cache=str(cache), model="tiny",
                       pretrain_mix=("fineweb_edu=1",), seq_len=64, micro_batch=4, accum_steps=1, pretrain_steps=30,
                       lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2, log_every=5, sample_tokens=6,
                       snapshot_every=1, device="cpu")


@contextmanager
def gated_training(cfg: TrainConfig) -> Iterator[tuple[queue.Queue, threading.Semaphore]]:
    """Train `cfg` in a thread that stops after writing each snapshot line until the test releases
    `go`; `reached` gets the step of each snapshot as it is written. The test decides when the run
    moves on: no timing."""
    reached: queue.Queue = queue.Queue()
    go = threading.Semaphore(0)
    append, errors = metrics.append, []

    def gated(path, record):
        append(path, record)
        if record["kind"] == "snapshot":
            reached.put(record["step"])
            assert go.acquire(timeout=300), "the test never let training go on"

    def work():
        try:
            train(cfg, pipeline="pretrain")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            reached.put(None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "append", gated)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield reached, go
        finally:
            go.release(100)
            thread.join(300)
    assert not errors, errors


def run_app(run_dir: Path, ckpt: Path):
    model, tok, _ = load_model(ckpt, "cpu")
    app = create_app(model, tok, model_id="watched")
    app.state.run_dir = run_dir
    return app


@pytest.fixture(scope="module")
def finished_run(cache, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    train(tiny(cache, runs), pipeline="pretrain")
    return runs / "watched"


@pytest.fixture(scope="module")
def run_url(finished_run, live_server) -> Iterator[str]:
    with live_server(run_app(finished_run, finished_run / "pretrain" / "last")) as url:
        yield url


# --- the routes -----------------------------------------------------------------------------------------

def test_checkpoints_are_listed_by_id_without_paths(run_url):
    data = httpx.get(f"{run_url}/api/run/checkpoints", timeout=10).json()
    ids = [c["id"] for c in data["checkpoints"]]
    assert ids == ["pretrain/step-000010", "pretrain/step-000020", "pretrain/step-000030", "pretrain/best",
                   "pretrain/last"]
    assert all(set(c) == {"id", "phase", "kind", "step", "val_loss"} for c in data["checkpoints"])
    info = httpx.get(f"{run_url}/api/run", timeout=10).json()
    assert info["name"] == "watched" and info["config"]["plan"][0].startswith("plan pretrain: 30 steps")
    assert "tokenizer" not in info["config"]


def test_stream_sends_config_then_every_metrics_line(run_url, finished_run, sse):
    with httpx.stream("GET", f"{run_url}/api/run/stream", timeout=30) as r:
        assert r.status_code == 200 and r.headers["cross-origin-resource-policy"] == "same-origin"
        events = list(sse(r, limit=2))
    assert [e for e, _ in events] == ["config", "metrics"]
    assert events[0][1]["train"]["pretrain_steps"] == 30
    assert events[1][1] == metrics.read(finished_run / "metrics.jsonl")


def test_comparison_equals_a_direct_computation(run_url, finished_run):
    r = httpx.post(f"{run_url}/api/run/compare", json={"a": "pretrain/step-000010", "b": "pretrain/last",
                                                       "text": TEXT}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    a, tok, _ = load_model(finished_run / "pretrain" / "snapshots" / "step-000010")
    b, _, _ = load_model(finished_run / "pretrain" / "last")
    ids = tok.encode(TEXT)
    x = torch.tensor([[tok.eot_id, *ids]])
    with torch.no_grad():
        lp_a = torch.log_softmax(a(x)[0][0].double(), -1)
        lp_b = torch.log_softmax(b(x)[0][0].double(), -1)
    assert [t["id"] for t in got["tokens"]] == ids
    for i, t in enumerate(got["tokens"]):
        want_a, want_b = lp_a[i, ids[i]].item(), lp_b[i, ids[i]].item()
        assert t["logprob_a"] == pytest.approx(want_a, abs=1e-5) and t["logprob_b"] == pytest.approx(want_b, abs=1e-5)
        assert t["prob_a"] == pytest.approx(math.exp(want_a), rel=1e-4)
        assert t["delta_bits"] == pytest.approx((want_b - want_a) / math.log(2), abs=2e-5)
    assert got["bits_b"] == pytest.approx(-lp_b[range(len(ids)), ids].sum().item() / math.log(2), rel=1e-5)
    assert got["bits_b"] < got["bits_a"]  # 20 more steps: the text got likelier on the whole


@pytest.mark.parametrize("body, status, param", [
    ({"a": "pretrain/step-000099", "b": "pretrain/last", "text": "x"}, 404, "a"),
    ({"a": "pretrain/last", "b": "../../../etc/passwd", "text": "x"}, 404, "b"),
    ({"a": "pretrain/last", "b": "/tmp", "text": "x"}, 404, "b"),
    ({"a": "pretrain/last", "b": "pretrain/best", "text": "word " * 200}, 400, "text"),
    ({"a": "pretrain/last", "b": "pretrain/best", "text": ""}, 400, "text"),
    ({"a": "pretrain/last", "b": "pretrain/best", "text": "x", "path": "/etc"}, 400, "path"),
])
def test_bad_comparisons_name_the_field(run_url, body, status, param):
    r = httpx.post(f"{run_url}/api/run/compare", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_foreign_host_or_origin_cannot_read_the_run(run_url):
    port = run_url.rsplit(":", 1)[1]
    for path in ("/run", "/api/run", "/api/run/checkpoints", "/api/run/stream"):
        r = httpx.get(run_url + path, headers={"host": f"evil.example:{port}"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "host", path
        # A page of another site (a fetch or EventSource carries its Origin) is refused, reads included.
        r = httpx.get(run_url + path, headers={"origin": "https://evil.example"}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["param"] == "origin", path
        assert "watched" not in r.text
    for path, body in (("/api/run/compare", {"a": "pretrain/last", "b": "pretrain/best", "text": "x"}),
                       ("/api/run/open", {"id": "pretrain/best"})):
        for origin in ("https://evil.example", "null"):
            r = httpx.post(run_url + path, json=body, headers={"origin": origin}, timeout=10)
            assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
    own = httpx.get(f"{run_url}/api/run", headers={"origin": run_url}, timeout=10)
    assert own.status_code == 200 and own.headers["cross-origin-resource-policy"] == "same-origin"
    page = httpx.get(f"{run_url}/run", timeout=10)
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_a_server_without_a_run_says_so(server_url):
    r = httpx.get(f"{server_url}/api/run/checkpoints", timeout=10)
    assert r.status_code == 404 and "--run" in r.json()["error"]["message"]


def test_open_loads_a_snapshot_into_the_inspector(finished_run, live_server):
    app = run_app(finished_run, finished_run / "pretrain" / "last")
    with live_server(app) as url:
        r = httpx.post(f"{url}/api/run/open", json={"id": "pretrain/step-000020"}, timeout=30)
        assert r.status_code == 200 and r.json()["loaded"] == "pretrain/step-000020"
        assert httpx.get(f"{url}/api/info", timeout=10).json()["model"] == "watched-pretrain-step-000020"
        snap, _, _ = load_model(finished_run / "pretrain" / "snapshots" / "step-000020")
        for (name, p), q in zip(app.state.model.state_dict().items(), snap.state_dict().values()):
            assert torch.equal(p, q), name
        # The inspector now answers with the snapshot's weights: its logprobs are the snapshot's.
        with httpx.stream("POST", f"{url}/api/inspect", json={"prompt": "The", "max_tokens": 1,
                                                              "temperature": 0}, timeout=30) as s:
            token = next(line for line in s.iter_lines() if line.startswith("data:") and '"index"' in line)
        tok = app.state.tok
        with torch.no_grad():
            want = torch.log_softmax(snap(torch.tensor([tok.encode("The")]))[0][0, -1].float(), -1).max().item()
        assert float(re.search(r'"logprob": ([-0-9.e]+)', token).group(1)) == pytest.approx(want, abs=1e-4)
        assert httpx.get(f"{url}/api/run/checkpoints", timeout=10).json()["inspector"] == "pretrain/step-000020"


# --- the page -------------------------------------------------------------------------------------------

def test_page_builds_no_html_from_strings_and_has_no_inline_code():
    js = (STATIC / "run.js").read_text()
    for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                "setAttribute(\"style", "setAttribute(\"on"):
        assert bad not in js, bad
    assert not re.search(r"set(Timeout|Interval)\(\s*[\"'`]", js)  # a string handler is eval
    html = (STATIC / "run.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/run.js">']  # no inline script
    assert not re.search(r"\sstyle\s*=|\son\w+\s*=|<style\b|javascript:", html, re.I)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists() and not _REQUIRED, reason="needs Chromium at /usr/bin/chromium")
def test_page_follows_a_run_while_it_trains(cache, tmp_path, live_server):
    from playwright.sync_api import expect, sync_playwright

    run_dir = tmp_path / "watched"
    with gated_training(tiny(cache, tmp_path)) as (reached, go):
        assert reached.get(timeout=300) == 10  # paused after the first evaluation's snapshot
        app = run_app(run_dir, run_dir / "pretrain" / "last")
        with live_server(app) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(f"{url}/run")
            now = page.locator("#now")
            expect(now).to_contain_text("10 of 30", timeout=20_000)
            expect(page.locator("#plan li").first).to_contain_text("plan pretrain: 30 steps")
            samples = page.locator("#timeline .sample")
            expect(samples).to_have_count(3)  # three prompts, one evaluation
            expect(page.locator("#ckpts")).to_contain_text("pretrain/step-000010")
            expect(page.locator("#live")).to_have_text("live")
            page.evaluate("window.__same_page = true")  # gone if anything reloads the page
            lines = int(page.locator("#live").get_attribute("data-lines"))

            go.release()  # on to the next evaluation
            assert reached.get(timeout=300) == 20
            expect(now).to_contain_text("20 of 30", timeout=20_000)
            expect(samples).to_have_count(6)
            expect(page.locator("#timeline .prompt-block").first.locator(".step")).to_have_text(["step 10", "step 20"])
            expect(page.locator("#ckpts")).to_contain_text("pretrain/step-000020")
            assert int(page.locator("#live").get_attribute("data-lines")) > lines
            assert page.locator("#chart-loss").get_attribute("data-last-step") == "20"
            assert page.evaluate("window.__same_page") is True
            expect(now).to_contain_text("early stopping")
            expect(now).to_contain_text("tokens/s")

            # Compare the two snapshots: the table is sorted by how much each token changed.
            page.select_option("#cmp-a", "pretrain/step-000010")
            page.select_option("#cmp-b", "pretrain/step-000020")
            page.click("#cmp-go")
            rows = page.locator("#cmp-table tr.cmp-row")
            expect(rows.first).to_be_visible(timeout=20_000)
            deltas = [abs(float(t)) for t in page.locator("#cmp-table td.delta").all_inner_texts()]
            assert len(deltas) == rows.count() > 3 and deltas == sorted(deltas, reverse=True)

            # Open the first snapshot in the inspector and chat with it there.
            page.locator("#ckpts tr", has_text="pretrain/step-000010").get_by_role("button").click()
            expect(page.locator("#open-status")).to_contain_text("is now the inspector's model")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "run_page.png"), full_page=True)
            page.locator("#open-status a").click()
            expect(page.locator("#model-info")).to_contain_text("watched-pretrain-step-000010", timeout=10_000)

            page.go_back()
            go.release()
            assert reached.get(timeout=300) == 30
            go.release()
            expect(page.locator("#now")).to_contain_text("finished", timeout=20_000)
            assert problems == []
            browser.close()


def test_serve_run_needs_a_run_folder_and_defaults_to_its_newest_checkpoint(finished_run, tmp_path, capsys):
    from pocketlm.cli import main
    from pocketlm.serve.run_page import default_checkpoint

    assert default_checkpoint(finished_run) == finished_run / "pretrain" / "last"
    assert main(["serve", "--run", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pocketlm: error: --run ") and "config.json" in err and err.count("\n") == 1
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text('{"train": {"eval_every": 250}}')
    assert main(["serve", "--run", str(tmp_path / "fresh")]) == 1
    assert "no checkpoint yet (training saves the first at step 250, its first evaluation)" in capsys.readouterr().err
    assert main(["serve"]) == 1
    assert "--ckpt" in capsys.readouterr().err


def test_stream_follows_appends_partial_lines_and_a_rewrite(finished_run, tmp_path, live_server, sse):
    import json

    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (run_dir / name).write_bytes((finished_run / name).read_bytes())
    path = run_dir / "metrics.jsonl"
    records = metrics.read(path)
    with live_server(run_app(run_dir, finished_run / "pretrain" / "last")) as url:
        with httpx.stream("GET", f"{url}/api/run/stream", timeout=60) as r:
            events = sse(r)
            assert next(events)[0] == "config"
            assert next(events) == ("metrics", records)
            extra = {"kind": "train", "step": 31, "phase": "pretrain", "loss": 1.5}
            line = json.dumps(extra) + "\n"
            with open(path, "a") as f:
                f.write(line)
            assert next(events) == ("metrics", [extra])
            metrics.truncate_after(path, "pretrain", 10)  # what a resumed run does: a new file, shorter
            assert next(events) == ("reset", {})
            assert next(events) == ("metrics", [r for r in records if r["step"] <= 10])


def test_tail_sends_only_whole_lines(tmp_path):
    from pocketlm.serve.run_page import _tail

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2')  # the second line is still being written
    pos = {"offset": 0, "ident": None}
    assert _tail(tmp_path, pos) == (['{"step": 1}'], False)
    assert _tail(tmp_path, pos) == ([], False)
    with open(path, "a") as f:
        f.write(', "loss": 3.5}\n')
    assert _tail(tmp_path, pos) == (['{"step": 2, "loss": 3.5}'], False)
    path.write_text('{"step": 1}\n')  # rewritten shorter (a resumed run)
    assert _tail(tmp_path, pos) == (['{"step": 1}'], True)
