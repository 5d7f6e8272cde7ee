"""`blockdiff serve` through real HTTP: the `openai` client, raw requests for bad input, concurrency.

The bundled 5.4M model keeps these fast; the chat tests use the shipped SmolLM2 delta.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockdiff.decoding import DecodeSpec, generate
from blockdiff.models import load_model
from tests.serving import request, running_server, stream

openai = pytest.importorskip("openai")

KEY = "test-key"
MODEL = "shakespeare-5m"
# a decode of a few seconds on the toy model: one token per forward over the whole canvas
SLOW = {
    "model": MODEL,
    "prompt": "ROMEO:",
    "max_tokens": 240,
    "sampler": "llada",
    "steps": 240,
    "block_size": 240,
}
# a schema no answer of a few tokens can meet (a string of at least 9 characters)
LONG = {"type": "object", "properties": {"a": {"type": "string", "minLength": 9}}, "required": ["a"]}
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING", "To be, or not", "HAMLET:"]


@pytest.fixture(scope="module")
def url():
    """The server the hostile requests go to, under a 4 GiB address-space limit (it peaks at ~1 GB):
    a request that allocated before checking its length would fail there, not take the machine."""
    args = ("--model", MODEL, "--sampler", "bd3", "--api-key", KEY, "--max-batch", "8")
    with running_server(*args, limit_as=4 * 2**30) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url, body, path="/v1/completions", key=KEY):
    return request(url, path, body, key)


def health(url) -> dict:
    return request(url, "/health")[1]


def forwards(url) -> int:
    return health(url)["forwards"]


def both(client, **kw):
    """The same completion request answered whole and streamed: (response, chunks)."""
    whole = client.completions.create(model=MODEL, **kw)
    return whole, list(client.completions.create(model=MODEL, stream=True, **kw))


def test_models_and_completions_match_generate(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    model, tok = load_model(MODEL)
    for sampler, extra in [("bd3", {}), ("llada", {"steps": 12, "block_size": 8}), ("ar", {})]:
        r, chunks = both(
            client, prompt="ROMEO:", max_tokens=24, seed=5, extra_body={"sampler": sampler, **extra}
        )
        want = generate(model, tok, ["ROMEO:"], sampler, 24, seed=5, **extra)
        assert r.choices[0].text == want.texts[0], sampler
        assert r.usage.completion_tokens == len(want.tokens[0])  # the returned text's, no EOS
        assert r.usage.model_extra["nfe"] == want.rows[0].nfe
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.texts[0]
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1 or sampler == "llada"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_n_choices_and_sampling_seeds(client):
    model, tok = load_model(MODEL)
    r = client.completions.create(model=MODEL, prompt="KING", max_tokens=16, n=3, seed=9, temperature=0.9)
    want = generate(model, tok, ["KING"] * 3, "bd3", 16, seed=9, temperature=0.9)
    assert [c.text for c in r.choices] == want.texts
    assert len(set(want.texts)) > 1  # sampled rows differ: the seeds are per row


def test_list_valued_options_batch_and_decode(client):
    model, tok = load_model(MODEL)
    stages = [[8, 0.25]]
    r, chunks = both(
        client, prompt="KING", max_tokens=16, seed=4, extra_body={"sampler": "structural", "stages": stages}
    )
    want = generate(model, tok, ["KING"], "structural", 16, seed=4, stages=stages).texts[0]
    assert r.choices[0].text == want
    # revision stages may remask committed tokens: the stream sends text only once it is final
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_stop_strings(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=48, seed=1, stop=["\n"])
    full = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=48, seed=1)
    assert "\n" in full.choices[0].text
    assert r.choices[0].text == full.choices[0].text.split("\n")[0]
    assert r.choices[0].finish_reason == "stop"
    # usage counts the tokens of the text returned, not the ones decoded past the stop string
    model, tok = load_model(MODEL)
    ids = generate(model, tok, ["ROMEO:"], "bd3", 48, seed=1).tokens[0]
    k = r.usage.completion_tokens
    assert k < full.usage.completion_tokens
    assert len(tok.decode(ids[:k])) >= len(r.choices[0].text) > len(tok.decode(ids[: k - 1]))
    s = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=48, seed=1, stop=["\n"], stream=True
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_concurrent_requests_equal_alone_and_are_batched(url, client):
    def ask(i):
        sampled = i % 2 == 1
        return (
            client.completions.create(
                model=MODEL,
                prompt=PROMPTS[i],
                max_tokens=32,
                seed=i,
                temperature=0.8 if sampled else None,
            )
            .choices[0]
            .text
        )

    before = forwards(url)
    alone = [ask(i) for i in range(len(PROMPTS))]
    sequential = forwards(url) - before
    before = forwards(url)
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        together = list(ex.map(ask, range(len(PROMPTS))))
    assert together == alone
    assert forwards(url) - before < sequential  # rows shared forwards


def test_denoise_stream_rebuilds_the_text(url):
    for sampler in ("llada", "bd3"):
        body = {
            "model": MODEL,
            "prompt": "HAMLET:",
            "max_tokens": 16,
            "sampler": sampler,
            "seed": 2,
            "stream": True,
            "denoise": True,
        }
        if sampler == "llada":
            body.update(steps=8, block_size=16)
        canvas, text, steps, partial = None, "", 0, False
        with stream(url, "/v1/completions", body, KEY) as (status, lines):
            assert status == 200
            for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])
                ev = ch.get("blockdiff", {})
                if ev.get("type") == "start":
                    canvas = [None] * ev["canvas"][0]
                elif ev.get("type") == "denoise":
                    steps += 1
                    for _row, pos, piece in ev["committed"]:
                        canvas[pos] = piece
                    for _row, pos in ev["remasked"]:
                        canvas[pos] = None
                    partial |= None in canvas and any(x is not None for x in canvas)
                for c in ch["choices"]:
                    text += c.get("text", "")
        assert None not in canvas and "".join(canvas) == text
        assert steps >= 8 and partial, sampler


FN = {"type": "function", "function": {"name": "f"}}


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(url, client):
    ok = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8}
    cases = [
        ("{not json", 400, "malformed JSON"),
        ({"model": MODEL, "prompt": 3}, 400, "string"),
        ({"model": MODEL, "prompt": "a", "max_tokens": "8"}, 400, "integer"),
        ({"model": MODEL, "prompt": "a", "temperature": "hot"}, 400, "number"),
        ({"model": "gpt-4", "prompt": "a"}, 404, "not served"),
        ({**ok, "sampler": "bd4"}, 400, "did you mean 'bd3'"),
        ({**ok, "max_tokens": -1}, 400, "max_tokens"),
        ({**ok, "max_tokens": 100000}, 400, "context"),
        ({**ok, "prompt": "x" * 5000}, 400, "context"),
        ({**ok, "block_size": 0}, 400, "block_size"),
        ({**ok, "block_size": 16}, 400, "larger than the canvas"),
        ({**ok, "blok_size": 4}, 400, "did you mean 'block_size'"),
        ({**ok, "temperature": -1}, 400, "temperature"),
        ({**ok, "top_p": 1.5}, 400, "top_p"),
        ({**ok, "n": 0}, 400, "n must be"),
        ({**ok, "stop": [""]}, 400, "stop"),
        ({**ok, "logprobs": 2}, 400, "not supported"),
        ({**ok, "steps": -1}, 400, "steps"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens must be >= 1"),
        ({**ok, "max_tokens": 2**63}, 400, "context"),
        ({**ok, "prompt": "\ud800"}, 400, "not valid Unicode"),
        ({**ok, "response_format": {"type": "yaml"}}, 400, "not one of text, json_object, json_schema"),
        ({**ok, "response_format": {"type": "json_schema"}}, 400, "json_schema.schema"),
        (
            {**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": LONG}}},
            400,
            "no text of at most",
        ),
        ({**ok, "regex": "a("}, 400, "cannot be compiled"),
        ({**ok, "tools": [{"type": "function"}], "tool_choice": "required"}, 400, "each tool must be"),
        ({**ok, "tool_choice": "required"}, 400, "has no tools"),
        ({**ok, "tools": [FN]}, 400, "tools are a field of"),
        ({**ok, "tools": [FN, FN]}, 400, "two tools are named f"),
    ]
    for body, status, words in cases:
        code, r = post(url, body)
        assert code == status, (body, r)
        err = r["error"]
        assert words in err["message"] and err["type"], (body, err)
        assert err["param"] or "JSON" in err["message"] or status != 400, (body, err)
    neutral = dict(logprobs=False, response_format={"type": "text"}, tools=[], tool_choice="none")
    neutral |= dict(store=True, metadata={"a": "b"}, parallel_tool_calls=False, user="u", seed=2**64 - 1)
    code, r = post(url, {**ok, **neutral})
    assert code == 200, r
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    headers = {"authorization": f"bearer {KEY}", "content-type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(ok), headers)
    assert conn.getresponse().status == 200  # the scheme is case-insensitive
    code, r = post(
        url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"
    )
    assert code == 400 and "chat template" in r["error"]["message"]
    code, r = post(
        url, {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "/v1/chat/completions"
    )
    assert code == 400
    for key in (None, "wrong"):
        code, r = post(url, ok, key=key)
        assert code == 401 and r["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert health(url)["status"] == "ok"  # health needs no key
    assert post(url, ok)[0] == 200


def test_streams_fit_openais_client_loop(client):
    """Every chunk has a choice (OpenAI's loop reads chunk.choices[0]) unless the usage chunk is
    asked for; blockdiff's stats ride on the last choice chunk."""
    kw = dict(model=MODEL, prompt="ROMEO:", max_tokens=12, seed=3)
    plain = list(client.completions.create(stream=True, **kw))
    assert plain and all(c.choices for c in plain)
    assert plain[-1].model_extra["blockdiff"]["type"] == "done"
    text = "".join(c.choices[0].text for c in plain)
    with_usage = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert with_usage[-1].choices == [] and all(c.choices for c in with_usage[:-1])
    assert with_usage[-1].usage.completion_tokens == client.completions.create(**kw).usage.completion_tokens
    assert "".join(c.choices[0].text for c in with_usage[:-1]) == text


def test_chat_messages_in_openais_newer_shapes():
    from blockdiff.serve.protocol import Message

    m = Message(
        role="developer", content=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    )
    assert m.as_turn() == {"role": "system", "content": "Be brief."}
    assert Message(role="assistant", content=None).as_turn() == {"role": "assistant", "content": ""}


def test_port_zero_announces_the_real_port_and_a_taken_port_is_one_clear_error():
    import re
    import socket
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "blockdiff", "serve", "--model", MODEL]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*cmd, "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "http://" not in r.stderr  # no other server announced
    proc = subprocess.Popen([*cmd, "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m and int(m.group(1)) != 0, line
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if request(f"http://127.0.0.1:{m.group(1)}", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("the announced port does not answer")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_disconnect_frees_the_row(url):
    body = {**SLOW, "stream": True}
    with stream(url, "/v1/completions", body, KEY) as (status, lines):
        assert status == 200
        next(lines)
        assert health(url)["running_rows"] == 1
    deadline = time.time() + 10
    while health(url)["running_rows"] and time.time() < deadline:
        time.sleep(0.1)
    h = health(url)
    assert h["running_rows"] == 0
    time.sleep(0.3)
    assert health(url)["forwards"] == h["forwards"]  # nothing decodes any more


def test_a_whole_response_client_that_disconnects_frees_its_row(url):
    """Not streamed, behind the key check: the server notices the closed socket and stops."""
    before = forwards(url)
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(SLOW), headers)
    deadline = time.time() + 30
    while not health(url)["running_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(url)["running_rows"] == 1
    conn.close()  # the client goes away without reading the answer
    deadline = time.time() + 10
    while health(url)["running_rows"] and time.time() < deadline:
        time.sleep(0.1)
    assert health(url)["running_rows"] == 0
    assert forwards(url) - before < SLOW["steps"]  # stopped early, not decoded to the end


def test_queue_full_and_timeout():
    slow = SLOW
    with running_server("--model", MODEL, "--max-queue", "1", "--timeout", "1.5") as url:
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(post, url, {**slow, "seed": i}, key=None) for i in range(4)]
            codes = sorted(f.result()[0] for f in futs)
        # one decodes (and times out), one waits (and times out), the rest find the queue full
        assert codes.count(429) >= 1 and set(codes) <= {429, 504}, codes
        code, r = post(url, {**slow, "seed": 9}, key=None)
        assert code == 504 and "timed out" in r["error"]["message"]
        assert post(url, {"model": MODEL, "prompt": "a", "max_tokens": 4}, key=None)[0] == 200


@pytest.mark.slow
def test_chat_with_the_shipped_model():
    from blockdiff import models

    model, tok = load_model(models.DEFAULT)
    with running_server("--sampler", "fastdllm") as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model=models.DEFAULT, messages=msgs, max_tokens=24, seed=0)
        want = generate(model, tok, [tok.chat(msgs)], "fastdllm", 24, seed=0)
        assert r.choices[0].message.content == want.texts[0]
        assert "Paris" in want.texts[0]
        s = c.chat.completions.create(model=models.DEFAULT, messages=msgs, max_tokens=24, seed=0, stream=True)
        chunks = list(s)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.texts[0]
        r = c.chat.completions.create(
            model=models.DEFAULT, messages=msgs, max_tokens=24, seed=0, extra_body={"sampler": "spec"}
        )
        assert r.choices[0].message.content == generate(model, tok, [tok.chat(msgs)], "spec", 24).texts[0]
        # structured output: OpenAI's response_format, through the real client, every kind of sampler
        ask = [{"role": "user", "content": "Give the name and age of Anna, who is 31, as JSON."}]
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }
        rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
        for sampler in ("fastdllm", "bd3", "spec", "ar"):
            r = c.chat.completions.create(
                model=models.DEFAULT,
                messages=ask,
                max_tokens=32,
                seed=0,
                response_format=rf,
                extra_body={"sampler": sampler},
            )
            obj = json.loads(r.choices[0].message.content)
            assert isinstance(obj["name"], str) and isinstance(obj["age"], int), (sampler, obj)
            want = generate(model, tok, [tok.chat(ask)], sampler, 32, seed=0, json_schema=schema)
            assert r.choices[0].message.content == want.texts[0]
        r = c.chat.completions.create(
            model=models.DEFAULT, messages=ask, max_tokens=32, seed=0, response_format={"type": "json_object"}
        )
        assert isinstance(json.loads(r.choices[0].message.content), dict)

        # tools: a required call is decoded under its JSON; it comes back as OpenAI's tool_calls
        def fn(name: str, arg: str) -> dict:
            params = {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}
            return {"type": "function", "function": {"name": name, "parameters": params}}

        tools = [fn("get_weather", "city"), fn("get_time", "zone")]
        q = [{"role": "user", "content": "Weather in Paris?"}]
        for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
            r = c.chat.completions.create(
                model=models.DEFAULT, messages=q, max_tokens=32, seed=0, tools=tools, tool_choice=choice
            )
            m = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls" and m.content is None, r
            call = m.tool_calls[0]
            args = json.loads(call.function.arguments)
            arg = {"get_weather": "city", "get_time": "zone"}[call.function.name]
            assert isinstance(args[arg], str) and call.id.startswith("call_"), call
            assert choice == "required" or call.function.name == "get_time"
        history = [*q, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}]
        history.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
        r = c.chat.completions.create(
            model=models.DEFAULT, messages=history, max_tokens=16, seed=0, tools=tools
        )
        assert r.choices[0].message.content or r.choices[0].message.tool_calls  # auto: either, parsed
        # streamed: the text is held until the row ends; a call goes out as one tool_calls delta
        kw = dict(model=models.DEFAULT, messages=q, max_tokens=32, seed=0, tools=tools)
        kw["tool_choice"] = "required"
        whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0].function
        chunks = [ch for ch in c.chat.completions.create(stream=True, **kw) if ch.choices]
        calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(calls) == 1
        assert (calls[0].function.name, calls[0].function.arguments) == (whole.name, whole.arguments)
        assert calls[0].id.startswith("call_") and calls[0].index == 0
        assert not any(ch.choices[0].delta.content for ch in chunks)  # no JSON leaks as text
        assert chunks[0].choices[0].delta.content is None  # a call's message has no content
        two = [ch for ch in c.chat.completions.create(stream=True, n=2, **kw) if ch.choices]
        for i in (0, 1):  # each row its own call and finish
            mine = [ch.choices[0] for ch in two if ch.choices[0].index == i]
            assert sum(len(x.delta.tool_calls or []) for x in mine) == 1
            assert mine[-1].finish_reason == "tool_calls"
        kw = dict(model=models.DEFAULT, messages=history, max_tokens=16, seed=0, tools=tools)
        chunks = [ch for ch in c.chat.completions.create(stream=True, **kw) if ch.choices]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        got = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        want = c.chat.completions.create(**kw).choices[0].message  # auto: the same answer either way
        assert text == (want.content or "") and len(got) == len(want.tool_calls or [])
        nope = {"type": "function", "function": {"name": "nope"}}
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            c.chat.completions.create(**{**kw, "tool_choice": nope})


