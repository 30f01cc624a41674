"""In-context-learning tasks: word pairs, and the prompts Todd et al. (2024) build from them.

A task is a JSON file of the shape lenscope ships (``lenscope/data/icl_tasks/*.json``, written by
the project, MIT like the rest)::

    {"name": "antonyms", "description": "...", "pairs": [["hot", "cold"], ["up", "down"], ...]}

Prompts follow the function-vector paper's code (REFERENCE.md §D): each example is
"Q: x\\nA: y\\n\\n", the query "Q: x\\nA:", and the answer is the first token of " y". No token is
prepended (the paper adds GPT-J's ``<|endoftext|>``; the embedded model's BOS is a chat marker).

The pairs are split once, seeded: the test pairs are only ever queries of the zero-shot and the
ICL-reference prompts; the others give the demonstrations and the queries of the prompts that the
means and the indirect effects are taken over.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lenscope.errors import ConfigError
from lenscope.patchscopes.data import read_json


@dataclass(frozen=True)
class IclTask:
    name: str
    description: str
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class IclPrompt:
    text: str
    answer: str
    """The expected output word (its first token, with a space before it, is what is scored)."""
    query: str


def shipped_tasks() -> list[str]:
    """Names of the tasks lenscope ships."""
    folder = resources.files("lenscope") / "data" / "icl_tasks"
    return sorted(Path(str(p)).stem for p in folder.iterdir() if str(p).endswith(".json"))


def load_task(name_or_path: str | Path) -> IclTask:
    """A shipped task by name (``antonyms``) or a task file by path; a malformed file is refused in
    one line naming the entry and the fix."""
    text = str(name_or_path)
    if text in shipped_tasks():
        path, raw = read_json(None, f"icl_tasks/{text}.json", "task")
    elif text.endswith(".json") or Path(text).exists():
        path, raw = read_json(text, "", "task")
    else:
        raise ConfigError(f"no task {text!r}: give a shipped task ({', '.join(shipped_tasks())}) or a JSON file "
                          '{"name": ..., "pairs": [["input", "output"], ...]}')
    pairs = raw.get("pairs") if isinstance(raw, dict) else None
    if not isinstance(pairs, list):
        raise ConfigError(f"task {path} needs a 'pairs' list of [input, output] pairs")
    if not pairs:
        raise ConfigError(f"task {path} has no pairs: give at least a few [input, output] pairs")
    clean = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(w, str) and w.strip() for w in pair)):
            raise ConfigError(f"task {path}: pair {i} is {pair!r}; each pair must be [input, output], two non-empty texts")
        clean.append((pair[0].strip(), pair[1].strip()))
    return IclTask(str(raw.get("name") or Path(path).stem), str(raw.get("description", "")), tuple(clean))


def example(x: str, y: str) -> str:
    return f"Q: {x}\nA: {y}\n\n"


def query(x: str) -> str:
    return f"Q: {x}\nA:"


@dataclass
class TaskPrompts:
    """Every prompt of one task for one seed."""

    task: IclTask
    n_shots: int
    clean: list[IclPrompt]
    """N train demonstrations and a train query: the prompts means are taken over."""
    shuffled: list[IclPrompt]
    """The same prompts with the demonstrations' outputs permuted among them (the query unchanged):
    where the indirect effects are measured."""
    zero_shot: list[IclPrompt]
    """One per test pair: the query alone."""
    icl: list[IclPrompt]
    """One per test pair: N train demonstrations, then the test query (the ICL reference)."""


def build_prompts(task: IclTask, n_shots: int = 10, n_prompts: int = 50, test_share: float = 0.3,
                  seed: int = 0) -> TaskPrompts:
    """Seeded prompts of a task: ``n_prompts`` clean (and their shuffled twins), and a zero-shot and
    an ICL prompt per test pair."""
    if n_shots < 1:
        raise ConfigError(f"--n_shots must be at least 1, got {n_shots}")
    if n_prompts < 1:
        raise ConfigError(f"--n_prompts must be at least 1, got {n_prompts}")
    if not 0 < test_share < 1:
        raise ConfigError(f"--test_share must be between 0 and 1, got {test_share}")
    # One generator per kind of prompt: the test queries' demonstrations do not move when
    # --n_prompts changes, nor the split.
    split, draws, tests = (random.Random(f"{seed}/{kind}") for kind in ("split", "clean", "test"))
    pairs = list(task.pairs)
    split.shuffle(pairs)
    n_test = max(1, round(test_share * len(pairs)))
    test, train = pairs[:n_test], pairs[n_test:]
    if len(train) < n_shots + 1:
        raise ConfigError(f"task {task.name!r} has {len(pairs)} pairs: {len(train)} left after the test split, fewer than "
                          f"--n_shots {n_shots} + 1 query; lower --n_shots or --test_share, or add pairs")
    clean, shuffled = [], []
    for _ in range(n_prompts):
        *demos, (qx, qy) = draws.sample(train, n_shots + 1)
        outputs = [y for _, y in demos]
        draws.shuffle(outputs)
        clean.append(IclPrompt("".join(example(x, y) for x, y in demos) + query(qx), qy, qx))
        shuffled.append(IclPrompt("".join(example(x, y) for (x, _), y in zip(demos, outputs, strict=True)) + query(qx), qy, qx))
    zero_shot = [IclPrompt(query(x), y, x) for x, y in test]
    icl = []
    for x, y in test:
        demos = tests.sample(train, n_shots)
        icl.append(IclPrompt("".join(example(dx, dy) for dx, dy in demos) + query(x), y, x))
    return TaskPrompts(task, n_shots, clean, shuffled, zero_shot, icl)
