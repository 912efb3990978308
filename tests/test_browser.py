"""The studio in a real browser: Debian Chromium driven by Playwright (see ENVIRONMENT.md)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from studio.controls import LLM_STORAGE_KEY
from tests.studio_server import running_studio

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "assets" / "screenshot.png"

pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip("Debian Chromium is missing: apt-get install -y chromium", allow_module_level=True)

VIDEO_PLAYABLE = "() => { const v = document.querySelector('#result-video video'); return !!v && v.readyState >= 2; }"


def screenshot_preset():
    """The embedded model for README screenshots (UPDATE_SCREENSHOT=1) when it exists; else the tiny test preset."""
    if os.environ.get("UPDATE_SCREENSHOT") != "1":
        return None
    from pipelines.presets import ASSETS_DIR, DEFAULT_PRESET, get_preset

    return get_preset(DEFAULT_PRESET) if (ASSETS_DIR / DEFAULT_PRESET / "config.json").exists() else None


def test_generate_send_to_extend_and_open_loop_in_the_browser(tmp_path):
    with running_studio(tmp_path / "outputs", preset=screenshot_preset()) as server, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(server.url, timeout=120_000)
            prompt = page.locator("#prompt textarea")
            prompt.wait_for(timeout=120_000)
            prompt.fill("a red circle moving right on a black background")
            page.locator("#generate-t2v").click()
            page.wait_for_function(VIDEO_PLAYABLE, timeout=180_000)
            assert re.search(r"\d", page.locator("#memory-panel").inner_text())
            assert "Done" in page.locator("#job-status").inner_text()
            page.locator("#history .thumbnail-item").first.wait_for(timeout=60_000)  # the history gallery refreshed
            page.wait_for_timeout(1500)  # let the thumbnails paint for the screenshot
            shot = tmp_path / "studio.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
            page.locator("#make-gif").click()  # the result as a looping GIF beside it, offered for download
            page.wait_for_function("() => (document.querySelector('#gif-file') || {}).innerText?.includes('.gif')",
                                   timeout=60_000)
            assert list((tmp_path / "outputs").glob("*.gif"))
            page.locator("#send-to-extend").click()
            page.locator("#extend-video video").wait_for(timeout=60_000)
            assert page.get_by_role("tab", name="Extend").get_attribute("aria-selected") == "true"
            page.get_by_role("tab", name="Loop").click()
            for element in ("#loop-first", "#loop-last", "#generate-loop"):
                page.locator(element).wait_for(state="visible", timeout=30_000)
            # the estimate follows the tab (Extend at 33 frames said it needs at least 37)
            page.wait_for_function("() => (document.querySelector('#memory-estimate') || {}).innerText"
                                   "?.includes('(loop at these settings)')", timeout=30_000)
            assert "Estimated peak" in page.locator("#memory-estimate").inner_text()
            # The browser remembers the LLM model across visits (BrowserState), never the key.
            page.get_by_role("button", name=re.compile("^LLM settings")).click()
            stored = page.evaluate(f"() => localStorage.getItem('{LLM_STORAGE_KEY}')")
            page.locator("#llm-model textarea, #llm-model input").first.fill("llava-remembered")
            # the change event's round trip stores it (encrypted, so only the change of the entry is visible)
            page.wait_for_function(f"(before) => localStorage.getItem('{LLM_STORAGE_KEY}') !== before", arg=stored,
                                   timeout=30_000)
            page.reload()
            page.get_by_role("button", name=re.compile("^LLM settings")).click()
            model = page.locator("#llm-model textarea, #llm-model input").first
            page.wait_for_function("() => { const e = document.querySelector('#llm-model textarea, #llm-model input');"
                                   " return !!e && e.value === 'llava-remembered'; }", timeout=30_000)
            assert model.input_value() == "llava-remembered"
            # A named parameter set is saved in the browser and loaded back over changed settings.
            frames = page.get_by_label("Frames", exact=True)
            frames.fill("65")
            frames.press("Tab")
            page.locator("#set-name textarea, #set-name input").first.fill("long clips")
            page.locator("#save-settings").click()
            page.wait_for_function("() => (document.querySelector('#saved-settings input') || {}).value"
                                   " === 'long clips'", timeout=30_000)
            frames.fill("33")
            frames.press("Tab")
            page.locator("#load-saved-settings").click()
            page.wait_for_function("() => [...document.querySelectorAll('input[type=number]')]"
                                   ".some(e => e.value === '65')", timeout=30_000)
        finally:
            browser.close()


def test_closing_the_tab_stops_its_running_job_and_frees_the_device(tmp_path):
    from tests.studio_server import slow_sampling

    out = tmp_path / "outputs"
    # 100 steps at 0.5 s: the run takes almost a minute, far longer than the stop may take
    with running_studio(out) as server, slow_sampling(server.pool, 0.5), sync_api.sync_playwright() as playwright:
        engine = next(iter(server.pool))
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(server.url, timeout=120_000)
            page.locator("#prompt textarea").wait_for(timeout=120_000)
            page.locator("#prompt textarea").fill("a long job nobody waits for")
            steps = page.locator("#num-steps input[type=number]")
            steps.fill("100")
            steps.press("Tab")
            page.locator("#generate-t2v").click()
            page.wait_for_function("() => (document.querySelector('#job-status') || {}).innerText?.includes('step ')",
                                   timeout=120_000)
            assert server.pool.is_busy(engine)
            page.close()  # the visitor leaves mid-run
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline and server.pool.is_busy(engine):
                time.sleep(0.2)
            assert not server.pool.is_busy(engine), "the run went on for a closed tab"
            assert not list(out.glob("*.mp4"))  # stopped, not finished
        finally:
            browser.close()


def test_a_batch_runs_every_line_and_fills_its_table(tmp_path):
    out = tmp_path / "outputs"
    with running_studio(out) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(server.url, timeout=120_000)
            page.locator("#prompt textarea").wait_for(timeout=120_000)
            page.get_by_role("button", name=re.compile("^Batch")).click()
            checked = "() => document.querySelector('#batch-mode input:checked')?.closest('label')?.innerText"
            page.get_by_role("tab", name="Loop").click()  # the batch's tab choice follows the open tab
            page.wait_for_function(f"{checked}?.includes('Loop')", timeout=30_000)
            page.get_by_role("tab", name="Text to video").click()
            page.wait_for_function(f"{checked}?.includes('Text to video')", timeout=30_000)
            page.locator("#batch-prompts textarea").fill("a red circle moving up\n\na blue square sliding left")
            page.locator("#run-batch").click()
            page.wait_for_function("() => (document.querySelector('#job-status') || {}).innerText"
                                   "?.includes('Batch finished')", timeout=180_000)
            table = page.locator("#batch-table").inner_text()
            assert table.count("done") == 2 and "a blue square sliding left" in table
            page.wait_for_function(VIDEO_PLAYABLE, timeout=60_000)  # the last line's video plays
            assert len(list(out.glob("*.mp4"))) == 2
        finally:
            browser.close()
