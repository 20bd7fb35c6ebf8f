"""The page of ``maskdiff serve`` in a real browser: headless Chromium (Debian's ``chromium``
package) driven by Playwright loads it from a real server process, types an infilling template,
presses Generate and watches the gaps fill while the fixed text stays.

Skipped, with the reason printed, where Playwright or the browser is missing (``.ci/run``
installs Debian's ``chromium``; Playwright's own browser downloads are never used).
``MASKDIFF_CHROMIUM`` names another Chromium executable; ``MASKDIFF_SERVE_RUN`` serves another run
folder (read-only) and ``MASKDIFF_SCREENSHOT`` copies the half-way screenshot there
(``docs/serve-page.png`` is made this way from the demo run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_serve import GOLDEN, check_template, folder_hashes, start_server, stop_server

CHROMIUM = os.environ.get("MASKDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no Chromium executable: apt-get install chromium (or set MASKDIFF_CHROMIUM)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

TEMPLATE = "the ___ of the ___ was"
GAP = 6

#: records, from the page itself, the largest number of masked positions seen and whether a state
#: with some but not all of them revealed was shown (the sequence drawn as it unmasks).
WATCH = """() => {
  window.__seen = {maxMasked: 0, partial: false};
  new MutationObserver(() => {
    const masked = document.querySelectorAll('#output .tok.masked').length;
    const total = document.querySelectorAll('#output .tok').length;
    const fixed = document.querySelectorAll('#output .tok.fixed').length;
    window.__seen.maxMasked = Math.max(window.__seen.maxMasked, masked);
    if (masked > 0 && masked < total - fixed) window.__seen.partial = true;
  }).observe(document.getElementById('output'), {subtree: true, childList: true, attributes: true,
                                                 characterData: true});
}"""


def test_page_fills_the_gaps_live(tmp_path):
    from playwright.sync_api import sync_playwright

    source = Path(os.environ.get("MASKDIFF_SERVE_RUN", GOLDEN))
    run_dir = source if "MASKDIFF_SERVE_RUN" in os.environ else tmp_path / "golden"
    if run_dir != source:
        shutil.copytree(source, run_dir)
    before = folder_hashes(run_dir)
    proc, url = start_server(run_dir)
    shot, mid = tmp_path / "serve-page.png", tmp_path / "serve-page-unmasking.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
            assert "ancestral" in page.locator("#sampler").inner_text()
            page.locator("#text").fill("")
            page.locator("#text").press_sequentially(TEMPLATE)
            page.locator("#gap_length").fill(str(GAP))
            page.locator("#num_samples").fill("3")
            page.locator("#steps").fill("128")
            page.locator("#seed").fill("4")
            page.evaluate(WATCH)
            page.get_by_role("button", name="Generate").click()
            # half-way: fixed, masked, just revealed and revealed tokens on the page at once
            page.wait_for_function("(() => { const m = document.querySelectorAll('#output .tok.masked').length;"
                                   " return m > 0 && m <= 3 * GAP; })()".replace("GAP", str(GAP)), timeout=30_000)
            page.screenshot(path=str(mid), full_page=True)
            page.wait_for_function("document.getElementById('output').dataset.done === 'true' && "
                                   "document.querySelectorAll('#output .tok.masked').length === 0", timeout=30_000)
            assert page.locator("#error").inner_text() == ""
            texts = page.locator("#output .sample").all_inner_texts()
            assert len(texts) == 3
            for text in texts:
                check_template(text, TEMPLATE, GAP)  # fixed text unchanged, every gap filled
            fixed = page.locator("#output .sample").first.locator(".tok.fixed").all_inner_texts()
            assert "".join(fixed) == TEMPLATE.replace("___", "")
            seen = page.evaluate("window.__seen")
            assert seen["maxMasked"] == 3 * 2 * GAP and seen["partial"], seen  # drawn while it unmasked (3 samples, 2 gaps)
            assert "done" in page.locator("#status").inner_text()
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        stop_server(proc)
    assert shot.stat().st_size > 10_000 and mid.stat().st_size > 10_000
    if os.environ.get("MASKDIFF_SCREENSHOT"):
        shutil.copyfile(mid, os.environ["MASKDIFF_SCREENSHOT"])
    assert folder_hashes(run_dir) == before
