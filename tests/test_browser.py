"""The inspector page in headless Chromium: type, watch tokens stream, hover one, stop, record, replay;
hostile and malformed replay files; defaults from the server; long chats; New chat; narrow windows."""

from __future__ import annotations

import copy
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pocketlm.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# CI installs Chromium and sets POCKETLM_REQUIRE_BROWSER=1, so a missing browser fails there.
_REQUIRED = os.environ.get("POCKETLM_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not _REQUIRED,
                       reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1200):
    """The page, loaded, with its defaults read from the server; `page.errors` collects uncaught errors,
    responses >= 400 and anything the Content-Security-Policy blocked."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": width, "height": 800})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("response", lambda r: page.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    # Anything the page's Content-Security-Policy blocks (inline style or script, another origin) is an error.
    page.on("console", lambda m: page.errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url)
    expect(page.locator("#send")).to_be_enabled(timeout=10_000)
    return page


def test_page_streams_tokens_hover_and_stop(slow_server):
    from playwright.sync_api import expect

    url, _ = slow_server
    before = httpx.get(f"{url}/api/info", timeout=10).json()["finished"].get("cancelled", 0)
    with chromium() as browser:
        page = open_page(browser, url)
        expect(page.locator("#model-info")).to_contain_text("2 layers", timeout=10_000)
        page.fill("#max-tokens", "120")
        page.fill("#seed", "1")
        page.fill("#prompt", "Tell me about rivers.")
        page.keyboard.press("Enter")
        expect(page.locator(".msg.user")).to_have_text("Tell me about rivers.")
        tokens = page.locator(".msg.assistant .reply .tok")
        expect(tokens.nth(5)).to_be_visible(timeout=20_000)
        assert page.locator("#stop").is_enabled()

        tokens.filter(has_text=re.compile(r"\w")).nth(1).hover()  # a newline token has no box to hover
        tip = page.locator("#tooltip")
        expect(tip).to_be_visible()
        expect(tip).to_contain_text("alternatives")
        expect(tip).to_contain_text("logit lens")
        assert tip.locator("table.alts tr").count() == 1 + 8  # header + 8 alternatives
        assert tip.locator("table.lens tr").count() == 1 + 2  # header + one row per layer
        page.screenshot(path=str(ARTIFACTS / "inspector.png"), full_page=True)

        page.click("#stop")
        expect(page.locator("#status")).to_have_text("finished: cancelled", timeout=10_000)
        assert page.locator("#send").is_enabled()
        n = tokens.count()
        assert 5 < n < 120

        with page.expect_download() as download:  # record: the stream as JSONL
            page.click("#save")
        saved = ARTIFACTS / "inspector-recording.jsonl"
        download.value.save_as(saved)
        events = [json.loads(line) for line in saved.read_text().splitlines()]
        assert events[0]["event"] == "prefill" and events[-1]["event"] == "done"
        assert events[-1]["data"]["finish_reason"] == "cancelled"
        assert sum(e["event"] == "token" for e in events) == n

        page.click("#reset")  # replay: the recording drawn again, without the server
        page.set_input_files("#replay", str(saved))
        expect(page.locator(".msg.assistant .reply .tok")).to_have_count(n)
        expect(page.locator("#status")).to_have_text("finished: cancelled")
        assert page.errors == []
    after = httpx.get(f"{url}/api/info", timeout=10).json()["finished"].get("cancelled", 0)
    assert after == before + 1


XSS = '<img src=x onerror="window.__pwned=1">'


def _recording(**overrides) -> list[dict]:
    """A small, schema-valid recording; `overrides` replace fields of the prefill, token or done data."""
    entry = {"id": 7, "token": "hi", "bytes": [104, 105], "logprob": -0.5, "prob": 0.6065}
    events = [
        {"event": "prefill", "data": {"v": 1, "request_id": "gen-x", "n_tokens": 2, "ms": 1.5, "cache_len": 2,
                                      "cache_bytes": 512, "context": 128, "dropped": 0,
                                      "tokens": [{"id": 3, "token": "<|usr|>", "bytes": []},
                                                 {"id": 5, "token": "yo", "bytes": [121, 111]}]}},
        {"event": "token", "data": {"v": 1, **entry, "index": 0, "text": "hi", "entropy": 1.2, "top": [entry],
                                    "cache_len": 2, "cache_bytes": 512, "ms": 1.0,
                                    "lens": [[{"id": 7, "token": "hi", "prob": 0.5}]], "attn_entropy": [[0.5, 1.0]]}},
        {"event": "done", "data": {"v": 1, "finish_reason": "length", "new_tokens": 1, "prefill_ms": 1.5,
                                   "decode_ms": 0.0, "decode_tok_s": 0.0, "text": "hi"}},
    ]
    for where, fields in overrides.items():
        next(e for e in events if e["event"] == where)["data"].update(fields)
    return events


def _write(tmp_path: Path, name: str, lines: list) -> Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_replay_file_cannot_run_script(server_url, tmp_path):
    """Markup inside a replay file's strings is shown as text; markup where numbers belong is refused."""
    from playwright.sync_api import expect

    hostile_text = _recording(prefill={"tokens": [{"id": 5, "token": XSS, "bytes": [1]}]},
                              token={"token": XSS, "text": XSS, "top": [{"id": 7, "token": XSS, "bytes": [60],
                                                                         "logprob": -1.0, "prob": 0.3}]})
    hostile_types = _recording(prefill={"n_tokens": XSS}, token={"bytes": [XSS], "id": XSS},
                               done={"finish_reason": XSS, "new_tokens": XSS})
    with chromium() as browser:
        page = open_page(browser, server_url)
        page.set_input_files("#replay", str(_write(tmp_path, "text.jsonl", hostile_text)))
        reply = page.locator(".msg.assistant .reply .tok")
        expect(reply).to_have_text([XSS])
        reply.first.click()  # pinned: the tooltip is built from the same strings
        expect(page.locator("#tooltip")).to_contain_text("<img␣src=x␣onerror=")  # spaces shown as ␣
        page.locator("details.prompt summary").click()
        expect(page.locator(".ptok")).to_have_text([XSS])
        page.keyboard.press("Escape")

        page.click("#reset")
        page.set_input_files("#replay", str(_write(tmp_path, "types.jsonl", hostile_types)))
        expect(page.locator(".msg.error")).to_contain_text("line 1: prefill.n_tokens: expected an integer")
        assert page.locator(".msg.assistant").count() == 0  # nothing of the file was shown
        assert page.locator("img").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.errors == []


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "line 1: not JSON"),
    ([{"event": "prefill"}], "line 1: prefill: expected an object"),
    ([{"event": "exploit", "data": {}}], 'line 1: "event" must be one of'),
    (_recording(token={"prob": 7}), "line 2: token.prob: expected a probability"),
    (_recording(token={"v": 2}), "line 2: schema v2"),
    (_recording(prefill={"request_id": "../../v1/models#x"}), "line 1: prefill.request_id: expected a request id"),
    (_recording(prefill={"request_id": XSS}), "line 1: prefill.request_id: expected a request id"),
    (_recording()[:2], "no done or error event"),
    ([], "the file is empty"),
])
def test_malformed_replay_shows_an_error(server_url, tmp_path, lines, message):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = open_page(browser, server_url)
        page.set_input_files("#replay", str(_write(tmp_path, "bad.jsonl", lines)))
        expect(page.locator(".msg.error")).to_contain_text(message)
        expect(page.locator("#status")).to_contain_text("replay refused")
        assert page.locator(".msg.assistant").count() == 0
        assert page.errors == []  # a visible error, not an uncaught exception


