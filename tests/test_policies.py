"""Each decoding policy on its own: refresh policies (when a refresh happens, what it stores),
the windows' engine-facing methods, the commit rules' revision rule, the DCD expansion and
structural revision stages; and an engine that names no sampler and no policy type."""

import inspect
import re

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.decoding import engine
from blockdiff.decoding import runner as runner_mod
from blockdiff.decoding.canvas import Canvas
from blockdiff.decoding.policies import (
    BlockWindow,
    Expand,
    Factor,
    GlobalWindow,
    Plan,
    Revise,
    SlidingWindow,
    Threshold,
    TopK,
    argmax,
)
from blockdiff.decoding.runner import RefreshEvery, RefreshPerBlock, Runner
from blockdiff.decoding.samplers import SAMPLERS, build_plan
from blockdiff.model import BlockDiffLM


def _canvas(prompts=((5, 6, 7), (8, 9)), new=8, B=4) -> Canvas:
    c = Canvas.build([list(p) for p in prompts], new, mask_id=1, eos_id=0, pad_id=2, round_to=B)
    c.set_grid(B)
    return c


def _commit(c: Canvas, r: int, cols) -> None:
    cols = torch.tensor(cols)
    c.commit(torch.full((len(cols),), r), cols, torch.full((len(cols),), 3), torch.ones(len(cols)))


def _model(vocab=16) -> BlockDiffLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, mask_token_id=1, eos_token_id=0,
    )  # fmt: skip
    return BlockDiffLM(cfg).eval()


# ---- refresh policies --------------------------------------------------------------------------


def test_refresh_per_block_is_due_at_a_new_region_and_stores_up_to_its_start():
    c, p = _canvas(), RefreshPerBlock()
    active = torch.ones(c.batch, dtype=torch.bool)
    assert p.due(True, 0, False) and p.due(True, 0, True)
    assert not p.due(False, 100, False) and not p.due(False, 0, True)
    _commit(c, 0, [c.G, c.G + 1])  # decoded columns inside the region do not move the store
    assert p.prefix_end(c, active, c.G + 4) == c.G + 4


def test_refresh_every_counts_commits_and_stores_up_to_the_left_edge():
    c, p = _canvas(), RefreshEvery(3)
    active = torch.ones(c.batch, dtype=torch.bool)
    assert p.due(False, 0, True)  # an empty cache is filled first
    assert not p.due(False, 2, False) and p.due(False, 3, False) and not p.due(True, 0, False)
    G = c.G
    assert p.prefix_end(c, active, 0) == G  # a global region starts at 0: store the prompt
    _commit(c, 0, [G, G + 1, G + 2])
    _commit(c, 1, [G])
    assert p.prefix_end(c, active, 0) == G + 1  # first column still masked in any active row
    assert p.prefix_end(c, torch.tensor([True, False]), 0) == G + 3  # row 1 is not active
    assert p.prefix_end(c, active, G + 4) == G + 4  # never before the region's start
    with pytest.raises(ValueError, match="refresh_every"):
        RefreshEvery(0)


def _spy_forwards(monkeypatch):
    fed = []
    orig = Runner._forward

    def spy(self, lo, hi, write, out_from=None, clean_before=0):
        fed.append((lo, hi, write))
        return orig(self, lo, hi, write, out_from, clean_before)

    monkeypatch.setattr(runner_mod.Runner, "_forward", spy)
    return fed


@torch.no_grad()
def test_runner_refreshes_every_n_committed_tokens(monkeypatch):
    fed = _spy_forwards(monkeypatch)
    c = _canvas(new=12, B=1)
    run = Runner(_model(), c, block_causal=False, cache="prefix", refresh=RefreshEvery(4))
    active = torch.ones(c.batch, dtype=torch.bool)
    G = c.G
    run.before_step(0, c.T, active, True)  # empty cache: refresh storing the prompt
    assert fed == [(0, c.T, G)] and run.cache_idx.tolist() == list(range(G))
    run.logits(G, c.T)  # served by the refresh: no forward
    assert len(fed) == 1
    _commit(c, 0, [G, G + 1, G + 2])
    _commit(c, 1, [G, G + 1])
    run.committed(3)
    run.before_step(0, c.T, active, False)  # 3 < 4: no refresh
    run.logits(G, c.T)
    assert fed[-1] == (G, c.T, 0)  # the step feeds from the stored prefix on
    run.committed(2)
    run.before_step(0, c.T, active, False)  # 5 >= 4: refresh up to the left edge
    assert fed[-1] == (0, c.T, G + 2) and run.cache_idx.tolist() == list(range(G + 2))
    assert run.committed_since_refresh == 0


