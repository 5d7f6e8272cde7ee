"""A seeded, invented world and the constraint-search questions asked about it.

Why invented: the agent must *use its tools*, so nothing it is asked may be answerable from a
model's prior. Every task carries a small world of its own (cities, companies, people with
random-syllable names, a few categorical attributes and relations, a few numbers), so a model
trained on many tasks learns how to search and compute, never the facts.

A question has the shape the talk's demo uses, "which X satisfies A and B, and what is its
C × D?": A and B single out one entity (they appear in its description, so `search` can find it),
C and D are numbers only `lookup` returns, and the product needs `calculate`. The question keeps
its checkable answer (`Question.check`).

Tasks (a world, its toolbox and one question) are made in `tasks.py`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPLITS = ("train", "eval")
EVAL_POOL = 500  # evaluation tasks eval:0..EVAL_POOL-1 are never written as training data

_SYLLABLES = (
    "ka lo ven dra mi tor sel ba rin qua zan el or thi mar nu pex gal sol ur vy ke dom fa "
    "bel cor dun esh jor lek mo nar pol ras sim tav ul wen yor zed hal fen gro"
).split()
_COMPANY_SUFFIX = ("Works", "Labs", "Holdings", "Group", "Systems", "Trading")
CLIMATES = ("arid", "temperate", "tropical", "polar")
SECTORS = ("mining", "software", "shipping", "textiles", "farming")
PROFESSIONS = ("engineer", "painter", "physician", "composer", "sailor")

# kind -> numeric field -> (low, high) inclusive
NUMERIC: dict[str, dict[str, tuple[int, int]]] = {
    "city": {"population": (2000, 90000), "area": (20, 900), "founded": (1200, 1990), "elevation": (0, 3000)},
    "company": {"employees": (20, 5000), "revenue": (1, 900), "founded": (1850, 2020)},
    "person": {"age": (20, 80), "salary": (20, 200), "height": (150, 200)},
}
# kind -> categorical/relation fields a question may constrain
CATEGORICAL: dict[str, tuple[str, ...]] = {
    "city": ("country", "climate"),
    "company": ("sector", "headquarters"),
    "person": ("profession", "birthplace", "employer"),
}
# how a constraint reads in a question
PHRASE = {
    "country": "is in {v}",
    "climate": "has {a} climate",
    "sector": "is in the {v} sector",
    "headquarters": "is headquartered in {v}",
    "profession": "is {a}",
    "birthplace": "was born in {v}",
    "employer": "works for {v}",
}
COUNTS = {"country": 3, "city": 12, "company": 10, "person": 12}


def article(word: object) -> str:
    w = str(word)
    return f"{'an' if w[:1].lower() in 'aeiou' else 'a'} {w}"


@dataclass
class Entity:
    name: str
    kind: str
    fields: dict[str, str | int]

    def description(self) -> str:
        """The text `search` indexes and returns: the categorical facts, never the numbers."""
        f = self.fields
        if self.kind == "city":
            return f"{self.name} is {article(f['climate'])} city in {f['country']}."
        if self.kind == "company":
            return f"{self.name} is {article(f['sector'])} company headquartered in {f['headquarters']}."
        who = f"{article(f['profession'])} born in {f['birthplace']}"
        return f"{self.name} is {who} who works for {f['employer']}."


@dataclass
class World:
    entities: list[Entity]
    by_name: dict[str, Entity] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {e.name.casefold(): e for e in self.entities}

    def get(self, name: str) -> Entity | None:
        return self.by_name.get(" ".join(name.split()).casefold())


@dataclass
class Question:
    text: str
    kind: str
    constraints: dict[str, str]  # field -> value that singles out the entity
    product: tuple[str, str]  # the two numeric fields to multiply
    entity: str  # the answer's entity
    value: int  # the answer's number

    def check(self, answer: object) -> bool:
        """An answer is {"entity": name, "value": number}; names compare case- and space-insensitively."""
        if not isinstance(answer, dict):
            return False
        name, value = answer.get("entity"), answer.get("value")
        if not isinstance(name, str) or isinstance(value, bool):
            return False
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        same = " ".join(name.split()).casefold() == self.entity.casefold()
        return same and abs(v - self.value) <= 1e-6 * max(1.0, abs(self.value))


@dataclass
class Task:
    split: str
    seed: str
    world: World
    question: Question

    @property
    def id(self) -> str:
        return f"{self.split}:{self.seed}"


def _names(rng: random.Random, n: int, used: set[str], syllables: tuple[int, int] = (2, 3)) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables))).capitalize()
        if name.casefold() not in used and len(name) >= 4:
            used.add(name.casefold())
            out.append(name)
    return out


def make_world(rng: random.Random) -> World:
    """Countries, cities in them, companies headquartered in cities, people born in cities who
    work for companies. Every name word is unique in the world, so no name shadows another."""
    used: set[str] = set()
    countries = _names(rng, COUNTS["country"], used)

    def numbers(kind: str) -> dict[str, int]:
        return {f: rng.randint(lo, hi) for f, (lo, hi) in NUMERIC[kind].items()}

    cities = [
        Entity(
            n, "city", {"country": rng.choice(countries), "climate": rng.choice(CLIMATES), **numbers("city")}
        )
        for n in _names(rng, COUNTS["city"], used)
    ]
    companies = [
        Entity(
            f"{n} {rng.choice(_COMPANY_SUFFIX)}",
            "company",
            {"sector": rng.choice(SECTORS), "headquarters": rng.choice(cities).name, **numbers("company")},
        )
        for n in _names(rng, COUNTS["company"], used)
    ]
    firsts, lasts = _names(rng, COUNTS["person"], used, (2, 2)), _names(rng, COUNTS["person"], used)
    people = [
        Entity(
            f"{a} {b}",
            "person",
            {
                "profession": rng.choice(PROFESSIONS),
                "birthplace": rng.choice(cities).name,
                "employer": rng.choice(companies).name,
                **numbers("person"),
            },
        )
        for a, b in zip(firsts, lasts, strict=True)
    ]
    return World(cities + companies + people)


def search_query(kind: str, constraints: dict[str, str]) -> str:
    """The query the scripted solver sends: the kind and the constrained values."""
    return " ".join([kind, *constraints.values()])


def make_question(world: World, rng: random.Random, found) -> Question:
    """A question with exactly one answer whose entity `found(query, name)` retrieves.

    `found` is the search check (the toolbox's BM25 top-k), passed in so the world stays free
    of the retrieval library."""
    for _ in range(1000):
        target = rng.choice(world.entities)
        kind = target.kind
        pair = sorted(rng.sample(CATEGORICAL[kind], 2), key=CATEGORICAL[kind].index)
        cons = {f: str(target.fields[f]) for f in pair}
        matches = [
            e for e in world.entities if e.kind == kind and all(str(e.fields[f]) == cons[f] for f in cons)
        ]
        if len(matches) != 1 or not found(search_query(kind, cons), target.name):
            continue
        c, d = rng.sample(sorted(NUMERIC[kind]), 2)
        parts = " and ".join(PHRASE[f].format(v=v, a=article(v)) for f, v in cons.items())
        its = "their" if kind == "person" else "its"
        text = f"Which {kind} {parts}, and what is {its} {c} × {d}?"
        value = int(target.fields[c]) * int(target.fields[d])
        return Question(text, kind, cons, (c, d), target.name, value)
    raise RuntimeError("no uniquely answerable question found in 1000 tries (world too small?)")
