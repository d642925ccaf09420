"""tiny-gsm8k: short arithmetic word problems in GSM8K's own format, made here.

The trained tiny models learn this task, so that an accuracy check on them means
something: a model that knows the task answers almost every question, and a
gross numerics fault (e.g. an FP8 hand-off that drops its scale: exact match 0) shows
up as a drop in exact match instead of hiding among the coin flips of a random-weight
model. Subtler faults (scales read in the wrong layout) keep the answers and show in
exact fused-vs-unfused parity instead.

Every problem is a dict with GSM8K's schema: ``question`` and ``answer``, the answer
being worked steps in GSM8K's style (``48/2 = <<48/2=24>>24``) and a last line
``#### N``. Answers are computed while the problem is written, so they are right by
construction (``check_answer`` recomputes every step from the text).

The templates (see ``TEMPLATES``) take 1 to 4 operations (+, -, *, /) on small whole
numbers: products of factors up to 12, exact divisions, sums under 1000, never a
negative result, so a model of a few million parameters can learn them.

    write_dataset(folder, seed=0)   # train.jsonl (7473 rows) + test.jsonl (1319 rows)

The split sizes are GSM8K's. Test and train questions are disjoint (as text); so is
any training stream made with :func:`problems` and ``exclude=`` the test questions.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TRAIN_SIZE = 7473
TEST_SIZE = 1319
DEFAULT_SEED = 0

_NAMES = (
    "Ada Ben Cleo Dan Eva Finn Gus Hana Ivan Jia Kai Lena Max Nora Omar Pia Raj Sara "
    "Tom Uma Vik Wen Yara Zoe Alma Bo Cruz Dina Eli Faye Gia Hugo Iris Jon Kira Leo "
    "Mia Ned Ola Paz Quin Rosa Sam Tara Ugo Vera Wes Xena Yuri Zane"
).split()
_ITEMS = (
    "apples",
    "books",
    "coins",
    "pencils",
    "cookies",
    "stamps",
    "marbles",
    "cards",
    "flowers",
    "shells",
    "stickers",
    "buttons",
    "candies",
    "toys",
    "eggs",
    "rocks",
)
_THINGS = ("lamp", "kite", "hat", "ball", "bag", "game", "scarf", "clock", "puzzle", "basket")
_TREES = ("apple trees", "pine trees", "rose bushes", "tomato plants", "sunflowers", "oak trees")
_PLACES = ("at the market", "at the fair", "from a friend", "at the shop", "in the park", "at school")


class _Writer:
    """Collects GSM8K-style steps: each ``op`` writes ``a*b = <<a*b=c>>c`` and returns c."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def op(self, a: int, sym: str, b: int) -> tuple[str, int]:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[sym]
        if sym == "/":
            assert a % b == 0, (a, b)
        assert value >= 0, (a, sym, b)
        return f"{a}{sym}{b} = <<{a}{sym}{b}={value}>>{value}", value

    def line(self, text: str) -> None:
        self.lines.append(text)

    def answer(self, value: int) -> str:
        return "\n".join(self.lines + [f"#### {value}"])


# --- templates: rng -> (question, answer) --------------------------------------------


def _buy_more(r: random.Random) -> tuple[str, str]:
    name, item, place = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_PLACES)
    a, b = r.randint(2, 60), r.randint(2, 40)
    w = _Writer()
    expr, total = w.op(a, "+", b)
    w.line(f"{name} has {expr} {item} now.")
    q = f"{name} has {a} {item}. {name} gets {b} more {item} {place}. How many {item} does {name} have now?"
    return q, w.answer(total)


def _give_away(r: random.Random) -> tuple[str, str]:
    name, other, item = *r.sample(_NAMES, 2), r.choice(_ITEMS)
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    w = _Writer()
    expr, left = w.op(a, "-", b)
    w.line(f"{name} has {expr} {item} left.")
    q = f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} does {name} have left?"
    return q, w.answer(left)


def _boxes_give(r: random.Random) -> tuple[str, str]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    n, k = r.randint(2, 12), r.randint(2, 12)
    g = r.randint(1, n * k - 1)
    w = _Writer()
    expr, total = w.op(n, "*", k)
    w.line(f"{name} has {expr} {item} in the boxes.")
    expr, left = w.op(total, "-", g)
    w.line(f"After giving away {g}, {name} has {expr} {item} left.")
    q = (
        f"{name} has {n} boxes with {k} {item} in each box. {name} gives away {g} {item}. "
        f"How many {item} does {name} have left?"
    )
    return q, w.answer(left)


