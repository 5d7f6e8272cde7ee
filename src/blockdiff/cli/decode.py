"""`blockdiff generate | serve`: decoding for a person at a terminal and over HTTP."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config import ConfigError
from ..decoding import DEFAULT_SAMPLER
from ..decoding.samplers import SAMPLERS
from .common import add_precision, decode_args, decode_spec, load


def cmd_generate(a: argparse.Namespace) -> int:
    from ..decoding import generate
    from ..decoding.display import LiveCanvas

    model, tok = load(a, a.model)
    spec = decode_spec(a, model, 64 if a.max_new_tokens is None else a.max_new_tokens)
    try:
        a.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("the prompt is not valid UTF-8 text") from None
    infill = tok.names["mask_token"] in a.prompt
    chat = bool(tok.chat_template) and not a.raw and not infill
    prompt = tok.chat(a.prompt) if chat else a.prompt
    plain = a.json or not sys.stdout.isatty() or a.quiet
    live = None if plain else LiveCanvas(tok, prompt=a.prompt if chat else None)
    out = generate(model, tok, [prompt], spec, on_step=live)
    if live is not None:
        live.close()
    row = out.rows[0]
    if a.json:
        d = {"text": out.texts[0], "prompt": a.prompt, "chat_template": chat, "sampler": a.sampler}
        print(json.dumps({**d, **row.as_dict(), "notes": out.notes}))
    else:
        if live is None:  # the live view already shows the final canvas
            print(
                out.texts[0] if infill else f"{a.prompt}\n{out.texts[0]}" if chat else a.prompt + out.texts[0]
            )
        for note in out.notes:
            print(f"note: {note}", file=sys.stderr)
        print(
            f"[{a.sampler}] {row.tokens} tokens, {row.nfe} NFEs, {row.tokens_per_nfe:.2f} tokens/NFE, "
            f"{row.seconds:.2f}s",
            file=sys.stderr,
        )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from ..serve import Server, bind, serve
    except ImportError as e:
        raise ConfigError(f"the server needs its extra: pip install 'blockdiff[serve]' ({e})") from None
    from .. import models

    if a.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{a.sampler}'; known samplers: {', '.join(SAMPLERS)}")
    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_batch < 1 or a.max_queue < 1 or a.timeout <= 0:
        raise ConfigError("--max-batch and --max-queue must be >= 1 and --timeout > 0")
    sock = bind(a.host, a.port)  # before the model loads: a taken port fails at once
    model, tok = load(a, a.model)
    name = a.model if a.model in models.NAMES else Path(a.model).name if a.model else models.DEFAULT
    server = Server(model, tok, name, a.sampler, a.max_batch, a.max_queue, a.timeout, a.api_key)
    also = ""
    if a.ar_model:
        ar_name = a.ar_model if a.ar_model in models.NAMES else Path(a.ar_model).name
        server.add_ar_model(*load(a, a.ar_model), ar_name)
        also = f" and {ar_name} (ar)"
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"blockdiff serve: {name} ({a.sampler}){also} on http://{host}:{port}/", file=sys.stderr)
    serve(server, sock)
    return 0


def add(sub) -> None:
    g = sub.add_parser("generate", help="generate text, showing the denoising as it happens")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    decode_args(g)
    g.add_argument("--quiet", action="store_true", help="no live canvas")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    con = g.add_mutually_exclusive_group()
    con.add_argument("--regex", help="the answer must match this regular expression (fully)")
    con.add_argument(
        "--json-schema",
        dest="json_schema",
        help="the answer must be JSON valid for this schema (a file or JSON text)",
    )
    con.add_argument(
        "--grammar",
        help="the answer must be derived by this Lark grammar's `start` rule (a file or the grammar text)",
    )
    g.set_defaults(fn=cmd_generate)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and the live denoising page")
    sv.add_argument("--model", help="model name or checkpoint/run dir (default: smollm2-nbdiff)")
    sv.add_argument(
        "--ar-model",
        dest="ar_model",
        help="also serve this model; the page's AR side (race, AR agent) uses it [the main model]",
    )
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--sampler", default=DEFAULT_SAMPLER, help="default sampler: one of " + ", ".join(SAMPLERS)
    )
    sv.add_argument("--max-batch", type=int, default=8, dest="max_batch", help="canvas rows per batch")
    sv.add_argument("--max-queue", type=int, default=64, dest="max_queue", help="waiting requests before 429")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all")
    sv.add_argument(
        "--api-key",
        dest="api_key",
        default=os.environ.get("BLOCKDIFF_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $BLOCKDIFF_API_KEY; none: open)",
    )
    add_precision(sv)
    sv.set_defaults(fn=cmd_serve)
