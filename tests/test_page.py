"""The page at `/`, driven by a real headless Chromium (Debian's chromium + chromedriver).

CI installs the browser and sets BLOCKDIFF_REQUIRE_BROWSER=1, so there a missing browser fails
instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from tests.serving import headless_chromium, request, running_server, stream

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
            d.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))", el, v
            )
        else:
            el.clear()
            el.send_keys(str(v))


def errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def api_text(url, sampler, key=None, **extra) -> str:
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 16, "seed": 0, "sampler": sampler, **extra}
    code, r = request(url, "/v1/completions", body, key)
    assert code == 200, r
    return r["choices"][0]["text"]


@pytest.fixture(scope="module")
def url():
    with running_server("--model", MODEL, "--sampler", "bd3") as u:
        yield u


def test_page_draws_the_denoising_and_races(tmp_path, url):
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

        # a constraint: the answer matches, equals the API's, and the overruled tokens are marked
        regex = "(ROMEO|JULIET)[.:]( [a-z]+){1,3}[.!]"
        fill(d, constraint="regex", constraint_text=regex, sampler="bd3", steps="", block_size="")
        d.find_element("id", "run").click()
        run = wait(d, "const r = window.blockdiffRuns[1]; return r && r.text !== null && r")
        assert run["text"] == api_text(url, "bd3", regex=regex)
        assert re.fullmatch(regex, run["text"]), run["text"]
        assert d.execute_script("return document.querySelectorAll('.canvas [data-steered]').length") > 0
        fill(d, constraint="none")
        d.execute_script("window.blockdiffRuns.splice(1)")

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


def test_page_on_a_keyed_server_narrow_window(tmp_path):
    """--api-key: the page asks for the key, works once it is typed, remembers it for the tab;
    agent controls only in agents mode; nothing overflows a 420 px window."""
    key = "page-key"
    with running_server("--model", MODEL, "--sampler", "bd3", "--api-key", key) as url:
        d = chromium(tmp_path)
        try:
            d.set_window_size(420, 900)
            d.get(url + "/")
            wait(d, "return document.getElementById('error').textContent.includes('needs an API key')")
            assert not d.find_element("id", "agent_controls").is_displayed()
            fill(d, key=key)
            d.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
            wait(d, "return document.getElementById('sampler').options.length > 0")
            assert d.execute_script("return document.getElementById('error').textContent") == ""
            fill(d, prompt="ROMEO:", max_tokens=16)
            d.find_element("id", "run").click()
            run = wait(d, "const r = window.blockdiffRuns[0]; return r && r.text !== null && r")
            assert run["error"] is None and run["text"] == api_text(url, "bd3", key=key)
            fill(d, mode="agent")
            assert d.find_element("id", "agent_controls").is_displayed()
            width = "return [document.documentElement.scrollWidth, window.innerWidth]"
            scroll, inner = d.execute_script(width)
            assert scroll <= inner, (scroll, inner)
            d.refresh()  # the key is remembered for the tab
            wait(d, "return document.getElementById('sampler').options.length > 0")
            assert errors(d) == [] or all("401" in e for e in errors(d))
        finally:
            d.quit()


def api_agent(url, body) -> dict:
    with stream(url, "/v1/agent/run", body) as (status, lines):
        assert status == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[-1]["type"] == "done", events[-1]
    return events[-1]["result"]


def timeless(d: dict) -> dict:
    return {**d, "seconds": None, "steps": [{**s, "seconds": None} for s in d["steps"]]}


def scripted_events(k: int) -> list[dict]:
    """The events of the scripted solver on held-out task k, from the server's own event code."""
    from blockdiff.agent import make_task, scripted_trajectory
    from blockdiff.serve.agents import AgentRequest, run_thread

    task = make_task("eval", k)
    turns = iter(m["content"] for m in scripted_trajectory(task) if m["role"] == "assistant")
    events = [{"type": "start", "agent": "diffusion", "task": task.id, "question": task.question.text}]
    events[0] |= {"sampler": "scripted", "options": {}}
    run_thread(task, lambda messages: next(turns), AgentRequest(agent="diffusion", task=k), events.append)
    return json.loads(json.dumps(events))


def agent_runs(d, url, constrain: bool = False, **fields) -> list[dict]:
    """Both agents run from the page in agents mode (`fields` filled, the call-schema switch on if
    `constrain`): each run's record once both ended."""
    d.get(url + "/")
    wait(d, "return document.getElementById('sampler').options.length > 0")
    fill(d, mode="agent", **fields)
    if constrain:
        d.find_element("id", "constrain").click()
    d.find_element("id", "run").click()
    return wait(
        d,
        "const r = window.blockdiffRuns; return r.length == 2"
        " && r.every(x => x.result !== null || x.error !== null) && r",
    )