def test_a_failing_batch_fails_its_requests_not_the_server(monkeypatch):
    """In process: a decode that raises answers 500 to its requests; the next request is served."""
    import asyncio

    from blockdiff.serve import scheduler as sch

    model, tok = load_model(MODEL)
    s = sch.Scheduler(model, tok)
    s.start()
    try:
        calls = {"n": 0}
        real = sch.Scheduler._denoise

        def boom(self, j, d, ev):
            calls["n"] += 1
            raise RuntimeError("boom")

        monkeypatch.setattr(sch.Scheduler, "_denoise", boom)

        def ask(denoise: bool) -> list[dict]:
            loop = asyncio.new_event_loop()
            q: asyncio.Queue = asyncio.Queue()
            spec = DecodeSpec.build(model, "bd3", 8, 0)
            job = sch.Job("ROMEO:", 1, spec, [], time.monotonic() + 60, sch.emitter(loop, q), denoise)
            s.submit(job)
            out = []

            async def drain():
                while not out or out[-1].type not in ("done", "error"):
                    out.append(await asyncio.wait_for(q.get(), 60))

            loop.run_until_complete(drain())
            loop.close()
            return out

        assert ask(True)[-1] == sch.Failed(500, "decoding failed: RuntimeError('boom')")
        monkeypatch.setattr(sch.Scheduler, "_denoise", real)
        assert isinstance(ask(False)[-1], sch.Done) and calls["n"] == 1
    finally:
        s.stop()


