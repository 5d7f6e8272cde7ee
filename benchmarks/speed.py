"""Decoding speed of SmolLM2-135M on this machine: llama.cpp, transformers, blockdiff `ar`, `bd3`
and `spec`, batch 1, on held-out chat prompts, one run, interleaved repeats, medians.

Also: the memory-bandwidth floor of one AR token (weight bytes / measured read bandwidth), the
latency of one forward over a cached prefix for 1..32 new tokens, and a torch-profiler summary
of blockdiff `ar` steps.

    python benchmarks/speed.py --adapted smollm2-nbdiff [--prompts 6] [--repeats 2] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.decoding import generate
from blockdiff.eval.genppl import score
from blockdiff.hub import load_reference, smollm2_gguf
from blockdiff.model import KVCache
from blockdiff.models import load_model
from blockdiff.quant import Int4Linear


def bandwidth() -> float:
    """Read bandwidth in bytes/s: the median of summing a 1 GiB tensor."""
    x = torch.ones(256 * 2**20)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def forward_latency(model, n_prefix: int = 64, news=(1, 4, 8, 16, 32), reps: int = 7) -> dict[int, float]:
    ids = torch.randint(0, 1000, (1, n_prefix))
    cache = KVCache(model.config.num_hidden_layers)
    model(ids, cache=cache, write_cache=True)
    out = {}
    for n in news:
        x = torch.randint(0, 1000, (1, n))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x, cache=cache, write_cache=False, logits_slice=slice(-1, None))
            ts.append(time.perf_counter() - t)
        out[n] = statistics.median(ts[1:])
    return out


def q8_0_gguf() -> Path:
    """SmolLM2's GGUF requantised to Q8_0 by llama.cpp's own quantiser (the package ships Q4_1
    only: the Q8_0 holds the Q4_1 weights at 8 bits, so it measures llama.cpp's 8-bit speed)."""
    import llama_cpp

    out = smollm2_gguf().with_name("SmolLM2-135M-Instruct.Q8_0-from-Q4_1.gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 2
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError("llama.cpp could not requantise the GGUF to Q8_0")
        tmp.rename(out)
    return out


def llama_cpp_runner(max_new: int, q8: bool = False):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (make llama-cpp builds it); row skipped")
        return None
    path = q8_0_gguf() if q8 else smollm2_gguf()
    llm = Llama(model_path=str(path), n_threads=2, n_ctx=1024, verbose=False)

    def run(prompt: str):
        t = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=max_new, temperature=0.0, top_k=1)
        secs = time.perf_counter() - t
        return r["choices"][0]["text"], r["usage"]["completion_tokens"], None, secs

    return run


def hf_runner(m, ref_tok, max_new: int):

    def run(prompt: str):
        ids = ref_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        t = time.perf_counter()
        out = m.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=ref_tok.eos_token_id)
        secs = time.perf_counter() - t
        new = out[0, ids.shape[1] :]
        text = ref_tok.decode(new, skip_special_tokens=True)
        return text, int((new != ref_tok.eos_token_id).sum()) + 1, None, secs

    return run


def bd_runner(model, tok, sampler: str, max_new: int, **kw):
    def run(prompt: str):
        t = time.perf_counter()
        out = generate(model, tok, [prompt], sampler=sampler, max_new_tokens=max_new, **kw)
        return out.texts[0], out.rows[0].tokens, out.rows[0].nfe, time.perf_counter() - t

    return run