@torch.no_grad()
def test_runner_refreshes_per_block_and_only_for_approximate_caches(monkeypatch):
    fed = _spy_forwards(monkeypatch)
    c = _canvas(new=8, B=4)
    active = torch.ones(c.batch, dtype=torch.bool)
    G = c.G
    run = Runner(_model(), c, block_causal=False, cache="dual", refresh=RefreshPerBlock())
    run.before_step(G, G + 4, active, True)
    assert fed == [(0, c.T, c.T)]  # dual: everything written, then the active block dropped
    assert run.cache_idx.tolist() == [*range(G), *range(G + 4, c.T)] and run.region == (G, G + 4)
    run.logits(G, G + 4)
    run.committed(4)
    run.before_step(G, G + 4, active, False)  # same block: no refresh whatever was committed
    assert len(fed) == 1
    run.logits(G, G + 4)
    assert fed[-1] == (G, G + 4, 0)  # dual: steps feed only the active block
    run.before_step(G + 4, G + 8, active, True)
    assert fed[-1] == (0, c.T, c.T) and run.region == (G + 4, G + 8)
    for cache, causal in (("none", False), ("exact", True)):
        assert Runner(_model(), c, causal, cache, RefreshEvery(1)).policy is None


def test_plans_carry_typed_refresh_policies(make_model, tok):
    m = make_model(tok)  # has the global block
    assert build_plan(m, "fastdllm", 16, [], {}).refresh == RefreshPerBlock()
    assert build_plan(m, "llada", 16, [], {"block_size": 8}).refresh == RefreshPerBlock()
    assert build_plan(m, "dcd", 16, [], {"refresh_every": 5}).refresh == RefreshEvery(5)
    assert build_plan(m, "dcd", 16, [], {"block_size": 4}).refresh is None  # exact cache


# ---- windows -----------------------------------------------------------------------------------


def test_window_grid_sizes():
    assert BlockWindow(4).grid_size() == 4
    assert GlobalWindow().grid_size() is None
    assert SlidingWindow(3, within=BlockWindow(8)).grid_size() == 8
    assert SlidingWindow(3, within=GlobalWindow()).grid_size() is None
    assert SlidingWindow(3).grid_size() is None


def test_window_start_masks():
    c = _canvas(new=8, B=4)
    G = c.G
    _commit(c, 0, [G, G + 5])
    active = torch.ones(c.batch, dtype=torch.bool)
    region = BlockWindow(4).region(c, active)
    assert region == (0, G, G + 4)
    assert BlockWindow(4).start_masks(c, region).tolist() == [3, 4]  # the block's masks
    assert GlobalWindow().start_masks(c, (0, 0, c.T)).tolist() == [6, 8]  # every mask
    assert SlidingWindow(2, within=BlockWindow(4)).start_masks(c, region).tolist() == [6, 8]


def test_sliding_window_candidates():
    c = _canvas(new=8, B=4)
    G = c.G
    _commit(c, 0, [G, G + 2])
    w = SlidingWindow(2, max_span=8, within=BlockWindow(4))
    cand = w.candidates(c, w.region(c, torch.ones(2, dtype=torch.bool)))
    assert cand[0].nonzero().flatten().tolist() == [G + 1, G + 3]  # skips the committed column
    assert cand[1].nonzero().flatten().tolist() == [G, G + 1]


# ---- commit rules and stages -------------------------------------------------------------------


def test_commit_rules_for_revision():
    assert TopK(4).for_revision() == Threshold(0.9)  # no step budget in a revision stage
    assert TopK(None).for_revision() == Threshold(0.9)
    assert Threshold(0.5).for_revision() == Threshold(0.5)
    assert Factor(1.0).for_revision() == Factor(1.0)