async def last_event(q):
    """A scheduler job's final event (done or error), read from its queue."""
    ev = None
    while ev is None or ev.type not in ("done", "error"):
        ev = await asyncio.wait_for(q.get(), 60)
    return ev


def test_a_poisoned_request_leaves_its_batch_unharmed(monkeypatch):
    """A request whose decode cannot start, batched with good ones: it alone gets the 500."""
    import asyncio

    from blockdiff.serve import scheduler as sch

    real = sch.start_decoding

    def picky(model, tok, prompts, *a, **kw):
        if "POISON" in prompts:
            raise RuntimeError("poisoned row")
        return real(model, tok, prompts, *a, **kw)

    monkeypatch.setattr(sch, "start_decoding", picky)
    model, tok = load_model(MODEL)
    s = sch.Scheduler(model, tok, max_batch=8)
    loop = asyncio.new_event_loop()
    queues = []
    for prompt in ["ROMEO:", "POISON", "JULIET:", "KING"]:  # same settings: one batch
        q: asyncio.Queue = asyncio.Queue()
        spec = DecodeSpec.build(model, "bd3", 8, 0)
        s.submit(sch.Job(prompt, 1, spec, [], time.monotonic() + 60, sch.emitter(loop, q)))
        queues.append(q)
    s.start()  # after the submissions: the worker takes all four together
    try:
        ends = [loop.run_until_complete(last_event(q)) for q in queues]
    finally:
        s.stop()
        loop.close()
    assert [e.type for e in ends] == ["done", "error", "done", "done"]
    assert ends[1].status == 500 and "poisoned row" in ends[1].message
    want = generate(model, tok, ["ROMEO:"], "bd3", 8, seed=0).texts[0]
    assert ends[0].texts == [want]