def test_page_races_the_two_agents(tmp_path, url):
    d = chromium(tmp_path)
    try:
        fields = dict(sampler="bd3", block_size=2, task=3, max_rounds=3, call_tokens=4, max_errors=2)
        runs = agent_runs(d, url, **fields)
        assert [(r["agent"], r["sampler"], r["error"]) for r in runs] == [
            ("ar", "ar", None),
            ("diffusion", "bd3", None),
        ]
        body = {"model": MODEL, "sampler": "bd3", "block_size": 2, "task": 3, "max_rounds": 3}
        body |= {"max_new_tokens": 4, "max_errors": 2, "seed": 0}
        panels = d.find_elements("css selector", ".panel.agent")
        assert len(panels) == 2
        for run, panel in zip(runs, panels, strict=True):
            res = run["result"]
            assert timeless(res) == timeless(api_agent(url, {**body, "agent": run["agent"]}))
            assert res["rounds"] >= 2 and run["question"] == res["question"]

            def shown(css, panel=panel):
                return panel.find_element("css selector", css).text

            assert shown(".verdict") == ("solved" if res["success"] else f"failed: {res['failure']}")
            answer = shown(".answer")
            assert (json.loads(answer) if answer else None) == res["answer"]
            assert shown(".question") == f"eval:3: {res['question']}"
            assert [shown(c) for c in (".round", ".calls", ".tokens", ".nfe")] == [
                str(res[k]) for k in ("rounds", "tool_calls", "tokens", "nfe")
            ]
            assert len(panel.find_elements("css selector", ".steps li")) == res["rounds"]
            assert shown(".wall").endswith(" s") and float(shown(".wall")[:-2]) > 0
        # a solved run (the scripted solver's events, as the server streams them) draws every kind
        solved = d.execute_script(
            "const p = agentPanel('diffusion'); for (const ev of arguments[0]) showAgent(p, ev);"
            "return [...p.el.querySelectorAll('.steps li')].map(li => li.textContent);",
            scripted_events(3),
        )
        assert len(solved) == 6 and all("→ " in s for s in solved)
        assert solved[0].startswith("search {") and solved[-1].startswith("finish {")
        last = d.find_elements("css selector", ".panel.agent")[-1]
        assert last.find_element("css selector", ".verdict").text == "solved"
        assert last.find_element("css selector", ".calls").text == "6"
        shot = os.environ.get("BLOCKDIFF_AGENT_SCREENSHOT", str(tmp_path / "agents.png"))
        d.save_screenshot(shot)
        assert errors(d) == []
    finally:
        d.quit()


def test_page_constrains_the_agents_calls(tmp_path, url):
    """ "calls under the schema" sends the tools' call schema as both agents' json_schema (as
    `agent eval --constrain`): each run is the API's with that option, and no reply fails to parse."""
    from blockdiff.agent.trajectory import call_schema

    d = chromium(tmp_path)
    try:
        fields = dict(sampler="bd3", block_size=2, task=3, max_rounds=2, call_tokens=64, max_errors=0)
        runs = agent_runs(d, url, constrain=True, **fields)
        assert [(r["agent"], r["error"]) for r in runs] == [("ar", None), ("diffusion", None)]
        body = {"model": MODEL, "sampler": "bd3", "block_size": 2, "task": 3, "max_rounds": 2}
        body |= {"max_new_tokens": 64, "max_errors": 0, "seed": 0, "json_schema": json.dumps(call_schema())}
        for run in runs:
            res = run["result"]
            assert res["failure"] != "unparsable_call", res
            assert timeless(res) == timeless(api_agent(url, {**body, "agent": run["agent"]}))
        assert errors(d) == []
    finally:
        d.quit()


def test_page_races_against_a_served_ar_model(tmp_path):
    """With `serve --ar-model`, the race's ar panel and the AR agent run on that model (its
    scheduler counts the forwards) and the header names it."""
    from blockdiff.models import bundled_path

    with running_server("--model", MODEL, "--ar-model", str(bundled_path(MODEL)), "--sampler", "bd3") as u:
        d = chromium(tmp_path)
        try:
            d.get(u + "/")
            wait(d, "return document.getElementById('sampler').options.length > 0")
            assert d.execute_script("return document.getElementById('model').textContent") == (
                f"{MODEL} · AR side: demo"
            )
            fill(d, mode="race", prompt="ROMEO:", max_tokens=16)
            d.find_element("id", "run").click()
            runs = wait(
                d,
                "const r = window.blockdiffRuns; return r.length == 2 && r.every(x => x.text !== null) && r",
            )
            assert [(r["sampler"], r["error"]) for r in runs] == [("ar", None), ("bd3", None)]
            h = request(u, "/health")[1]
            assert h["ar_model"]["forwards"] >= 16 and h["forwards"] > 0  # each side on its own model
            fill(d, mode="agent", task=3, max_rounds=2, call_tokens=4, max_errors=2)
            d.find_element("id", "run").click()
            wait(
                d,
                "const r = window.blockdiffRuns;"
                " return r.length == 4 && r.slice(2).every(x => x.result !== null)",
            )
            assert request(u, "/health")[1]["ar_model"]["forwards"] > h["ar_model"]["forwards"]
            assert errors(d) == []
        finally:
            d.quit()