def test_defaults_follow_the_server_and_first_send_works(server_url):
    from playwright.sync_api import expect

    context = httpx.get(f"{server_url}/api/info", timeout=10).json()["context"]
    with chromium() as browser:
        page = open_page(browser, server_url)
        assert 1 <= int(page.input_value("#max-tokens")) <= context
        assert page.get_attribute("#max-tokens", "max") == str(context)
        page.fill("#prompt", "Name a colour.")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_have_text(re.compile("finished: (eot|length)"), timeout=30_000)
        assert page.locator(".msg.error").count() == 0 and page.errors == []


@pytest.fixture(scope="module")
def chatty_server(tiny_model, live_server, suppress_eot):
    """A server whose model never ends its turn: every reply runs to max_tokens, so chats grow fast."""
    model, tok = tiny_model
    chatty = copy.deepcopy(model)
    suppress_eot(chatty, tok.eot_id)
    with live_server(create_app(chatty, tok)) as url:
        yield url


def test_long_chat_drops_oldest_turns_and_never_keeps_a_failed_one(chatty_server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = open_page(browser, chatty_server)
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/api/inspect") else None)
        page.fill("#max-tokens", "40")
        for i in range(4):
            page.fill("#prompt", f"Tell me more, part {i}.")
            page.keyboard.press("Enter")
            expect(page.locator("#status")).to_have_text("finished: length", timeout=30_000)
        # 4 × (a question + 40 tokens) is more than the 128-token context: the oldest turns were left out.
        expect(page.locator(".note").first).to_contain_text("no longer fit the 128-token context")
        assert page.locator(".msg.dropped").count() >= 2
        assert len(sent[-1]["messages"]) < 2 * 3 + 1  # the page forgot what it dropped
        page.screenshot(path=str(ARTIFACTS / "inspector-long-chat.png"), full_page=True)

        page.fill("#prompt", "word " * 300)  # cannot fit even alone
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("error: messages:")
        failed = page.locator(".msg.assistant").last
        expect(failed).to_have_class(re.compile("error"))
        expect(failed).to_contain_text("context")  # the bubble says why; it is not empty
        expect(page.locator(".msg.user").last).to_have_class(re.compile("failed"))

        page.fill("#prompt", "And now?")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_have_text("finished: length", timeout=30_000)
        assert all("word word" not in m["content"] for m in sent[-1]["messages"])
        assert page.errors[:1] == [] or all(e.startswith("400 ") for e in page.errors)


def test_new_chat_stops_the_running_generation(metered_server):
    from playwright.sync_api import expect

    with metered_server() as (url, app, permits, _), chromium() as browser:
        page = open_page(browser, url)
        permits.release(4)  # the prefill and three more tokens; then the generation waits, still running
        page.fill("#prompt", "Tell me about rivers.")
        page.keyboard.press("Enter")
        expect(page.locator(".msg.assistant .reply .tok")).to_have_count(4, timeout=20_000)
        job = next(iter(app.state.engine.jobs.values()))
        page.click("#reset")
        assert job.cancel.wait(30)  # the page's New chat reached the server
        permits.release(10**6)
        for _ in range(200):  # until the server has ended the generation
            info = httpx.get(f"{url}/api/info", timeout=10).json()
            if info["active"] == 0:
                break
            page.wait_for_timeout(50)
        assert info["active"] == 0 and info["finished"] == {"cancelled": 1}
        # Nothing of the old reply landed in the new chat.
        assert page.locator("#log > *").count() == 0
        assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()
        expect(page.locator("#status")).to_have_text("")


def test_replay_during_a_live_generation_leaves_it_alone(metered_server, tmp_path):
    """Loading a replay while a reply streams: Stop still stops the live generation (by its own id),
    nothing is requested at a path built from the file, and the replay is drawn once the live one ends."""
    from playwright.sync_api import expect

    with metered_server() as (url, app, permits, _), chromium() as browser:
        page = open_page(browser, url)
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        permits.release(4)  # the prefill and three more tokens; then the generation waits, still running
        page.fill("#prompt", "Tell me about rivers.")
        page.keyboard.press("Enter")
        live = page.locator(".msg.assistant .reply").first.locator(".tok")
        expect(live).to_have_count(4, timeout=20_000)
        (job,) = app.state.engine.jobs.values()
        replay = _write(tmp_path, "other.jsonl", _recording(prefill={"request_id": "gen-FROMTHEFILE"}))
        page.set_input_files("#replay", str(replay))
        page.click("#stop")
        assert job.cancel.wait(30), "Stop did not reach the live generation"
        permits.release(10**6)
        # The live reply ends as cancelled; then the replay is drawn as its own turn.
        expect(page.locator(".msg.user").last).to_have_text("replay of other.jsonl", timeout=10_000)
        expect(page.locator(".msg.assistant .reply").last.locator(".tok")).to_have_text(["hi"])
        expect(page.locator("#status")).to_have_text("finished: length")
        assert page.locator(".msg.assistant").count() == 2 and live.count() >= 4
        assert not any("FROMTHEFILE" in u for u in requested), requested
        assert f"{url}/api/inspect/{job.id}/cancel" in requested
        assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()
        assert page.errors == []


def test_another_origin_cannot_frame_the_page(server_url):
    """A page from another origin (another port on loopback) with an iframe of the inspector: the
    browser refuses to show it (CSP frame-ancestors, X-Frame-Options)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    outer_html = f'<!doctype html><title>elsewhere</title><iframe src="{server_url}/"></iframe>'.encode()

    class Outer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(outer_html)))
            self.end_headers()
            self.wfile.write(outer_html)

        def log_message(self, *_):
            pass

    outer = ThreadingHTTPServer(("127.0.0.1", 0), Outer)
    threading.Thread(target=outer.serve_forever, daemon=True).start()
    try:
        with chromium() as browser:
            page = browser.new_page()
            with page.expect_console_message(lambda m: "frame-ancestors" in m.text, timeout=20_000):
                page.goto(f"http://127.0.0.1:{outer.server_address[1]}/")
            (frame,) = [f for f in page.frames if f is not page.main_frame]
            assert frame.url != f"{server_url}/"  # the frame shows the browser's error page, not ours
            assert frame.locator("#send").count() == 0 and frame.locator("#model-info").count() == 0
    finally:
        outer.shutdown()


def test_narrow_window_tooltip_pins_and_spares_the_composer(chatty_server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = open_page(browser, chatty_server, width=820)
        page.fill("#max-tokens", "60")
        page.fill("#prompt", "Describe a river.")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_have_text("finished: length", timeout=30_000)
        tokens = page.locator(".msg.assistant .reply .tok").filter(has_text=re.compile(r"\w"))  # newlines have no box
        composer, tip = page.locator("#composer"), page.locator("#tooltip")
        for i in (0, tokens.count() // 2, tokens.count() - 1):
            tokens.nth(i).scroll_into_view_if_needed()
            tokens.nth(i).hover()
            expect(tip).to_be_visible()
            a, b = tip.bounding_box(), composer.bounding_box()
            assert a["y"] + a["height"] <= b["y"] or a["y"] >= b["y"] + b["height"], (i, a, b)
        last = tokens.nth(tokens.count() - 1)
        last.click()  # pin
        expect(tip).to_contain_text("pinned")
        page.mouse.move(5, 5)
        expect(tip).to_be_visible()
        grid = tip.locator("table.attn")
        assert grid.locator("tr").count() == 1 + 2  # header + one row per layer
        assert re.fullmatch(r"\d+\.\d\d", grid.locator("td").first.inner_text())
        expect(tip.locator(".attn-legend")).to_contain_text("spread evenly")
        page.screenshot(path=str(ARTIFACTS / "inspector-820px-pinned.png"), full_page=True)
        page.keyboard.press("Escape")
        expect(tip).to_be_hidden()
        page.locator("details.prompt summary").click()
        expect(page.locator("details.prompt")).to_contain_text("prompt · ")
        assert page.locator(".ptok").count() > 3
        expect(page.locator("#stats")).to_contain_text("time to first token")
        expect(page.locator("#stats")).to_contain_text("mean entropy")
        assert page.errors == []