@pytest.mark.parametrize("sampler,options", [("ar", {}), ("bd3", {"block_size": 4, "order": "confidence"})])
def test_requests_join_a_running_batch_and_decode_as_alone(monkeypatch, sampler, options):
    """Continuous batching, in process: requests that arrive while a batch of the same settings
    runs join its canvas at a block boundary; every text equals the request decoded alone."""
    import asyncio

    from blockdiff.serve import scheduler as sch

    joins = []
    real = sch.join
    monkeypatch.setattr(sch, "join", lambda a, b: joins.append(b.c.batch) or real(a, b))
    model, tok = load_model(MODEL)
    s = sch.Scheduler(model, tok, max_batch=8)
    loop = asyncio.new_event_loop()
    asks = [("ROMEO:", 1, 0), ("JULIET:", 1, 5), ("KING HENRY:", 2, 7)]
    queues = [asyncio.Queue() for _ in asks]

    def spec(seed: int) -> DecodeSpec:
        return DecodeSpec.build(model, sampler, 40, seed, **options)

    def submit(i: int) -> None:
        p, n, seed = asks[i]
        s.submit(sch.Job(p, n, spec(seed), [], time.monotonic() + 60, sch.emitter(loop, queues[i])))

    s.start()
    try:
        submit(0)
        deadline = time.monotonic() + 30
        while s.steps < 6 and time.monotonic() < deadline:  # the first request is decoding
            time.sleep(0.005)
        submit(1)
        submit(2)

        ends = [loop.run_until_complete(last_event(q)) for q in queues]
    finally:
        s.stop()
        loop.close()
    assert joins, "no request joined the running batch"
    for (p, n, seed), end in zip(asks, ends, strict=True):
        assert end.type == "done", end
        assert end.texts == generate(model, tok, [p] * n, sampler, 40, seed=seed, **options).texts, p


