"""External models and packaged files without the network: offline import fails fast, one
extraction path for files shipped in wheels, one Llama state-dict loader."""

import gzip
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from blockdiff.config import ConfigError, ModelConfig
from blockdiff.convert import from_hf_state_dict
from blockdiff.data import cache
from blockdiff.model import BlockDiffLM


def test_import_of_unknown_id_offline_fails_fast(tmp_path):
    """No minute of download retries: the endpoint is probed once, then only the local cache."""
    pytest.importorskip("transformers")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "blockdiff.cli", "import", "nosuchorg/nosuchmodel", str(tmp_path / "out")]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=40)
    assert r.returncode == 2, r.stderr
    assert time.time() - t0 < 25
    assert "no network: http://127.0.0.1:9 cannot be reached" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def _wheel(tmp_path, member: str, data: bytes):
    d = tmp_path / "dl"
    d.mkdir()
    w = d / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(member, data)
    return w


@pytest.mark.parametrize("gunzip", [False, True])
def test_extract_member_once_and_cleans_up(tmp_path, monkeypatch, gunzip):
    payload = b"line one\nline two\n" * 1000
    wheel = _wheel(tmp_path, "pkg/data.bin", gzip.compress(payload) if gunzip else payload)
    calls = []
    monkeypatch.setattr(cache, "download_package", lambda spec: calls.append(spec) or wheel)
    out = tmp_path / "cache" / "data.txt"
    assert cache.extract_member("pkg==1.0", "pkg/data.bin", out, gunzip=gunzip) == out
    assert out.read_bytes() == payload and calls == ["pkg==1.0"]
    assert not wheel.parent.exists() and not list(out.parent.glob("*.tmp"))
    cache.extract_member("pkg==1.0", "pkg/data.bin", out, gunzip=gunzip)
    assert calls == ["pkg==1.0"]  # cached: no second download


def test_extract_member_missing_member_leaves_nothing(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path, "pkg/other.bin", b"x")
    monkeypatch.setattr(cache, "download_package", lambda spec: wheel)
    out = tmp_path / "cache" / "data.txt"
    with pytest.raises(KeyError):
        cache.extract_member("pkg==1.0", "pkg/data.bin", out)
    assert not out.exists() and not wheel.parent.exists()


def test_hf_state_dict_goes_through_the_model_loader():
    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    src = BlockDiffLM(cfg)
    sd = {**src.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2)}
    got = from_hf_state_dict(cfg, sd)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in src.state_dict().items())
    sd.pop("model.norm.weight")
    with pytest.raises(ConfigError, match=r"does not match a Llama model: missing \['model.norm.weight'\]"):
        from_hf_state_dict(cfg, sd)


def test_import_a_local_hf_directory(tmp_path, capsys):
    """`blockdiff import DIR OUT` on a tiny Llama saved by transformers: a loadable checkpoint
    with the mask token added, the same logits as the source model."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from blockdiff import cli, masks
    from blockdiff.models import load_model

    words = ["</s>", "a", "b", "c", "d", "e"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="e"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    cfg = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg).eval()
    src.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    model, tok = load_model(tmp_path / "out")
    assert tok.mask_id == len(words) == model.config.vocab_size - 1
    ids = torch.tensor([tok.encode("a b c d")])
    with torch.no_grad():
        want = src(ids).logits
        got = model(ids, mask=masks.block_causal(4, 1))[..., : len(words)]
    assert (got - want).abs().max().item() <= 1e-5
