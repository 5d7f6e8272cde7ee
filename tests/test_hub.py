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