def profile_ar(model, tok, prompt: str, n: int = 32) -> str:
    from torch.profiler import ProfilerActivity, profile

    generate(model, tok, [prompt], sampler="ar", max_new_tokens=4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tok, [prompt], sampler="ar", max_new_tokens=n, stop_at_eos=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapted", required=True)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7, help="for the sampled spec row")
    ap.add_argument("--skip", default="", help="comma-separated row labels to leave out")
    a = ap.parse_args()
    torch.manual_seed(0)
    N = a.max_new_tokens
    ref, ref_tok = load_reference(a.base)
    base32, tok = load_model(a.base, "float32")
    base16, _ = load_model(a.base, "bfloat16")
    ad16, atok = load_model(a.adapted, "bfloat16")
    base8, _ = load_model(a.base, "int8")  # weight-only int8, per output channel (lossy)
    base4, _ = load_model(a.base, "int4")  # the runtime's default: the Q4_1 weights exactly
    ad4, _ = load_model(a.adapted, "int4")  # the same base, the delta unmerged beside it
    prompts = [tok.chat(q) for q in chat_prompts("heldout")[: a.prompts]]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(prompts)} held-out chat prompts\n"
    )

    bw = bandwidth()
    wbytes = sum(
        t.numel() * 2 for t in {id(t): t for t in [*base16.parameters(), *base16.buffers()]}.values()
    )
    floor = wbytes / bw
    b4 = sum(  # what a one-token step reads in the int4 runtime: the 4-bit codes and their scales
        t.numel() * t.element_size()  # (not the tiles' copy of them: forwards of several tokens)
        for m in base4.modules()
        if isinstance(m, Int4Linear)
        for name, t in m.named_buffers()
        if not name.startswith("tile_")
    )
    print(
        f"read bandwidth {bw / 1e9:.1f} GB/s; bf16 weights {wbytes / 1e6:.0f} MB -> "
        f"floor {floor * 1e3:.1f} ms/token ({1 / floor:.0f} tokens/s); int4 runtime reads {b4 / 1e6:.0f} MB "
        f"per token -> floor {b4 / bw * 1e3:.1f} ms/token\n"
    )

    lat = forward_latency(base4)
    print("| new tokens over a 64-token cached prefix (int4 runtime) | " + " | ".join(map(str, lat)) + " |")
    print("|---|" + "---|" * len(lat))
    print("| ms per forward | " + " | ".join(f"{v * 1e3:.1f}" for v in lat.values()) + " |")
    print("| ratio to 1 token | " + " | ".join(f"{v / lat[1]:.2f}" for v in lat.values()) + " |\n")

    rows = {
        "llama.cpp Q4_1 (2 threads)": llama_cpp_runner(N),
        "llama.cpp Q8_0 from Q4_1 (2 threads)": llama_cpp_runner(N, q8=True),
        "transformers fp32": hf_runner(ref, ref_tok, N),
        "transformers bf16": hf_runner(load_reference(a.base, dtype=torch.bfloat16)[0], ref_tok, N),
        "blockdiff ar fp32 (base)": bd_runner(base32, tok, "ar", N),
        "blockdiff ar bf16 (base)": bd_runner(base16, tok, "ar", N),
        "blockdiff ar int8 (base)": bd_runner(base8, tok, "ar", N),
        "blockdiff ar int4 runtime (base)": bd_runner(base4, tok, "ar", N),
        "blockdiff ar bf16 (adapted)": bd_runner(ad16, atok, "ar", N),
        "blockdiff ar int4 runtime (adapted)": bd_runner(ad4, atok, "ar", N),
        "blockdiff spec k=3 greedy int4 runtime (adapted)": bd_runner(ad4, atok, "spec", N, draft_len=3),
        "blockdiff spec k=1 greedy int4 runtime (adapted)": bd_runner(ad4, atok, "spec", N, draft_len=1),
        "blockdiff spec k=1 w=2 (tree) greedy int4 runtime (adapted)": bd_runner(
            ad4, atok, "spec", N, draft_len=1, draft_width=2
        ),
        "blockdiff spec k=3 w=4 (tree) greedy int4 runtime (adapted)": bd_runner(
            ad4, atok, "spec", N, draft_len=3, draft_width=4
        ),
        "blockdiff spec auto greedy int4 runtime (adapted)": bd_runner(ad4, atok, "spec", N),
        "blockdiff spec k=3 greedy bf16 (adapted)": bd_runner(ad16, atok, "spec", N, draft_len=3),
        "blockdiff spec k=1 greedy bf16 (adapted)": bd_runner(ad16, atok, "spec", N, draft_len=1),
        "blockdiff spec k=1 w=2 (tree) greedy bf16 (adapted)": bd_runner(
            ad16, atok, "spec", N, draft_len=1, draft_width=2
        ),
        "blockdiff spec auto greedy bf16 (adapted)": bd_runner(ad16, atok, "spec", N),
        "blockdiff bd3 B=4, 2 tok/NFE int4 runtime (adapted)": bd_runner(
            ad4, atok, "bd3", N, block_size=4, steps=2, order="confidence", temperature=0.0
        ),
        f"blockdiff ar T={a.temperature} int4 runtime (adapted)": bd_runner(
            ad4, atok, "ar", N, temperature=a.temperature
        ),
        f"blockdiff spec k=3 T={a.temperature} int4 runtime (adapted)": bd_runner(
            ad4, atok, "spec", N, draft_len=3, temperature=a.temperature
        ),
    }
    skip = set(filter(None, a.skip.split(",")))
    rows = {k: v for k, v in rows.items() if k not in skip and v is not None}
    res: dict[str, list] = {k: [] for k in rows}
    for _ in range(a.repeats):
        for p in prompts:
            for label, run in rows.items():
                res[label].append((p, *run(p)))
    ar_tps = None
    llama_tps = None
    table = []
    for label, rs in res.items():
        tps = statistics.median(n / s for _, _, n, _, s in rs)
        nfe = [n / f for _, _, n, f, _ in rs if f]
        first = rs[: len(prompts)]
        nll, cnt = score(ref, ref_tok, [p for p, *_ in first], [t for _, t, *_ in first], 1024, 512)
        table.append(
            (label, tps, statistics.mean(n for _, _, n, _, _ in rs), nfe, math.exp(nll / max(cnt, 1)))
        )
        if label == "blockdiff ar int4 runtime (base)":
            ar_tps = tps
        if label.startswith("llama.cpp Q4_1"):  # the baseline
            llama_tps = tps
    print("| decoder | tokens/s (median) | mean tokens | tokens/NFE | vs blockdiff ar int4 "
          "| vs llama.cpp Q4_1 | Gen PPL (base) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, tps, ntok, nfe, ppl in table:
        r_ar = f"{tps / ar_tps:.2f}x" if ar_tps else "-"
        r_ll = f"{tps / llama_tps:.2f}x" if llama_tps else "-"
        tpn = f"{statistics.mean(nfe):.2f}" if nfe else "-"
        print(f"| {label} | {tps:.1f} | {ntok:.0f} | {tpn} | {r_ar} | {r_ll} | {ppl:.2f} |")
    print("\nprofile of blockdiff ar (int4 runtime, base, 32 tokens):\n```")
    print(profile_ar(base4, tok, prompts[0]))
    print("```")


if __name__ == "__main__":
    with torch.no_grad():
        main()