def test_revise_stage_remasks_the_least_confident_and_plans_a_larger_block():
    c = _canvas(prompts=((5, 6),), new=8, B=4)
    G = c.G
    conf = torch.tensor([0.9, 0.2, 0.8, 0.1, 0.7, 0.6, 0.95, 0.5])
    c.step = 1  # committed by the draft's first step (step 0 marks given tokens)
    c.commit(torch.zeros(8, dtype=torch.long), torch.arange(G, G + 8), torch.full((8,), 3), conf)
    stage = Revise(8, 0.25)
    stage.remask(c, [torch.Generator().manual_seed(0)])
    assert c.masked[0].nonzero().flatten().tolist() == [G + 1, G + 3]  # ceil(0.25 * 8) lowest
    assert c.blk[0, G:].tolist() == [0] * 8  # the grid of the stage's block
    draft = Plan(BlockWindow(4), TopK(4), 4, "exact", temperature=0.5, top_p=0.9, stop_at_eos=False)
    p = stage.plan(draft)
    assert p.window == BlockWindow(8) and p.attn_block == 8 and p.commit == Threshold(0.9)
    assert p.cache == "none" and p.refresh is None and p.revise == []
    assert (p.temperature, p.top_p, p.stop_at_eos) == (0.5, 0.9, False)
    g = Revise(None, 0.5).plan(draft)
    assert g.window == GlobalWindow() and g.attn_block is None


def test_expand_grows_a_block_cut_by_its_edge_when_unsure():
    c = _canvas(prompts=((5, 6),), new=16, B=4)
    G = c.G
    _commit(c, 0, [G, G + 1])  # 2 masks left in block 0
    e, extra = Expand(step=4, max_extra=4, below=0.5), torch.zeros(1, dtype=torch.long)
    assert not e.grow(c, 0, 0, torch.tensor([0.6, 0.9]), extra, 2, 4)  # confident: commit
    assert not e.grow(c, 0, 0, torch.tensor([0.1]), extra, 1, 4)  # window not at the edge
    assert e.grow(c, 0, 0, torch.tensor([0.1, 0.9]), extra, 2, 4)
    assert int(extra[0]) == 4 and (c.blk[0] == 0).sum() == 8 and c.blk[0, G + 8] == 1
    assert not e.grow(c, 0, 0, torch.tensor([0.1]), extra, 8, 4)  # max_extra reached


# ---- the engine knows no sampler ---------------------------------------------------------------


def test_engine_names_no_sampler_and_no_policy_type():
    src = inspect.getsource(engine)
    for name in ("BlockWindow", "GlobalWindow", "SlidingWindow", "TopK", "Threshold", "Factor"):
        assert name not in src
    for s in SAMPLERS:  # the default sampler is `request.DEFAULT_SAMPLER`, named there only
        assert f'"{s}"' not in src and f"'{s}'" not in src
    assert not re.search(r"sampler\s*(==|!=|in\b)", src)
    assert "runner.fresh" not in src and "cache_idx" not in src


def test_build_plan_checks_the_sampler_and_passes_structural_draft_options(make_model, tok):
    m = make_model(tok)
    with pytest.raises(ValueError, match="did you mean 'fastdllm'"):
        build_plan(m, "fastdlm", 16, [], {})
    p = build_plan(m, "structural", 16, [], {"draft": "dcd", "window": 4, "stages": [[8, 0.5]]})
    assert p.window.masks == 4 and p.revise == [Revise(8, 0.5, "snapshot")]
    with pytest.raises(ValueError, match="does not take window"):
        build_plan(m, "structural", 16, [], {"window": 4})  # the bd3 draft has no window


def test_has_global_block_is_a_model_config_property():
    cfg = ModelConfig(block_size=4, block_sizes=[4, 64], train_seq_len=64)
    assert cfg.has_global_block and cfg.trained_block_sizes == [4, 64]
    assert not ModelConfig(block_size=4, train_seq_len=64).has_global_block
    assert ModelConfig(block_size=1024).has_global_block  # max_position_embeddings without a seq len


def test_argmax_gives_torchs_indices_first_of_ties_included():
    """`policies.argmax` (through numpy on CPU floats) = torch's argmax: rows, one row, ties
    (the first maximum), -inf logits, float64, a non-contiguous view, and bfloat16 (torch's)."""
    torch.manual_seed(0)
    x = torch.randn(5, 300)
    x[1, [7, 40]] = 9.0  # a tie: the first wins
    x[2, :] = float("-inf")
    x[2, 123] = 0.0
    for t in (x, x[3], x.double(), x[:, ::2], x.bfloat16()):
        got = argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))
    assert int(argmax(x)[1]) == 7
