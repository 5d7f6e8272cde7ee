"""Low-rank deltas: merged = unmerged forward, the base stays bit for bit, a delta refuses a wrong
base, and delta training saves, resumes and loads through the same Trainer."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blockdiff import cli, delta
from blockdiff.checkpoint import CheckpointError, load_weights
from blockdiff.config import ConfigError
from blockdiff.model import BlockDiffLM
from blockdiff.models import load_model


def _perturbed(model: BlockDiffLM, spec: delta.DeltaSpec, seed: int = 0) -> BlockDiffLM:
    delta.attach(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def ar_base(make_model, tok):
    make_model(tok, logits="shifted", block_sizes=(1,))
    from tests.conftest import _MODELS

    return _MODELS[("shifted", (1,))]


def test_merged_equals_unmerged_forward(ar_base):
    base, _ = ar_base
    m = BlockDiffLM(base.config)
    m.load_state_dict(base.state_dict())
    assert m.config.mask_token_id is not None
    _perturbed(m, delta.DeltaSpec(rank=4))
    x = torch.randint(0, 256, (2, 20))
    x[0, 5] = m.config.mask_token_id  # the mask token's trained row must be used too
    with torch.no_grad():
        unmerged = m(x)
        delta.merge(m)
        merged = m(x)
    assert not delta.attached(m)
    assert (unmerged - merged).abs().max().item() <= 1e-5
    # and the delta did change the function (the test would pass vacuously otherwise)
    assert (merged - base(x)).abs().max().item() > 1e-3


def test_norms_delta_round_trip(ar_base):
    """With `norms`, every RMSNorm gain trains and travels in the delta; a fresh model that loads
    the delta's tensors and merges computes what the trained, unmerged model computes."""
    base, _ = ar_base
    spec = delta.DeltaSpec(rank=2, norms=True)
    trained = BlockDiffLM(base.config)
    trained.load_state_dict(base.state_dict())
    _perturbed(trained, spec, seed=1)
    sd = delta.delta_state(trained)
    norms = [n for n in sd if n.endswith("norm.weight")]
    assert len(norms) == 2 * base.config.num_hidden_layers + 1
    fresh = BlockDiffLM(base.config)
    fresh.load_state_dict(base.state_dict())
    delta.attach(fresh, spec)
    delta.load_delta_state(fresh, sd)
    delta.merge(fresh)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (trained(x) - fresh(x)).abs().max().item() <= 1e-5
        # the norms alone change the function: a delta without them would not reproduce it
        plain = BlockDiffLM(base.config)
        plain.load_state_dict(base.state_dict())
        delta.attach(plain, delta.DeltaSpec(rank=2))
        delta.load_delta_state(plain, {k: v for k, v in sd.items() if k not in norms})
        assert (trained(x) - plain(x)).abs().max().item() > 1e-3
    assert delta.DeltaSpec(rank=2, norms=True).as_dict()["norms"] is True


def test_attach_freezes_base_and_starts_at_base(ar_base):
    base, _ = ar_base
    m = BlockDiffLM(base.config)
    m.load_state_dict(base.state_dict())
    before = delta.base_checksum(m)
    delta.attach(m, delta.DeltaSpec(rank=2, targets=["q_proj", "down_proj"]))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.endswith("embed_tokens.rows") for n in names)
    assert sum("q_proj" in n for n in names) == 2 * m.config.num_hidden_layers
    assert not any("k_proj" in n for n in names)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(x), base(x))  # B = 0: the delta starts as the identity
    delta.merge(m)
    assert delta.base_checksum(m) == before


def test_a_bundled_model_is_a_base_by_name():
    """`model.base: <bundled name>` (a delta over a shipped model) loads that model's weights."""
    from blockdiff.models import bundled_path, load_base_model

    by_name, _ = load_base_model("shakespeare-5m")
    by_path, _ = load_model(bundled_path("shakespeare-5m"), None)  # the stored weights, unfused
    assert delta.base_checksum(by_name) == delta.base_checksum(by_path)


def test_bad_specs():
    with pytest.raises(ConfigError, match="lora:RANK"):
        delta.parse("lora")
    with pytest.raises(ConfigError, match=">= 1"):
        delta.parse("lora:0")
    with pytest.raises(ConfigError, match="subset"):
        delta.DeltaSpec(rank=2, targets=["nope"]).validate()