# ---- agents: POST /v1/agent/run ----------------------------------------------------------------

AGENT = {"model": MODEL, "task": 3, "sampler": "bd3", "block_size": 2, "max_new_tokens": 4}
AGENT |= {"max_rounds": 3, "max_errors": 2, "seed": 1}


def agent_events(url, body, key=KEY) -> list[dict]:
    with stream(url, "/v1/agent/run", body, key) as (status, lines):
        assert status == 200
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def timeless(d: dict) -> dict:
    return {**d, "seconds": None, "steps": [{**s, "seconds": None} for s in d["steps"]]}


def test_agent_race_streams_exactly_what_run_agent_returns(url):
    from blockdiff.agent import ModelPolicy, make_task, run_agent

    model, tok = load_model(MODEL)
    task = make_task("eval", 3)
    with ThreadPoolExecutor(2) as ex:  # a race: both agents at once, as the page starts them
        raced = dict(
            zip(
                ("ar", "diffusion"),
                ex.map(lambda a: agent_events(url, {**AGENT, "agent": a}), ("ar", "diffusion")),
                strict=True,
            )
        )
    for agent, sampler, opts in (("ar", "ar", {}), ("diffusion", "bd3", {"block_size": 2})):
        evs = raced[agent]
        assert evs[0] == {
            "type": "start",
            "agent": agent,
            "task": "eval:3",
            "question": task.question.text,
            "sampler": sampler,
            "options": opts,
        }
        assert evs[-1]["type"] == "done"
        got = evs[-1]["result"]
        want = run_agent(task, ModelPolicy(model, tok, sampler, 4, 1, **opts), 3, 2048, 2)
        assert timeless(got) == timeless(json.loads(json.dumps(want.as_dict()))), agent
        assert got["rounds"] >= 2 and got["tokens"] > 0 and got["nfe"] > 0
        # the events tell the same story round by round
        rounds = [e["round"] for e in evs if e["type"] == "round"]
        assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) >= got["rounds"]
        steps = [e for e in evs if e["type"] in ("call", "call_error")]
        assert [(e["round"], e["tokens"], e["nfe"]) for e in steps] == [
            (s["round"], s["tokens"], s["nfe"]) for s in got["steps"]
        ]
        assert [e.get("kind") for e in steps] == [(s["error"] or {}).get("kind") for s in got["steps"]]


