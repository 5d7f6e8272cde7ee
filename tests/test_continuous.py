"""Continuous batching oracle: a row that joins a running decode between blocks, or stays while
others leave, decodes exactly as it would alone (tokens, NFEs)."""

import pytest
import torch

from blockdiff.decoding import generate, start_decoding
from blockdiff.decoding.continuous import between_blocks, can_join, evict, join

PROMPTS = ["The king", "O", "Shall I compare thee, my", "Now is the winter of"]
CASES = [
    ("ar", {}, "aligned", (1,)),
    ("ar", {}, "shifted", (1,)),
    ("bd3", dict(block_size=4, order="confidence", temperature=0.0), "aligned", (4, 8, "L")),
    ("bd3", dict(block_size=4, steps=2, temperature=1.0), "shifted", (4, 8, "L")),
    ("bd3", dict(block_size=4, threshold=0.3, order="confidence", temperature=0.0), "aligned", (4, 8, "L")),
    ("llada", dict(block_size=4, steps=20), "aligned", (4, 8, "L")),
]


def _step_to_boundary(d, it) -> bool:
    """Step `d` until it stands between blocks; False if it ended first."""
    while True:
        if next(it, None) is None:
            return False
        if between_blocks(d) is not None:
            return True


@pytest.mark.parametrize("sampler,kw,logits,sizes", CASES)
def test_joined_and_left_rows_decode_as_alone(make_model, tok, sampler, kw, logits, sizes):
    m = make_model(tok, logits=logits, block_sizes=sizes)
    n = 20
    alone = [
        generate(m, tok, p, sampler, n, seed=[10 + i], stop_at_eos=False, **kw) for i, p in enumerate(PROMPTS)
    ]

    a = start_decoding(m, tok, PROMPTS[:2], sampler, n, seed=[10, 11], stop_at_eos=False, **kw)
    ia = iter(a)
    for _ in range(3):  # a few blocks ahead
        assert _step_to_boundary(a, ia)
    b = start_decoding(m, tok, PROMPTS[2:], sampler, n, seed=[12, 13], stop_at_eos=False, **kw)
    ib = iter(b)
    assert not can_join(a, b)  # b has not decoded its first block: its prompt is not cached yet
    assert _step_to_boundary(b, ib)
    while not can_join(a, b):  # whichever is mid-block steps on
        d, it = (a, ia) if between_blocks(a) is None else (b, ib)
        assert _step_to_boundary(d, it)
    rows = join(a, b)
    assert rows == [2, 3] and a.c.batch == 4
    assert int(a.c.start[2]) > int(a.c.start[0])  # b's rows are behind: they start further right
    steps, nfe = a.c.step, a.c.nfe.clone()
    assert _step_to_boundary(a, ia)
    evict(a, [1, 2, 3])  # row 0 leaves mid-way; the others go on
    out = a.output()
    # one canvas: the joined rows decode their blocks in the same forwards (lockstep)
    assert a.c.step - steps == int((a.c.nfe - nfe[1:]).max())
    for i, r in zip([1, 2, 3], range(3), strict=True):
        assert out.tokens[r] == alone[i].tokens[0], f"prompt {i}"
        assert out.rows[r].nfe == alone[i].rows[0].nfe
        assert out.texts[r] == alone[i].texts[0]


def test_plans_that_revisit_the_canvas_never_join(make_model, tok):
    m = make_model(tok)
    for sampler, kw in [
        ("structural", dict(block_size=4)),
        ("mdlm", dict(steps=8)),
        ("fastdllm", dict(block_size=4, cache="dual")),
        ("dcd", dict(block_size=8)),
    ]:
        d = start_decoding(m, tok, PROMPTS[:1], sampler, 16, **kw)
        for _ in d:
            assert between_blocks(d) is None, sampler
    with pytest.raises(ValueError, match="cannot join"):
        a = start_decoding(m, tok, PROMPTS[:1], "bd3", 16, block_size=4)
        join(a, start_decoding(m, tok, PROMPTS[1:2], "bd3", 16, block_size=4))


def test_regridded_canvas_has_no_shared_start(make_model, tok):
    m = make_model(tok, block_sizes=(1,))
    a = start_decoding(m, tok, PROMPTS[:1], "ar", 12)
    b = start_decoding(m, tok, PROMPTS[2:3], "ar", 12)
    ia, ib = iter(a), iter(b)
    for _ in range(4):
        next(ia)
    next(ib)
    join(a, b)
    with pytest.raises(ValueError, match="own columns"):
        _ = a.c.G
    assert torch.equal(a.c.done(), torch.tensor([False, False]))


# ---- the typed decode request ------------------------------------------------------------------


def test_decode_spec_is_checked_once_and_groups_by_all_but_the_seed(make_model, tok):
    from blockdiff.decoding import DecodeSpec

    m = make_model(tok)
    a = DecodeSpec.build(m, "bd3", 16, 3, block_size=4, order="confidence", temperature=0.0)
    b = DecodeSpec.build(m, "bd3", 16, 9, temperature=0.0, order="confidence", block_size=4)
    assert a != b and a.key == b.key and hash(a.key) == hash(b.key) and len({a.key, b.key}) == 1
    assert DecodeSpec.build(m, "bd3", 16, 3, block_size=8).key != a.key
    assert DecodeSpec.build(m).sampler == "fastdllm"  # the one default
    with pytest.raises(ValueError, match="did you mean 'block_size'"):
        DecodeSpec.build(m, "bd3", 16, blok_size=4)
    with pytest.raises(ValueError, match="larger than the canvas"):
        DecodeSpec.build(m, "bd3", 2, block_size=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeSpec.build(m, "bd3", -1)
    with pytest.raises(ValueError, match="seed"):
        DecodeSpec.build(m, "bd3", 16, seed="7")
    # the decode it names is the one the loose arguments name
    kw = dict(block_size=4, order="confidence", temperature=0.0)
    want = generate(m, tok, PROMPTS[:2], "bd3", 16, seed=3, **kw)
    got = generate(m, tok, PROMPTS[:2], a)
    assert got.tokens == want.tokens and [r.nfe for r in got.rows] == [r.nfe for r in want.rows]


def test_decode_spec_whose_length_a_task_decides(make_model, tok):
    from blockdiff.decoding import DecodeSpec
    from blockdiff.decoding.request import as_spec

    m = make_model(tok)
    later = DecodeSpec.build(m, "llada", None, 5, block_size=4, steps=8)  # names and values now
    with pytest.raises(ValueError, match="did you mean"):
        DecodeSpec.build(m, "llada", None, stepz=8)
    with pytest.raises(ValueError, match="must be a multiple"):  # the length-dependent rest later
        later.with_length(m, 12)
    spec = later.with_length(m, 16)
    assert spec.max_new_tokens == 16 and spec.seed == 5 and spec.length(m, 99) is spec
    want = generate(m, tok, PROMPTS[:1], "llada", 16, seed=5, block_size=4, steps=8)
    assert generate(m, tok, PROMPTS[:1], spec).tokens == want.tokens
    assert as_spec(m, spec, None, 0, {}) is spec
    with pytest.raises(TypeError, match="belong in the DecodeSpec"):
        as_spec(m, spec, None, 0, {"steps": 4})
