"""Circuit-discovery tasks, built offline from templates and the model's tokenizer.

A task is a batch of clean prompts, corrupted prompts of the same length that differ from them
only where the task says (the names for ``ioi``, the first copy for ``induction``, the year's
tens digit for ``greater_than``), and a linear metric of the last position's logits or
probabilities that is positive where the model prefers the right answer: a circuit search
patches activations between the two runs and watches the metric move.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from lensspace.errors import LensspaceError

TASKS = ("ioi", "induction", "greater_than")

NAMES = (
    "Mary", "John", "James", "Robert", "Michael", "William", "David", "Richard", "Joseph",
    "Thomas", "Charles", "Daniel", "Matthew", "Mark", "Paul", "Steven", "Andrew", "Kevin",
    "Brian", "George", "Edward", "Jason", "Jeff", "Ryan", "Jacob", "Eric", "Peter", "Adam",
    "Henry", "Frank", "Scott", "Sam", "Alex", "Jack", "Tom", "Luke", "Patricia", "Jennifer",
    "Linda", "Elizabeth", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Nancy", "Sandra",
    "Emily", "Anna", "Laura", "Amy", "Rachel", "Emma", "Kate", "Alice", "Grace", "Rose",
    "Helen", "Julia", "Lucy",
)  # fmt: skip
PLACES = (
    "store", "park", "school", "hospital", "station", "restaurant", "garden", "office",
    "market", "house", "church", "library", "beach", "hotel", "museum",
)  # fmt: skip
OBJECTS = (
    "drink", "book", "ring", "bone", "snack", "letter", "gift", "bag", "cup", "ball", "card",
    "key", "basket", "computer", "necklace",
)  # fmt: skip
# ``{a}`` and ``{b}`` are the pair, ``{s}`` the subject who gives; the answer is the other one
IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "While {a} and {b} were at the {place}, {s} gave a {obj} to",
    "When {a} and {b} got to the {place}, {s} handed a {obj} to",
)
EVENTS = ("war", "expedition", "reign", "treaty", "siege", "voyage", "drought", "famine")
GREATER_THAN = "The {event} lasted from the year 17{tens}{units} to the year 17"


@dataclass(frozen=True)
class TaskSettings:
    """How many prompts, the seed, and the length of the induction task's random first copy."""

    n_prompts: int = 32
    seed: int = 0
    induction_half_len: int = 8

    @classmethod
    def from_params(cls, section: dict, seed: int = 0) -> TaskSettings:
        """From the config's ``circuit_search`` block."""
        return cls(section["n_prompts"], seed, section["induction_half_len"])


@dataclass(frozen=True)
class Task:
    """Clean and corrupted prompts [n, T] and the metric's weights [n, vocab] of one task.

    The metric is ``sum_v weights[b, v] * score[b, v]`` with ``score`` the last position's logits
    (``kind`` "logit") or their softmax ("probability"). ``texts`` and ``answers`` are the decoded
    clean prompts and right answers, for the record.
    """

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    weights: torch.Tensor
    kind: str
    texts: tuple[str, ...]
    answers: tuple[str, ...]

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """[n] metric of the last position's logits [n, vocab]: > 0 where the right answer wins."""
        score = logits.float()
        if self.kind == "probability":
            score = score.softmax(-1)
        return (score * self.weights.to(score.device)).sum(-1)

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        """[n] bool: the model prefers the right answer (the metric is positive)."""
        return self.metric(logits) > 0

    def top1(self, logits: torch.Tensor) -> torch.Tensor:
        """[n] bool: the model's most likely next token is a right answer."""
        best = logits.argmax(-1, keepdim=True)
        return self.weights.to(best.device).gather(-1, best)[:, 0] > 0


def make_task(name: str, tokenizer, vocab_size: int, settings: TaskSettings) -> Task:
    """Task ``name`` (one of ``TASKS``) over ``tokenizer``, its weights ``vocab_size`` wide."""
    builders = {"ioi": _ioi, "induction": _induction, "greater_than": _greater_than}
    if name not in builders:
        raise LensspaceError(f"unknown circuit task {name!r}: choose from {', '.join(TASKS)}")
    return builders[name](tokenizer, vocab_size, settings)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _word_token(tokenizer, word: str) -> int | None:
    """The token of ``word`` with its leading space after another word; None where it takes
    several."""
    before = _encode(tokenizer, "the")
    after = _encode(tokenizer, f"the {word}")
    return after[-1] if len(after) == len(before) + 1 and after[:-1] == before else None


