"""The page's side-by-side race in a real headless Chromium: `ar` against a diffusion sampler on
one prompt, started together on one server; prints each panel's counters and saves a screenshot.

    python benchmarks/page_race.py [--model smollm2-nbdiff] [--sampler spec]
        [--prompt "..."] [--max-tokens 64] [--out docs/img/serve-race.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.serving import headless_chromium, running_server  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--sampler", default="spec")
    ap.add_argument("--prompt", default="How do I make a cup of tea?")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="docs/img/serve-race.png")
    a = ap.parse_args()
    with running_server("--model", a.model) as url, tempfile.TemporaryDirectory() as tmp:
        d = headless_chromium(Path(tmp), size="1400,900")
        try:
            d.get(url + "/")
            while not d.execute_script("return document.getElementById('sampler').options.length"):
                time.sleep(0.1)
            d.execute_script(
                "const s = (id, v) => { document.getElementById(id).value = v; };"
                "s('prompt', arguments[0]); s('mode', 'race'); s('sampler', arguments[1]);"
                "s('max_tokens', arguments[2]);",
                a.prompt,
                a.sampler,
                a.max_tokens,
            )
            d.find_element("id", "run").click()
            js = (
                "const r = window.blockdiffRuns;"
                "return r.length == 2 && r.every(x => x.text !== null || x.error)"
            )
            while not d.execute_script(js):
                time.sleep(0.2)
            for p in d.find_elements("css selector", ".panel"):
                name = p.find_element("css selector", ".name").text
                counters = p.find_element("css selector", ".counters").text.replace("\n", "  ")
                print(f"{name}: {counters}")
            d.save_screenshot(a.out)
            print(f"screenshot: {a.out}")
        finally:
            d.quit()
