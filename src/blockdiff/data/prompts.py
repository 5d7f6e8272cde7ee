"""Chat prompts assembled offline, for self-distillation and for held-out evaluation.

Sources: templated factual, how-to and writing requests over small word lists; reasoning-gym
questions (when the `eval` extra is installed), none of them among the `eval task` questions;
Shakespeare passages to continue. Each prompt falls in the train or held-out split by a hash of
its text, and the short-answer questions of `QUESTIONS` (used to measure accuracy) are never in
the training split.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random

# (question, accepted answer keywords): checked by case-insensitive substring match.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
    ("How many sides does a triangle have?", ("three", "3")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is 2 + 2?", ("4", "four")),
    ("What is the square root of 9?", ("3", "three")),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2")),
    ("What is the chemical formula of water?", ("h2o",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What do bees make?", ("honey",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What is the currency of Japan?", ("yen",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the closest star to Earth?", ("sun",)),
    ("What is the opposite of hot?", ("cold",)),
]

COUNTRIES = (
    "Canada Mexico Brazil Argentina Chile Peru Colombia Portugal Ireland Norway Sweden Finland "
    "Denmark Poland Greece Turkey Austria Switzerland Belgium Netherlands Hungary Ukraine India "
    "Pakistan China Thailand Vietnam Indonesia Australia Kenya Nigeria Morocco Ethiopia Iran Iraq "
    "Israel Cuba Iceland Romania"
).split()
TOPICS = (
    "photosynthesis;gravity;the water cycle;volcanoes;electricity;the moon;black holes;DNA;"
    "the internet;climate change;vaccines;rainbows;earthquakes;the human heart;democracy;"
    "inflation;machine learning;the Roman Empire;the printing press;magnets;sound waves;tides;"
    "the immune system;recycling;solar panels;the stock market;evolution;bacteria;atoms;"
    "the seasons;clouds;friction;batteries;coral reefs;the Renaissance;honeybees;glaciers"
).split(";")
TASKS = (
    "make a cup of tea;learn a new language;save money;sleep better;write a good essay;"
    "start running;plant a tree;prepare for a job interview;keep a plant alive;study for an exam;"
    "bake bread;organize my desk;reduce stress;make new friends;cook rice;learn to code;"
    "give a short speech;change a flat tire;write a thank-you note;stay focused while working"
).split(";")
SUBJECTS = (
    "the ocean;autumn leaves;a lost cat;the city at night;friendship;a rainy morning;the stars;"
    "a mountain village;an old library;winter;a summer garden;the first day of school"
).split(";")
TEMPLATES_TOPIC = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Explain {t} to a ten-year-old.",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Write one short paragraph about {t}.",
)
TEMPLATES_TASK = ("How do I {t}?", "Give me three tips to {t}.", "What is the first step to {t}?")
TEMPLATES_SUBJECT = (
    "Write a short poem about {t}.",
    "Write a haiku about {t}.",
    "Write two sentences describing {t}.",
)


def _templated() -> list[str]:
    out = [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"Which continent is {c} in?" for c in COUNTRIES]
    out += [tpl.format(t=t) for tpl, t in itertools.product(TEMPLATES_TOPIC, TOPICS)]
    out += [tpl.format(t=t) for tpl, t in itertools.product(TEMPLATES_TASK, TASKS)]
    out += [tpl.format(t=t) for tpl, t in itertools.product(TEMPLATES_SUBJECT, SUBJECTS)]
    return out


EVAL_SEED = 1_000_003  # reasoning-gym seed of the `eval task` split; training data excludes it
EVAL_POOL = 1000  # training data excludes the first EVAL_POOL evaluation questions


@functools.cache
def eval_questions(name: str) -> frozenset[str]:
    """The questions of the `eval task` split of a reasoning-gym task (its first EVAL_POOL items)."""
    import reasoning_gym

    return frozenset(
        d["question"].strip() for d in reasoning_gym.create_dataset(name, size=EVAL_POOL, seed=EVAL_SEED)
    )


def _reasoning(n: int, seed: int) -> list[str]:
    """reasoning-gym questions, none of them among the `eval task` questions of their task."""
    try:
        import reasoning_gym
    except ImportError:
        return []
    out = []
    for name in ("basic_arithmetic", "gsm_symbolic"):
        qs = [d["question"] for d in reasoning_gym.create_dataset(name, size=n, seed=seed + 17)]
        out += [q for q in qs if q.strip() not in eval_questions(name)]
    return out


def _continuations(n: int, seed: int) -> list[str]:
    from .corpus import load_corpus

    lines = [ln.strip() for doc in load_corpus("shakespeare").train for ln in doc.splitlines() if ln.strip()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 4)
        out.append("Continue this passage from Shakespeare:\n" + "\n".join(lines[i : i + 4]))
    return out


def split_of(prompt: str) -> str:
    """'heldout' for one prompt in ten (by hash), and for every accuracy question; else 'train'."""
    if prompt.strip().lower() in _QUESTION_TEXTS:
        return "heldout"
    return "heldout" if int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 10 == 0 else "train"


_QUESTION_TEXTS = {q.lower() for q, _ in QUESTIONS}


def chat_prompts(
    split: str = "train", reasoning: int = 300, continuations: int = 300, seed: int = 0
) -> list[str]:
    """The prompt set of one split, in a fixed shuffled order (first n = a fixed subset)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got '{split}'")
    pool = list(
        dict.fromkeys(_templated() + _reasoning(reasoning, seed) + _continuations(continuations, seed))
    )
    pool = [p for p in pool if split_of(p) == split]
    random.Random(seed).shuffle(pool)
    return pool