def test_agent_bad_input_is_a_clear_4xx(url):
    ok = {"model": MODEL, "agent": "ar", "max_new_tokens": 4}
    cases = [
        ({**ok, "agent": "robot"}, 400, "'ar' or 'diffusion'"),
        ({"model": MODEL}, 400, "Field required"),
        ({**ok, "task": 500}, 400, "held-out task index in [0, 500)"),
        ({**ok, "task": -1}, 400, "held-out task index"),
        ({**ok, "task": "3"}, 400, "integer"),
        ({**ok, "agent": "diffusion", "sampler": "ar"}, 400, "needs a diffusion sampler"),
        ({**ok, "sampler": "bd4"}, 400, "did you mean 'bd3'"),
        ({**ok, "blok_size": 2}, 400, "did you mean 'block_size'"),
        ({**ok, "temperature": "hot"}, 400, "number"),
        ({**ok, "max_rounds": 0}, 400, "max_rounds must be >= 1"),
        ({**ok, "max_new_tokens": 200}, 400, "context"),
        ({**ok, "stream": True}, 400, "not an agent option"),
        ({**ok, "model": "gpt-4"}, 404, "not served"),
    ]
    for body, status, words in cases:
        code, r = post(url, body, "/v1/agent/run")
        assert code == status, (body, r)
        assert words in r["error"]["message"] and r["error"]["type"], (body, r)
    assert post(url, ok, "/v1/agent/run", key=None)[0] == 401
    assert health(url)["status"] == "ok"


