"""The inspector page in headless Chromium: type, watch tokens stream, hover one, stop, record, replay."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# CI installs Chromium and sets POCKETLM_REQUIRE_BROWSER=1, so a missing browser fails there.
_REQUIRED = os.environ.get("POCKETLM_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not _REQUIRED,
                       reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def test_page_streams_tokens_hover_and_stop(slow_server):
    from playwright.sync_api import expect, sync_playwright

    url, _ = slow_server
    before = httpx.get(f"{url}/api/info", timeout=10).json()["finished"].get("cancelled", 0)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("2 layers", timeout=10_000)
        page.fill("#max-tokens", "120")
        page.fill("#seed", "1")
        page.fill("#prompt", "Tell me about rivers.")
        page.keyboard.press("Enter")
        expect(page.locator(".msg.user")).to_have_text("Tell me about rivers.")
        tokens = page.locator(".msg.assistant .tok")
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
        expect(page.locator(".msg.assistant .tok")).to_have_count(n)
        expect(page.locator("#status")).to_have_text("finished: cancelled")
        browser.close()
    after = httpx.get(f"{url}/api/info", timeout=10).json()["finished"].get("cancelled", 0)
    assert after == before + 1