def _share_then_find(r: random.Random) -> tuple[str, str]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    k, each = r.randint(2, 10), r.randint(2, 12)
    b = r.randint(1, 30)
    w = _Writer()
    expr, share = w.op(k * each, "/", k)
    w.line(f"Each friend gets {expr} {item}.")
    expr, now = w.op(share, "+", b)
    w.line(f"Each friend then has {expr} {item}.")
    q = (
        f"{name} shares {k * each} {item} equally among {k} friends. Then each friend finds {b} more "
        f"{item}. How many {item} does each friend have now?"
    )
    return q, w.answer(now)


def _save_spend(r: random.Random) -> tuple[str, str]:
    name, thing = r.choice(_NAMES), r.choice(_THINGS)
    a, d = r.randint(2, 12), r.randint(2, 12)
    s = r.randint(1, a * d - 1)
    w = _Writer()
    expr, saved = w.op(a, "*", d)
    w.line(f"{name} saves {expr} dollars.")
    expr, left = w.op(saved, "-", s)
    w.line(f"After buying the {thing}, {name} has {expr} dollars left.")
    q = (
        f"{name} saves {a} dollars every day for {d} days and then spends {s} dollars on a {thing}. "
        f"How many dollars does {name} have left?"
    )
    return q, w.answer(left)


def _compare_three(r: random.Random) -> tuple[str, str]:
    a_name, b_name, c_name = r.sample(_NAMES, 3)
    item = r.choice(_ITEMS)
    a, more = r.randint(2, 30), r.randint(1, 20)
    w = _Writer()
    expr, b = w.op(a, "+", more)
    w.line(f"{b_name} has {expr} {item}.")
    expr, c = w.op(b, "*", 2)
    w.line(f"{c_name} has {expr} {item}.")
    expr, ab = w.op(a, "+", b)
    w.line(f"{a_name} and {b_name} have {expr} {item}.")
    expr, total = w.op(ab, "+", c)
    w.line(f"Together they have {expr} {item}.")
    q = (
        f"{a_name} has {a} {item}. {b_name} has {more} more {item} than {a_name}. {c_name} has twice "
        f"as many {item} as {b_name}. How many {item} do they have together?"
    )
    return q, w.answer(total)


def _change(r: random.Random) -> tuple[str, str]:
    name, thing = r.choice(_NAMES), r.choice(_THINGS)
    p, n = r.randint(2, 12), r.randint(2, 9)
    pay = r.choice([m for m in (10, 20, 50, 100, 200) if m > p * n])
    w = _Writer()
    expr, cost = w.op(p, "*", n)
    w.line(f"The {thing}s cost {expr} dollars.")
    expr, change = w.op(pay, "-", cost)
    w.line(f"{name} gets {expr} dollars in change.")
    q = (
        f"A {thing} costs {p} dollars. {name} buys {n} of them and pays with {pay} dollars. "
        f"How many dollars of change does {name} get?"
    )
    return q, w.answer(change)


def _pages_left(r: random.Random) -> tuple[str, str]:
    name = r.choice(_NAMES)
    per_day, days = r.randint(2, 12), r.randint(2, 10)
    pages = per_day * days + r.randint(1, 150)
    w = _Writer()
    expr, read = w.op(per_day, "*", days)
    w.line(f"{name} reads {expr} pages.")
    expr, left = w.op(pages, "-", read)
    w.line(f"There are {expr} pages left.")
    q = (
        f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. "
        f"How many pages are left to read?"
    )
    return q, w.answer(left)


def _garden_rows(r: random.Random) -> tuple[str, str]:
    tree = r.choice(_TREES)
    rows, cols = r.randint(2, 12), r.randint(2, 12)
    cut = r.randint(1, rows * cols - 1)
    new = r.randint(1, 40)
    w = _Writer()
    expr, total = w.op(rows, "*", cols)
    w.line(f"The garden has {expr} {tree}.")
    expr, left = w.op(total, "-", cut)
    w.line(f"After {cut} are removed, {expr} are left.")
    expr, now = w.op(left, "+", new)
    w.line(f"With the new ones there are {expr} {tree}.")
    q = (
        f"A garden has {rows} rows of {cols} {tree}. {cut} of them are removed and {new} new ones are "
        f"planted. How many {tree} are in the garden now?"
    )
    return q, w.answer(now)