def test_agent_thread_reports_calls_observations_and_failures():
    """In process: a scripted decode shows every event kind of a solved run; a server failure
    ends the run with a fatal event; a client gone ends the wait for a decode."""
    from blockdiff.agent import Reply, make_task, scripted_trajectory
    from blockdiff.serve.agents import AgentRequest, ScheduledPolicy, run_thread
    from blockdiff.serve.app import APIError, Server

    model, tok = load_model(MODEL)
    server = Server(model, tok, MODEL, timeout=5)  # its worker never starts: nothing decodes
    task = make_task("eval", 3)
    req = AgentRequest(agent="ar", task=3)
    turns = iter(m["content"] for m in scripted_trajectory(task) if m["role"] == "assistant")
    evs: list[dict] = []
    run_thread(task, lambda messages: Reply(next(turns), 3, 3), req, evs.append)
    kinds = [e["type"] for e in evs]
    assert kinds == ["round", "call", "observation"] * 6 + ["done"]
    assert [e["call"]["tool"] for e in evs if e["type"] == "call"][-1] == "finish"
    assert evs[2]["observation"]["results"][0]["source"]  # search found something
    res = evs[-1]["result"]
    assert res["success"] and (res["rounds"], res["tool_calls"], res["tokens"], res["nfe"]) == (6, 6, 18, 18)

    def timed_out(messages):
        raise APIError(504, "request timed out")

    evs = []
    run_thread(task, timed_out, req, evs.append)
    assert evs == [
        {"type": "round", "round": 1},
        {"type": "fatal", "status": 504, "message": "request timed out"},
    ]

    policy = ScheduledPolicy(server, MODEL, "ar", 4, 0)
    policy.stop.set()  # the client went away while its job waits in the queue
    with pytest.raises(APIError, match="client closed"):
        policy.decode("ROMEO:", 0)
    assert server.scheduler.waiting[0].cancelled


