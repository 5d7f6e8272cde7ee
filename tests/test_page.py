"""The page at `/`, driven by a real headless Chromium (Debian's chromium + chromedriver).

CI installs the browser and sets BLOCKDIFF_REQUIRE_BROWSER=1, so there a missing browser fails
instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.serving import headless_chromium, request, running_server

MODEL = "shakespeare-5m"


def chromium(tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("BLOCKDIFF_REQUIRE_BROWSER"):
            pytest.fail(
                "chromium and chromedriver are required here (apt-get install chromium chromium-driver)"
            )
        pytest.skip("no chromium/chromedriver on this machine")
    return headless_chromium(tmp_path / "profile")


def wait(d, js: str, timeout: float = 60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = d.execute_script(js)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {js}")


def fill(d, **fields):
    for k, v in fields.items():
        el = d.find_element("id", k)
        if el.tag_name == "select":
            d.execute_script("arguments[0].value = arguments[1]", el, v)
        else:
            el.clear()
            el.send_keys(str(v))


def errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def api_text(url, sampler, **extra) -> str:
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 16, "seed": 0, "sampler": sampler, **extra}
    code, r = request(url, "/v1/completions", body)
    assert code == 200, r
    return r["choices"][0]["text"]


def test_page_draws_the_denoising_and_races(tmp_path):
    with running_server("--model", MODEL, "--sampler", "bd3") as url:
        d = chromium(tmp_path)
        try:
            d.get(url + "/")
            wait(d, "return document.getElementById('sampler').options.length > 0")
            assert d.execute_script("return document.getElementById('model').textContent") == MODEL
            assert not d.find_element("id", "chat").is_selected()  # the toy model has no template

            fill(d, prompt="ROMEO:", sampler="llada", max_tokens=16, steps=8, block_size=16)
            d.find_element("id", "run").click()
            run = wait(d, "const r = window.blockdiffRuns[0]; return r && r.text !== null && r")
            assert run["error"] is None
            assert run["text"] == api_text(url, "llada", steps=8, block_size=16)
            shown = d.find_element("css selector", ".panel .text").text
            assert shown == run["text"].strip()
            mask = "\u2591"
            snaps = run["snapshots"]
            assert len(snaps) == 8  # one canvas state per forward
            assert any(mask in s and s.replace("|", "").replace(mask, "") for s in snaps)  # partly denoised
            assert mask not in snaps[-1]
            assert d.find_element("css selector", ".panel .nfe").text == "8"

            fill(d, mode="race", sampler="bd3", steps="", block_size="")
            d.find_element("id", "run").click()
            runs = wait(
                d,
                "const r = window.blockdiffRuns; return r.length == 3 && r[1].text !== null"
                " && r[2].text !== null && r.slice(1)",
            )
            assert [r["sampler"] for r in runs] == ["ar", "bd3"]
            assert [r["text"] for r in runs] == [api_text(url, "ar"), api_text(url, "bd3")]
            assert len(d.find_elements("css selector", ".panel")) == 2
            walls = [e.text for e in d.find_elements("css selector", ".panel .wall")]
            assert all(w.endswith(" s") and float(w[:-2]) > 0 for w in walls)
            shot = os.environ.get("BLOCKDIFF_SCREENSHOT", str(tmp_path / "race.png"))
            d.save_screenshot(shot)
            assert os.path.getsize(shot) > 10_000
            assert errors(d) == []
        finally:
            d.quit()
