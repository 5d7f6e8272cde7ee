"""`blockdiff adapt` builds its recipe from the shipped recipes/nbdiff-smollm2.yaml: the command
and the YAML cannot drift apart."""

import pytest

from blockdiff import cli, recipe


@pytest.fixture
def built(monkeypatch):
    """The recipe `blockdiff adapt ARGS` would train, without training."""
    import blockdiff.train

    got = []

    class Capture:
        def __init__(self, r, out, resume):
            got.append((r, out))

        def run(self):
            return None

    monkeypatch.setattr(blockdiff.train, "Trainer", Capture)

    def build(*args):
        assert cli.main(["adapt", *args]) == 0
        return got.pop()

    return build


YAML_AS_ARGS = [
    "--base", "smollm2-135m-instruct", "--data", "shakespeare", "--target-block-size", "4",
    "--ar-loss-weight", "0.5", "--growth", "linear", "--seq-len", "128", "--steps", "600",
    "--batch-size", "4", "--lr", "5e-5", "--precision", "bf16",
]  # fmt: skip


@pytest.mark.parametrize("args", [[], YAML_AS_ARGS], ids=["defaults", "written-out"])
def test_adapt_equals_the_yaml_recipe(built, args):
    r, out = built(*args)
    assert r.to_dict() == recipe.load("recipes/nbdiff-smollm2.yaml").to_dict()
    assert str(out) == "runs/adapt-smollm2-135m-instruct-B4"


def test_the_yaml_comment_is_the_command(built):
    """The command written out in the YAML's header gives the YAML."""
    text = (recipe.Path("recipes/nbdiff-smollm2.yaml")).read_text()
    lines = [ln.lstrip("# ").rstrip() for ln in text.splitlines() if ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("blockdiff adapt"))
    words = " ".join(lines[start : start + 3]).split()[2:]
    assert words == YAML_AS_ARGS


def test_adapt_options_and_short_runs(built):
    r, out = built("--steps", "8", "--target-block-size", "8", "--mix-scale", "--delta", "lora:4")
    d = r.to_dict()
    assert d["train"]["steps"] == 8 and d["train"]["save_every"] == 8  # one checkpoint, at the end
    assert (d["train"]["warmup"], d["train"]["eval_every"], d["train"]["log_every"]) == (1, 2, 1)
    assert d["objective"]["block_sizes"] == [8, "L"] and d["objective"]["growth"][-1] == [0.5, 8]
    assert d["delta"]["rank"] == 4 and str(out) == "runs/adapt-smollm2-135m-instruct-B8"
    r, _ = built("--steps", "1200", "--set", "train.save_every=7", "--growth", "none")
    d = r.to_dict()
    assert (d["train"]["warmup"], d["train"]["eval_every"], d["train"]["save_every"]) == (60, 300, 7)
    assert d["objective"]["growth"] is None


def test_growth_schedule():
    assert recipe.growth_schedule("linear", 8) == [[0.0, 1], [0.1667, 2], [0.3333, 4], [0.5, 8]]
    assert recipe.growth_schedule("0:1,0.5:4", 4) == [[0.0, 1], [0.5, 4]]
    assert recipe.growth_schedule("none", 4) is None
    with pytest.raises(recipe.ConfigError, match="--growth must be none, linear"):
        recipe.growth_schedule("fast", 4)


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("objective", "token_weight", [0.25], "token_weight"),
        ("objective", "token_weight", [0, 1], "token_weight"),
        ("objective", "time_weight", "cosine", "time_weight"),
        ("objective", "distill", 1.5, "objective.distill must be a number in"),
        ("objective", "distill", 0.5, "needs objective.ar_weight"),
        ("data", "pad", "zeros", "data.pad"),
    ],
)
def test_mgdm_options_are_checked(section, key, value, needle):
    from blockdiff.config import ConfigError
    from blockdiff.recipe import from_dict

    d = {"model": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2}}
    from_dict(
        {**d, "objective": {"token_weight": [0.25, 2], "time_weight": "linear"}, "data": {"pad": "mask"}}
    )
    with pytest.raises(ConfigError, match=needle):
        from_dict({**d, section: {key: value}})