def test_a_second_model_serves_the_ar_side():
    """`serve --ar-model`: both models listed and answered by name; the page's AR side (its
    /v1/samplers `ar_model`, the AR agent by default) decodes on the AR model's own scheduler."""
    from blockdiff.agent import ModelPolicy, make_task, run_agent
    from blockdiff.models import bundled_path

    ar_dir = bundled_path(MODEL)  # the same toy weights under a second name: "demo"
    with running_server("--model", MODEL, "--ar-model", str(ar_dir), "--sampler", "bd3") as u:
        assert [m["id"] for m in request(u, "/v1/models")[1]["data"]] == [MODEL, "demo"]
        assert request(u, "/v1/samplers")[1]["ar_model"] == "demo"
        model, tok = load_model(ar_dir)
        want = generate(model, tok, ["ROMEO:"], sampler="ar", max_new_tokens=6, stop_at_eos=False)
        body = {"model": "demo", "prompt": "ROMEO:", "max_tokens": 6, "sampler": "ar"}
        code, r = request(u, "/v1/completions", body)
        assert code == 200 and r["model"] == "demo" and r["choices"][0]["text"] == want.texts[0]
        before = request(u, "/health")[1]
        assert before["ar_model"]["forwards"] > 0 and before["forwards"] == 0  # it ran on the AR model
        body = {"agent": "ar", "task": 3, "max_new_tokens": 4, "max_rounds": 2, "max_errors": 2, "seed": 1}
        evs = agent_events(u, body, key=None)
        assert evs[-1]["type"] == "done"
        want = run_agent(make_task("eval", 3), ModelPolicy(model, tok, "ar", 4, 1), 2, 2048, 2)
        assert timeless(evs[-1]["result"]) == timeless(json.loads(json.dumps(want.as_dict())))
        after = request(u, "/health")[1]
        assert after["forwards"] == 0 and after["ar_model"]["forwards"] > before["ar_model"]["forwards"]
        code, r = request(u, "/v1/completions", {**body, "model": "gpt-4", "prompt": "x"})
        assert code == 404 and f"'{MODEL}', 'demo'" in r["error"]["message"]


def test_a_spec_server_times_its_cost_curve_at_start(monkeypatch):
    """`spec` chooses its shape by this machine's forward costs (measured once, 2-7 s): a server
    whose sampler is spec measures them when it starts, not inside a client's first request."""
    from blockdiff.serve import app

    model, tok = load_model(MODEL)
    seen = []
    monkeypatch.setattr(app, "forward_cost", lambda m: seen.append(m))
    app.Server(model, tok, MODEL, sampler="spec", timeout=5)
    assert seen == [model]
    app.Server(model, tok, MODEL, sampler="bd3", timeout=5)
    assert seen == [model]