@pytest.mark.slow
def test_delta_adapt_save_resume_load(ar_base, corpus_dir, tmp_path, capsys):
    _, base_dir = ar_base
    out = tmp_path / "lora"
    args = [
        "adapt", "--base", str(base_dir), "--data", str(corpus_dir), "--target-block-size", "4",
        "--seq-len", "32", "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--precision", "fp32",
        "--delta", "lora:4", "--set", "train.save_every=3",
    ]  # fmt: skip
    assert cli.main([*args, "--out", str(out), "--set", "train.steps=6"]) == 0, capsys.readouterr().err
    full = {k: v.clone() for k, v in load_file(str(out / "step-0000006" / "delta.safetensors")).items()}
    # as if killed after step 3: resuming must reproduce steps 4..6 bit for bit
    shutil.rmtree(out / "step-0000006")
    (out / "latest").write_text("step-0000003\n")
    ckpt = out / "step-0000003"
    files = sorted(p.name for p in ckpt.iterdir())
    assert "delta.safetensors" in files and "model.safetensors" not in files
    state = load_file(str(ckpt / "trainer_state.safetensors"))
    assert all("lora_" in k or "embed_tokens.rows" in k for k in state if k.startswith("model."))
    info = json.loads((ckpt / "config.json").read_text())["delta"]
    assert info["rank"] == 4 and info["base"] == str(base_dir) and len(info["base_sha256"]) == 64
    assert cli.main([*args, "--out", str(out), "--set", "train.steps=6", "--resume"]) == 0
    a = load_file(str(out / "step-0000006" / "delta.safetensors"))
    assert a.keys() == full.keys() and all(torch.equal(a[k], full[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B"))  # it trained
    model, tok = load_model(out)
    assert model.config.layout == "context_causal" and model.config.block_sizes == [4]
    assert not delta.attached(model)
    exp = tmp_path / "exported"
    assert cli.main(["export", str(out), str(exp)]) == 0
    names = sorted(p.name for p in exp.iterdir())
    assert names == sorted(
        ["README.md", "config.json", "delta.safetensors", "model_card.json", "tokenizer.json"]
        + ["tokenizer_config.json"]
    )
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(exp / "delta.safetensors")).values())
    shipped, _ = load_model(exp)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (shipped(x) - model(x)).abs().max() < 0.05  # the same delta, rounded to bf16
    # a delta over a different base is refused, naming the checksums
    info["base_sha256"] = "0" * 64
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["delta"] = info
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different base"):
        load_model(ckpt)


@pytest.mark.slow
def test_delta_under_fsdp_matches_one_process(ar_base, corpus_dir, tmp_path, capsys):
    """The frozen base sharded with the delta (FSDP, 2 processes): the same delta as one process."""
    from tests.test_train import torchrun

    _, base_dir = ar_base
    args = [
        "adapt", "--base", str(base_dir), "--data", str(corpus_dir), "--target-block-size", "4",
        "--seq-len", "32", "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--precision", "fp32",
        "--delta", "lora:4", "--set", "train.save_every=4",
    ]  # fmt: skip
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    p = torchrun(*args, "--out", str(tmp_path / "two"), "--set", "train.parallel=fsdp", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_weights(tmp_path / d / "step-0000004" / "delta.safetensors") for d in ("one", "two"))
    assert not (tmp_path / "two" / "step-0000004" / "delta.safetensors").exists()  # consolidated
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert cli.main(["export", str(tmp_path / "two"), str(tmp_path / "shipped"), "--dtype", "float32"]) == 0
    e = load_file(str(tmp_path / "shipped" / "delta.safetensors"))
    assert e.keys() == a.keys() and max((a[k] - e[k]).abs().max().item() for k in a) <= 1e-5


def _save_delta_over(base_dir, out, rank, seed):
    """A random delta of `rank` over the checkpoint `base_dir`, saved as a delta checkpoint."""
    from blockdiff.checkpoint import save_delta

    model, tok = load_model(base_dir, None)  # merged: what the delta is trained over
    info = {
        **delta.DeltaSpec(rank=rank).as_dict(),
        "base": str(base_dir),
        "base_sha256": delta.base_checksum(model),
    }
    _perturbed(model, delta.DeltaSpec(rank=rank), seed)
    out.mkdir(parents=True)
    save_delta(out, model, tok, info)
    return out


def test_a_delta_over_a_delta_stays_unmerged_and_computes_the_merged_model(ar_base, tmp_path):
    """Inference keeps both deltas beside the base (one LoRA of the summed rank, so a 4-bit base
    stays on its grid); it computes what the fully merged model computes."""
    from blockdiff.config import ModelConfig
    from blockdiff.models import _delta_base, _load_delta

    _, base_dir = ar_base
    d1 = _save_delta_over(base_dir, tmp_path / "d1", 2, 1)
    d2 = _save_delta_over(d1, tmp_path / "d2", 3, 2)
    raw = json.loads((d2 / "config.json").read_text())
    assert _delta_base(raw["delta"]["base"])[0] == d1
    stacked = _load_delta(d2, ModelConfig.from_dict(raw), raw["delta"], merge=False)
    q = stacked.model.layers[0].self_attn.q_proj
    assert (
        isinstance(q, delta.LoRALinear)
        and q.lora_A.shape[0] == 5
        and not isinstance(q.base, delta.LoRALinear)
    )
    merged, _ = load_model(d2, None)
    fast, _ = load_model(d2, "float32")
    x = torch.randint(0, 256, (2, 20))
    x[0, 4] = merged.config.mask_token_id
    with torch.no_grad():
        a, b, c = merged(x), fast(x), stacked(x)
    assert (a - b).abs().max().item() <= 1e-4 and (a - c).abs().max().item() <= 1e-4
    assert (a - load_model(d1, None)[0](x)).abs().max().item() > 1e-3  # the second delta matters


@pytest.mark.slow
def test_a_delta_over_the_shipped_delta_decodes_in_int4(tmp_path):
    """The agent's case: a delta over `smollm2-nbdiff` (itself a delta over SmolLM2) keeps the
    base's exact 4-bit weights under --dtype auto, and agrees with the merged float32 model."""
    from blockdiff.models import bundled_path

    d = _save_delta_over(bundled_path("smollm2-nbdiff"), tmp_path / "d", 2, 3)
    fast, tok = load_model(d, "auto")
    assert fast.precision == "int4"
    ref, _ = load_model(d, None)
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        p, q = ref(x).float().log_softmax(-1), fast(x).float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 0.05, kl