def _half_then_more(r: random.Random) -> tuple[str, str]:
    name = r.choice(_NAMES)
    n, m = 2 * r.randint(2, 40), r.randint(2, 40)
    w = _Writer()
    expr, half = w.op(n, "/", 2)
    w.line(f"{name} has {expr} cookies after eating half.")
    expr, now = w.op(half, "+", m)
    w.line(f"After baking more, {name} has {expr} cookies.")
    q = (
        f"{name} bakes {n} cookies and eats half of them. Then {name} bakes {m} more cookies. "
        f"How many cookies does {name} have now?"
    )
    return q, w.answer(now)


def _trips(r: random.Random) -> tuple[str, str]:
    name = r.choice(_NAMES)
    per_trip, trips = r.randint(2, 12), r.randint(2, 9)
    start = r.randint(1, 50)
    w = _Writer()
    expr, carried = w.op(per_trip, "*", trips)
    w.line(f"{name} carries {expr} bricks.")
    expr, total = w.op(start, "+", carried)
    w.line(f"The pile now has {expr} bricks.")
    q = (
        f"A pile has {start} bricks. {name} adds {per_trip} bricks on each trip and makes {trips} trips. "
        f"How many bricks are in the pile now?"
    )
    return q, w.answer(total)


TEMPLATES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "buy_more": _buy_more,
    "give_away": _give_away,
    "boxes_give": _boxes_give,
    "share_then_find": _share_then_find,
    "save_spend": _save_spend,
    "compare_three": _compare_three,
    "change": _change,
    "pages_left": _pages_left,
    "garden_rows": _garden_rows,
    "half_then_more": _half_then_more,
    "trips": _trips,
}


# --- streams and files ---------------------------------------------------------------


def problems(seed: int, exclude: Iterable[str] = ()) -> Iterator[dict[str, str]]:
    """An endless stream of distinct problems ``{"question", "answer"}`` for ``seed``,
    skipping any whose question is in ``exclude``. Deterministic per seed."""
    rng = random.Random(f"tiny-gsm8k/{seed}")
    names = sorted(TEMPLATES)
    seen = set(exclude)
    while True:
        question, answer = TEMPLATES[rng.choice(names)](rng)
        if question in seen:
            continue
        seen.add(question)
        yield {"question": question, "answer": answer}


def split(
    seed: int = DEFAULT_SEED, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) rows: the test rows are the stream's first ``test_size`` problems,
    the train rows the next ``train_size`` (distinct questions, so the two are disjoint)."""
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    stream = problems(seed)
    test = [next(stream) for _ in range(test_size)]
    train = [next(stream) for _ in range(train_size)]
    return train, test


def write_dataset(
    out_dir: str | Path, seed: int = DEFAULT_SEED, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (GSM8K's schema) into ``out_dir``."""
    train, test = split(seed, train_size, test_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("test", test)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    return paths


def final_answer(answer: str) -> int:
    """The number after ``####`` (GSM8K's convention)."""
    m = re.search(r"####\s*(-?\d+)\s*$", answer)
    if m is None:
        raise ValueError(f"answer has no final '#### N' line: {answer!r}")
    return int(m.group(1))


_STEP = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def check_answer(answer: str) -> bool:
    """Recompute every ``<<a op b=c>>c`` step of an answer: True if all hold and the
    last step's value is the final answer."""
    steps = _STEP.findall(answer)
    if not steps:
        return False
    for a, sym, b, c, shown in steps:
        a_, b_, c_ = int(a), int(b), int(c)
        expected = {"+": a_ + b_, "-": a_ - b_, "*": a_ * b_, "/": a_ // b_ if b_ else -1}[sym]
        if sym == "/" and (b_ == 0 or a_ % b_):
            return False
        if c_ != expected or shown != c:
            return False
    return int(steps[-1][3]) == final_answer(answer)


# --- prompts in lm-eval's GSM8K format -------------------------------------------------


def fewshot_prompt(question: str, shots: Iterable[dict[str, str]]) -> str:
    """The prompt lm-eval's stock ``gsm8k`` task sends: each shot as
    ``Question: q\\nAnswer: a`` joined by a blank line, then the question."""
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def corpus_lines(seed: int = DEFAULT_SEED, count: int = 20000) -> Iterator[str]:
    """Text to learn a tokenizer's merges from: the task's own questions and answers in
    the few-shot format and in a chat transcript's words (the chat markup's special
    tokens are single tokens anyway)."""
    stream = problems(seed + 1_000_003)
    for i in range(count):
        p = next(stream)
        if i % 5 == 0:
            yield f"user\n{p['question']}\nassistant\n{p['answer']}\n"
        else:
            yield f"Question: {p['question']}\nAnswer: {p['answer']}\n\n"