def _single_tokens(tokenizer, words: tuple[str, ...]) -> dict[str, int]:
    """The words that are one token with a leading space, and that token."""
    tokens = {word: _word_token(tokenizer, word) for word in words}
    return {word: token for word, token in tokens.items() if token is not None}


def _most_common_length(tokenizer, texts: list[str]) -> list[int]:
    """Indices of the texts whose token length is the most common one (the first text's on a
    tie)."""
    lengths = [len(_encode(tokenizer, text)) for text in texts]
    common = Counter(lengths).most_common(1)[0][0]
    return [i for i, length in enumerate(lengths) if length == common]


def _stack(
    name: str, clean: list[list[int]], corrupt: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted prompts as [n, T] long tensors: every prompt must have one length."""
    lengths = sorted({len(row) for row in clean + corrupt})
    if len(lengths) > 1:
        raise LensspaceError(
            f"circuit task {name}: its prompts tokenize to different lengths {lengths} with this "
            f"tokenizer; drop {name!r} from circuit_search.tasks"
        )
    return torch.tensor(clean), torch.tensor(corrupt)


def _weights(
    name: str, n: int, vocab_size: int, entries: list[tuple[int, int, float]]
) -> torch.Tensor:
    """[n, vocab_size] float32 with ``weights[row, token] = value`` for each entry."""
    top = max(token for _, token, _ in entries)
    if top >= vocab_size:
        raise LensspaceError(
            f"circuit task {name}: token {top} is beyond the model's {vocab_size} logits; "
            "the tokenizer does not match the model"
        )
    weights = torch.zeros(n, vocab_size)
    for row, token, value in entries:
        weights[row, token] = value
    return weights


def _ioi(tokenizer, vocab_size: int, settings: TaskSettings) -> Task:
    """Indirect object identification: "When Mary and John went to the store, John gave a drink
    to" -> " Mary" rather than " John"; corrupted with three other names in the name slots."""
    names = _single_tokens(tokenizer, NAMES)
    places = list(_single_tokens(tokenizer, PLACES))
    objects = list(_single_tokens(tokenizer, OBJECTS))
    if len(names) < 5 or not places or not objects:
        raise LensspaceError(
            "circuit task ioi needs first names that are one token with a leading space (5: two "
            "per prompt, three others for its corruption), and a place and an object likewise; "
            f"this tokenizer has {len(names) or 'no'} single-token names, {len(places)} places "
            f"and {len(objects)} objects: drop 'ioi' from circuit_search.tasks"
        )
    pool = list(names)
    sample = dict(a=pool[0], b=pool[1], s=pool[1], place=places[0], obj=objects[0])
    templates = [
        IOI_TEMPLATES[i]
        for i in _most_common_length(tokenizer, [t.format(**sample) for t in IOI_TEMPLATES])
    ]
    rng = random.Random(settings.seed)
    clean, corrupt, texts, answers, entries = [], [], [], [], []
    for row in range(settings.n_prompts):
        io, s, *others = rng.sample(pool, 5)
        template, place, obj = rng.choice(templates), rng.choice(places), rng.choice(objects)
        first, second = (io, s) if row % 2 == 0 else (s, io)  # ABBA, then BABA
        text = template.format(a=first, b=second, s=s, place=place, obj=obj)
        clean.append(_encode(tokenizer, text))
        corrupt.append(
            _encode(
                tokenizer,
                template.format(a=others[0], b=others[1], s=others[2], place=place, obj=obj),
            )
        )
        texts.append(text)
        answers.append(tokenizer.decode([names[io]]))
        entries += [(row, names[io], 1.0), (row, names[s], -1.0)]
    clean_ids, corrupt_ids = _stack("ioi", clean, corrupt)
    return Task(
        name="ioi",
        clean=clean_ids,
        corrupt=corrupt_ids,
        weights=_weights("ioi", settings.n_prompts, vocab_size, entries),
        kind="logit",
        texts=tuple(texts),
        answers=tuple(answers),
    )


def _induction(tokenizer, vocab_size: int, settings: TaskSettings) -> Task:
    """Induction: random tokens A then A again without its last token -> A's last token; the
    corrupted prompt's first half is other random tokens B, so there is nothing to copy."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pool = torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    half = settings.induction_half_len
    if not 2 <= half <= len(pool) // 2:
        raise LensspaceError(
            f"circuit task induction: induction_half_len is {half}; it must be at least 2 and "
            f"at most {len(pool) // 2} (half the tokenizer's {len(pool)} ordinary tokens)"
        )
    gen = torch.Generator().manual_seed(settings.seed)
    # A and B: 2 * half distinct tokens, so neither repeats within itself and A[-1] != B[-1]
    drawn = torch.stack(
        [
            pool[torch.randperm(len(pool), generator=gen)[: 2 * half]]
            for _ in range(settings.n_prompts)
        ]
    )
    first, other = drawn[:, :half], drawn[:, half:]
    clean = torch.cat([first, first[:, :-1]], dim=1)
    entries = [(row, int(first[row, -1]), 1.0) for row in range(settings.n_prompts)]
    entries += [(row, int(other[row, -1]), -1.0) for row in range(settings.n_prompts)]
    return Task(
        name="induction",
        clean=clean,
        corrupt=torch.cat([other, first[:, :-1]], dim=1),
        weights=_weights("induction", settings.n_prompts, vocab_size, entries),
        kind="logit",
        texts=tuple(tokenizer.decode(row) for row in clean.tolist()),
        answers=tuple(tokenizer.decode([int(token)]) for token in first[:, -1]),
    )


def _greater_than(tokenizer, vocab_size: int, settings: TaskSettings) -> Task:
    """Greater-than: "The war lasted from the year 1732 to the year 17" -> a tens digit above 3;
    the corrupted year is 170u, after which no tens digit is ruled out."""
    digits = [_encode(tokenizer, str(k)) for k in range(10)]
    if any(len(ids) != 1 for ids in digits):
        raise LensspaceError(
            "circuit task greater_than: the tokenizer does not have every digit 0-9 as one token, "
            "so the tens digit of a year is no single next token; drop 'greater_than' from "
            "circuit_search.tasks"
        )
    digit = [ids[0] for ids in digits]
    sample = dict(tens=3, units=2)
    events = [
        EVENTS[i]
        for i in _most_common_length(
            tokenizer, [GREATER_THAN.format(event=e, **sample) for e in EVENTS]
        )
    ]
    rng = random.Random(settings.seed)
    clean, corrupt, texts, answers, entries = [], [], [], [], []
    for row in range(settings.n_prompts):
        event, tens, units = rng.choice(events), rng.randint(2, 8), rng.randint(0, 9)
        text = GREATER_THAN.format(event=event, tens=tens, units=units)
        ids = _encode(tokenizer, text)
        other = _encode(tokenizer, GREATER_THAN.format(event=event, tens=0, units=units))
        changed = [i for i, (x, y) in enumerate(zip(ids, other)) if x != y]
        year = [digit[1], digit[7], digit[tens], digit[units]]
        if (
            len(ids) != len(other)
            or len(changed) != 1
            or ids[changed[0] - 2 : changed[0] + 2] != year
            or ids[-2:] != year[:2]
        ):
            raise LensspaceError(
                f"circuit task greater_than: the tokenizer does not split the year 17{tens}{units} "
                "into single-digit tokens, so the tens digit is not the next token after "
                "'the year 17'; drop 'greater_than' from circuit_search.tasks"
            )
        clean.append(ids)
        corrupt.append(other)
        texts.append(text)
        answers.append(",".join(tokenizer.decode([digit[k]]) for k in range(tens + 1, 10)))
        entries += [(row, digit[k], 1.0) for k in range(tens + 1, 10)]
        entries += [(row, digit[k], -1.0) for k in range(tens)]
    clean_ids, corrupt_ids = _stack("greater_than", clean, corrupt)
    return Task(
        name="greater_than",
        clean=clean_ids,
        corrupt=corrupt_ids,
        weights=_weights("greater_than", settings.n_prompts, vocab_size, entries),
        kind="probability",
        texts=tuple(texts),
        answers=tuple(answers),
    )
