"""The offline chat prompt set: held-out prompts and the accuracy questions never reach the
training split; the accuracy checker; distillation refuses a model without a chat template."""

import pytest

from blockdiff.config import ConfigError
from blockdiff.data.prompts import QUESTIONS, chat_prompts, split_of
from blockdiff.distill import distill
from blockdiff.eval.questions import correct


def test_splits_are_disjoint_and_hold_out_the_questions():
    train = chat_prompts("train", reasoning=20, continuations=20)
    held = chat_prompts("heldout", reasoning=20, continuations=20)
    assert train and held and not set(train) & set(held)
    assert all(split_of(q) == "heldout" for q, _ in QUESTIONS)
    assert not {q.lower() for q, _ in QUESTIONS} & {p.lower() for p in train}
    assert chat_prompts("train", reasoning=20, continuations=20) == train  # a fixed order
    with pytest.raises(ValueError, match="train or heldout"):
        chat_prompts("test")


def test_keyword_checker():
    assert correct("The capital of France is Paris.", ("paris",))
    assert not correct("It is Lyon.", ("paris",))
    assert correct("There are 7 days.", ("seven", "7"))
    assert not correct("There are 17 days.", ("7",))  # numbers match as whole words
    assert not correct("Version 2.4 is out", ("4",))


def test_distill_needs_a_chat_model(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no chat template"):
        distill(str(tiny_ckpt), tmp_path / "d.jsonl", n=2)
    with pytest.raises(ConfigError, match="--n must be >= 1"):
        distill(str(tiny_ckpt), tmp_path / "d.jsonl", n=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_distill_prompts_exclude_the_eval_task_questions():
    """`eval task basic_arithmetic|gsm_symbolic` questions never reach distillation, as with `data task`."""
    pytest.importorskip("reasoning_gym")
    from blockdiff.eval import tasks

    pool = {p.strip() for s in ("train", "heldout") for p in chat_prompts(s, reasoning=300, continuations=0)}
    for name in ("basic_arithmetic", "gsm_symbolic"):
        held = {it.prompt.removesuffix("\nAnswer:\n") for it in tasks.items(name, tasks.EVAL_POOL)}
        assert held and not pool & held, name
