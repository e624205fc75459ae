"""Bad inputs and faults, as a careless operator meets them: every one ends in one line
`mxd CMD: error: ...` (exit 2; 1 for a diverged run) without a traceback, and leaves what was
already written as it was (file hashes compared before and after); faults (kill -9, a full disk)
resume bit for bit.

Areas: CLI options, config files, corpus files, layer and checkpoint files, activation caches,
NaN/Inf, kill -9, disk full and read-only folders (tmpfs, as root), security (pickle, path
traversal, HTML escaping). Everything runs on a tiny random Llama, built once for the module.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxd
from tiny import tiny_model, tiny_tokenizer
from mxd.cli import main
from mxd.data import BUILTIN_SOURCES
from mxd.files import sha256

CTX = 32
STEPS = 20  # of the reference run: checkpoints every 5 steps, validation every 10


# --- the module's model, text, caches and reference run ------------------------------------------


def _harvest_args(w, out, *extra, split="train", tokens=64 * CTX, source=None):
    return ["harvest", "--model", w.model, "--source", source or w.text, "--context-len", CTX, "--layers", 1,
            "--max-tokens", tokens, "--chunk-tokens", 4 * CTX, "--batch-size", 8, "--split", split, "--out", out, *extra]


def _train_args(w, out, *extra, cache=None, val=None):
    return ["train", "--cache", cache or w.cache, "--val-cache", val or w.val, "--out", out,
            "--train-tokens", STEPS * 256, "--batch-tokens", 256, "--eval-every", 10, "--checkpoint-every", 5,
            "--log-every", 5, "--kind", "mxd", "--k", 4, "--expansion", 4, "--lr", "3e-3", "--warmup-steps", 2,
            "--keep-last", 2, *extra]


def _cli(*argv) -> int:
    """Exit status of `mxd ARGV` run in this process."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A tiny Llama folder, a text folder, a train cache (64 blocks in 16 chunks), a validation cache
    and a finished reference run on them, built once."""
    root = tmp_path_factory.mktemp("world")
    model = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = root / "text"
    text.mkdir()
    (text / "lee.txt").write_text("\n\n".join(d.strip() for d in BUILTIN_SOURCES["builtin:lee"].documents()))
    w = SimpleNamespace(root=root, model=str(model), text=str(text), cache=str(root / "cache"), val=str(root / "val"),
                        ref=root / "ref")
    assert _cli(*_harvest_args(w, w.cache)) == 0
    assert _cli(*_harvest_args(w, w.val, split="validation", tokens=16 * CTX)) == 0
    assert _cli(*_train_args(w, w.ref)) == 0
    return w


def hashes(*paths) -> dict[str, str]:
    """{path: sha256} of every file at or under `paths`."""
    found = {}
    for path in map(Path, paths):
        for p in sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []:
            if p.is_file():
                found[str(p)] = sha256(p)
    return found


def refused(capsys, argv, match, code=2) -> str:
    """Run `mxd ARGV`; assert exit `code`, no traceback and exactly one error line, the last one,
    `mxd CMD: error: ...` matching `match`; return that line."""
    status = _cli(*argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == code, err[-3000:]
    assert "Traceback" not in err and lines, err[-3000:]
    assert lines[-1].startswith(f"mxd {argv[0]}: error: ") and sum("error:" in line for line in lines) == 1, err[-3000:]
    assert re.search(match, lines[-1]), lines[-1]
    return lines[-1]


def final_weights(run) -> dict:
    return load_file(str(Path(run) / "final" / "model.safetensors"))


def assert_same_final(run, ref) -> None:
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def damaged_copy(src, dst, table: dict, case: str) -> tuple[Path, str, dict[str, str]]:
    """A copy of `src` at `dst` damaged by table[case]: (the copy, the expected message, its file hashes)."""
    folder = copy(src, dst)
    damage, match = table[case]
    damage(folder)
    return folder, match, hashes(folder)


def flip(path, offset=-10) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def edit_json(path, change) -> None:
    data = json.loads(Path(path).read_text())
    change(data)
    Path(path).write_text(json.dumps(data))


def rewrite_chunk(cache, index, change) -> None:
    """Apply change(tensors) to chunk `index` and record its new size and SHA-256, as if harvested so."""
    shard = Path(cache) / "shard-000.json"
    entry = json.loads(shard.read_text())["chunks"][index]
    path = Path(cache) / entry["file"]
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    edit_json(shard, lambda s: s["chunks"][index].update(bytes=path.stat().st_size, sha256=sha256(path)))


# --- CLI options: refused before anything is written -------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

TRAIN_OPTIONS = [
    (["--grad-clip", "-1"], r"grad_clip=-1.0 is invalid: must be >= 0"),
    (["--aux-k", "-1"], r"aux_k=-1 is invalid: must be >= 0"),
    (["--lr", "0"], r"lr=0.0 is invalid: must be > 0"),
    (["--lr-scale", "-2"], r"lr_scale=-2.0 is invalid"),
    (["--min-lr-ratio", "2"], r"min_lr_ratio=2.0 is invalid: must be in \[0, 1\]"),
    (["--warmup-steps", "-1"], r"warmup_steps=-1 is invalid"),
    (["--batch-tokens", "0"], r"batch_tokens=0 is invalid: must be >= 1"),
    (["--train-tokens", "100"], r"train_tokens=100 is too small for one step of batch_tokens=256"),
    (["--keep-last", "0"], r"keep_last=0 is invalid"),
    (["--eval-every", "0"], r"eval_every=0 is invalid"),
    (["--kind", "sae"], r"kind='sae' is invalid: valid values are mxd, transcoder, skip_transcoder"),
    (["--variant", "newest"], r"variant='newest' is invalid: valid values are paper, balanced"),
    (["--optimizer", "sgd"], r"optimizer='sgd' is invalid: valid values are adam, adamw, signum"),
    (["--decay", "step"], r"decay='step' is invalid"),
    (["--loss", "l1"], r"loss='l1' is invalid: valid values are nmse, token_nmse"),
    (["--placement", "everywhere"], r"placement='everywhere' is invalid"),
    (["--autocast", "fp16"], r"autocast='fp16' is invalid"),
    (["--model-dtype", "fp16"], r"model_dtype='fp16' is invalid: valid values are fp32, bf16"),
    (["--log-to", "mlflow"], r"log_to='mlflow' is invalid: valid values are tensorboard, wandb"),
    (["--layers", "2"], r"holds layers \[1\] of model .*, not layer 2"),
    (["--ks", "4", "4"], r"ks=\[4, 4\] is invalid: give distinct values"),
    (["--kind", "transcoder", "--k", "0"], r"k=0 is invalid for kind='transcoder'"),
    (["--expansion", "0"], r"expansion=0 is invalid"),
    (["--aux-coef", "-1"], r"aux_coef=-1.0 is invalid"),
    (["--balance-coef", "-0.5"], r"balance_coef=-0.5 is invalid"),
    (["--router", "hash"], r"router='hash' is invalid"),
    (["--coefficients", "abs"], r"coefficients='abs' is invalid"),
    (["--kind", "transcoder", "--sparsity", "l0"], r"sparsity='l0' is invalid"),
    (["--device", "foo"], r"device='foo' is invalid: valid values are cpu, cuda, cuda:N, mps"),
    pytest.param(["--device", "cuda"], r"device='cuda' is unavailable: this torch sees no CUDA GPU", marks=NO_CUDA),
    pytest.param(["--device", "cuda:3"], r"device='cuda:3' is unavailable", marks=NO_CUDA),
    (["--out", ""], r"out='' is invalid: give the folder to write"),
    (["--module-path", "model.layers.{layr}.mlp"], r"module_path='model.layers.\{layr\}.mlp' is invalid: the only placeholder"),
    (["--k", "four"], r"argument --k: invalid int value: 'four'"),
    (["--allow-partial", "yes"], r"unrecognized arguments: yes"),
]


@pytest.mark.parametrize("extra,match", TRAIN_OPTIONS)
def test_bad_train_option(w, tmp_path, capsys, extra, match):
    before = hashes(w.cache, w.val)
    refused(capsys, _train_args(w, tmp_path / "run", *extra), match)
    assert not (tmp_path / "run").exists() and hashes(w.cache, w.val) == before


TRAIN_PATHS = {  # case: (options replacing the defaults, given the world and tmp_path; the message)
    "out is the cache": (lambda w, t: dict(out=w.cache), r"out=.* is invalid: it is inside the activation cache"),
    "out inside the cache": (lambda w, t: dict(out=f"{w.cache}/runs/a"), r"out=.* is invalid: it is inside the activation cache"),
    "out is a file": (lambda w, t: dict(out=t / "file"), r"out=.* is invalid: it is a file, not a folder"),
    "no such cache": (lambda w, t: dict(cache=str(t / "nope")), r"manifest.json not found: .* is not an activation cache"),
    "cache is a text folder": (lambda w, t: dict(cache=w.text), r"is not an activation cache \(run mxd harvest\)"),
    "val cache is the train cache": (lambda w, t: dict(val=w.cache), r"holds the same split of the same data as the training cache"),
    "two sources": (lambda w, t: dict(extra=["--model", w.model]), r"give exactly one source: cache .* or model"),
    "val cache of another layer": (lambda w, t: dict(extra=["--layers", "0"]), r"holds layers \[1\] .* not layer 0"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_PATHS))
def test_bad_train_paths(w, tmp_path, capsys, case):
    (tmp_path / "file").write_text("not a folder")
    options, match = TRAIN_PATHS[case]
    kw = dict(out=tmp_path / "run", extra=[]) | options(w, tmp_path)
    before = hashes(w.cache, w.val, w.text, tmp_path / "file")
    refused(capsys, _train_args(w, kw.pop("out"), *kw.pop("extra"), **kw), match)
    assert not (tmp_path / "run").exists() and not Path(w.cache, "runs").exists()
    assert hashes(w.cache, w.val, w.text, tmp_path / "file") == before


HARVEST_OPTIONS = [
    (["--layers", "9"], r"layer 9 is out of range: the model has 3 layers \(0..2\)"),
    (["--layers", "1", "1"], r"layers=\[1, 1\] is invalid"),
    (["--context-len", "1"], r"context_len=1 is invalid"),
    (["--dtype", "fp8"], r"dtype='fp8' is invalid: valid values are fp32, bf16"),
    (["--model-dtype", "int8"], r"model_dtype='int8' is invalid"),
    (["--split", "holdout"], r"split='holdout' is invalid"),
    (["--chunk-tokens", "100"], r"chunk_tokens=100 is invalid: must be a multiple of context_len=32"),
    (["--batch-size", "0"], r"batch_size=0 is invalid: must be >= 1"),
    (["--max-tokens", "10"], r"max_tokens=10 is too small"),
    (["--max-tokens", "lots"], r"argument --max-tokens: invalid int value: 'lots'"),
    (["--source", "./no/such/folder"], r"unknown data source './no/such/folder'"),
    (["--module-path", "model.layers.{layr}.mlp"], r"module_path=.* is invalid: the only placeholder it may hold is \{layer\}"),
    (["--module-path", "model.layers.{layer}.mpl"],
     r"'model.layers.1.mpl' does not exist in LlamaForCausalLM; the MLP of layer 1 is 'model.layers.1.mlp'"),
    (["--module-path", "model.layers.{layer}.self_attn"], r"model.layers.1.self_attn \(LlamaAttention\) is not an MLP"),
    (["--module-path", "model.embed_tokens"], r"model.embed_tokens \(Embedding\) is not an MLP"),
    (["--context-len", "256", "--chunk-tokens", "256"],
     r"context_len=256 is invalid for LlamaForCausalLM: it has 128 positions; use context_len <= 128"),
    (["--device", "foo"], r"device='foo' is invalid"),
    pytest.param(["--device", "cuda"], r"device='cuda' is unavailable", marks=NO_CUDA),
    (["--out", ""], r"out='' is invalid"),
]


@pytest.mark.parametrize("extra,match", HARVEST_OPTIONS)
def test_bad_harvest_option(w, tmp_path, capsys, extra, match):
    refused(capsys, _harvest_args(w, tmp_path / "cache", *extra), match)
    assert not (tmp_path / "cache").exists()


def test_pickle_only_model_is_refused(w, tmp_path, capsys):
    """A model folder with weights only as pickle (pytorch_model.bin) is never unpickled."""
    folder = copy(w.model, tmp_path / "pickled")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    before = hashes(folder)
    refused(capsys, _harvest_args(w, tmp_path / "cache", "--model", folder), r"cannot load model .*pickled")
    assert not (tmp_path / "cache").exists() and hashes(folder) == before


def test_model_folder_without_config_is_refused(w, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    refused(capsys, _harvest_args(w, tmp_path / "cache", "--model", tmp_path / "empty-model"),
            r"model path .*empty-model' has no config.json")
    assert not (tmp_path / "cache").exists()


# --- corpus files --------------------------------------------------------------------------------

BINARY = bytes(range(256)) * 8

CORPORA = {
    "binary .txt": ("a.txt", BINARY, r"a.txt: not UTF-8 text \(byte \d+"),
    "binary .jsonl": ("a.jsonl", BINARY, r"a.jsonl: (not UTF-8 text|cannot be read as a .jsonl file)"),
    "binary .csv": ("a.csv", BINARY, r"a.csv: (not UTF-8 text|cannot be read as a .csv file)"),
    "broken .jsonl line": ("a.jsonl", b'{"text": "fine"}\n{"text": broken\n', r"a.jsonl: cannot be read as a .jsonl file"),
    "no text column": ("a.jsonl", b'{"body": "x"}\n', r"a.jsonl has no column 'text' \(columns: body\); set text_column"),
    "unsupported type": ("a.pdf", b"%PDF-1.4", r"a.pdf: unsupported file type '.pdf'"),
    "too short": ("a.txt", b"Too short for one block.", r"empty corpus: source .* gives no complete block of 32 tokens"),
}


@pytest.mark.parametrize("case", sorted(CORPORA))
def test_bad_corpus_file(w, tmp_path, capsys, case):
    name, data, match = CORPORA[case]
    (tmp_path / name).write_bytes(data)
    refused(capsys, _harvest_args(w, tmp_path / "cache", source=tmp_path / name), match)
    assert not (tmp_path / "cache").exists() and (tmp_path / name).read_bytes() == data


def test_corpus_folder_without_text_files(w, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.md").write_text("# not a supported suffix")
    refused(capsys, _harvest_args(w, tmp_path / "cache", source=tmp_path / "corpus"), r"corpus holds no .txt, .jsonl")
    assert not (tmp_path / "cache").exists()


# --- config files --------------------------------------------------------------------------------

CONFIGS = {
    "JSON syntax": ("c.json", '{"layers": [1],\n "max_tokens": }', r"c.json: invalid JSON at line 2 column 16"),
    "YAML syntax": ("c.yaml", "layers: [1\nmax_tokens: 5\n", r"c.yaml: invalid YAML at line 2 column \d+"),
    "YAML tab": ("c.yaml", "layers:\n\t- 1\n", r"c.yaml: invalid YAML at line 2"),
    "not a mapping": ("c.yaml", "- 1\n- 2\n", r"--config .*c.yaml: expected a JSON/YAML mapping"),
    "empty": ("c.yaml", "", r"--config .*c.yaml: expected a JSON/YAML mapping"),
    "unknown option": ("c.yaml", "layerz: [1]\n", r"unknown options \['layerz'\]"),
    "list expected": ("c.yaml", "layers: 5\n", r"c.yaml: layers=5 is invalid: expected list\[int\]"),
    "int expected": ("c.yaml", "max_tokens: lots\n", r"c.yaml: max_tokens='lots' is invalid: expected int"),
    "bool for int": ("c.json", '{"batch_size": true}', r"c.json: batch_size=True is invalid: expected int"),
    "str expected": ("c.json", '{"dtype": 3}', r"c.json: dtype=3 is invalid: expected str"),
    "binary": ("c.json", BINARY.decode("latin-1"), r"c.json: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_file(w, tmp_path, capsys, case):
    name, text, match = CONFIGS[case]
    config = tmp_path / name
    config.write_bytes(text.encode("latin-1"))
    refused(capsys, ["harvest", "--config", config, "--out", tmp_path / "cache"], match)
    assert not (tmp_path / "cache").exists() and config.read_bytes() == text.encode("latin-1")


def test_missing_config_file(tmp_path, capsys):
    refused(capsys, ["harvest", "--config", tmp_path / "none.yaml", "--out", tmp_path / "c"],
            r"none.yaml: No such file or directory")


def test_config_file_numbers_as_strings_are_read_as_on_the_command_line(w, tmp_path, capsys):
    """YAML reads 3e-3 as a string; it is converted as the option would be (the run then fails on lr=-1)."""
    (tmp_path / "c.yaml").write_text("lr: -1e-3\n")
    refused(capsys, ["train", "--config", tmp_path / "c.yaml", "--cache", w.cache, "--out", tmp_path / "run"],
            r"lr=-0.001 is invalid: must be > 0")


# --- runs, layers and checkpoints -----------------------------------------------------------------

RUN_DAMAGE = {
    "final weights flipped": (lambda r: flip(r / "final" / "model.safetensors"), r"final/model.safetensors: checksum mismatch"),
    "final weights truncated": (lambda r: (r / "final" / "model.safetensors").write_bytes(
        (r / "final" / "model.safetensors").read_bytes()[:500]), r"final/model.safetensors: checksum mismatch"),
    "final weights as pickle": (lambda r: torch.save({k: v.clone() for k, v in final_weights(r).items()},
                                                     r / "final" / "model.safetensors"),
                                r"final/model.safetensors: checksum mismatch"),
    "final checksum edited": (lambda r: edit_json(r / "final" / "config.json", lambda m: m.update(sha256="0" * 64)),
                              r"final/model.safetensors: checksum mismatch"),
    "final config broken": (lambda r: (r / "final" / "config.json").write_text('{"class": "MxD",\n'),
                            r"final/config.json is not an mxd layer config .*line 2"),
    "final weights missing": (lambda r: (r / "final" / "model.safetensors").unlink(),
                              r"final/model.safetensors not found: .* is not a saved mxd layer"),
    "run config broken": (lambda r: (r / "config.json").write_text('{"out": "x",\n\n "seed": 0,}'),
                          r"run/config.json: invalid JSON at line 3"),
    "run without final": (lambda r: shutil.rmtree(r / "final"), r"'.*run' is not a training run: it needs config.json and final/"),
}


@pytest.mark.parametrize("case", sorted(RUN_DAMAGE))
def test_damaged_run_is_not_evaluated(w, tmp_path, capsys, case):
    run, match, before = damaged_copy(w.ref, tmp_path / "run", RUN_DAMAGE, case)
    refused(capsys, ["eval", run, "--eval-tokens", 256], match)
    assert hashes(run) == before


def _nan_layer(checkpoint):
    layer = mxd.load(checkpoint / "layer")
    with torch.no_grad():
        next(layer.parameters())[0] = float("nan")
    layer.save(checkpoint / "layer")  # with its own checksum, and the checkpoint's checksums made to match
    edit_json(checkpoint / "state.json", lambda s: s["sha256"].update(
        {n: sha256(checkpoint / n) for n in ("layer/config.json", "layer/model.safetensors")}))


CHECKPOINT_DAMAGE = {
    "weights flipped": lambda c: flip(c / "layer" / "model.safetensors"),
    "optimiser state truncated": lambda c: (c / "trainer.safetensors").write_bytes((c / "trainer.safetensors").read_bytes()[:99]),
    "state.json broken": lambda c: (c / "state.json").write_text("{"),
    "state.json step edited": lambda c: edit_json(c / "state.json", lambda s: s.update(step=19)),
    "layer config missing": lambda c: (c / "layer" / "config.json").unlink(),
    "NaN weights": _nan_layer,
}


def _interrupted_copy(w, tmp_path) -> Path:
    """The reference run as if stopped after its last checkpoint, in another folder (moved)."""
    run = copy(w.ref, tmp_path / "moved")
    shutil.rmtree(run / "final")
    return run


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(w, tmp_path, capsys, caplog, case):
    run = _interrupted_copy(w, tmp_path)
    newest = run / "checkpoints" / f"step-{STEPS}"
    CHECKPOINT_DAMAGE[case](newest)
    damaged = hashes(newest)
    assert _cli(*_train_args(w, run, "--resume")) == 0
    assert re.search(rf"checkpoint .*step-{STEPS} is damaged .* renamed damaged-step-{STEPS}", caplog.text)
    assert_same_final(run, w.ref)  # from step 15, bit for bit
    kept = {p.replace(f"damaged-step-{STEPS}", f"step-{STEPS}"): h for p, h in hashes(run / "checkpoints" / f"damaged-step-{STEPS}").items()}
    assert kept == damaged  # set aside, not lost


def test_every_checkpoint_damaged_is_refused(w, tmp_path, capsys):
    run = _interrupted_copy(w, tmp_path)
    for checkpoint in (run / "checkpoints").glob("step-*"):
        flip(checkpoint / "trainer.safetensors")
    before = hashes(run)
    refused(capsys, _train_args(w, run, "--resume"), r"every checkpoint of .* is damaged \(step-\d+, step-\d+.*\); move them away")
    assert hashes(run) == before


@pytest.mark.parametrize("how", ["absolute path", "trailing slash", "relative path"])
def test_resume_accepts_the_same_folder_however_named(w, tmp_path, monkeypatch, how):
    run = _interrupted_copy(w, tmp_path)
    monkeypatch.chdir(tmp_path)
    out = {"absolute path": str(run.resolve()), "trailing slash": f"{run}/", "relative path": "moved"}[how]
    assert _cli(*_train_args(w, out, "--resume")) == 0
    assert_same_final(run, w.ref)


def test_resume_accepts_a_config_written_before_a_field_existed(w, tmp_path):
    run = _interrupted_copy(w, tmp_path)
    edit_json(run / "config.json", lambda c: (c.pop("allow_partial"), c["optim"].pop("beta2")))
    assert _cli(*_train_args(w, run, "--resume")) == 0
    assert_same_final(run, w.ref)


@pytest.mark.parametrize("extra,edit,match", [
    (["--seed", "1"], None, r"differs in: seed\)"),
    (["--k", "8"], None, r"differs in: sparse.k\)"),
    ([], lambda c: c.update(from_an_older_version=1), r"differs in: from_an_older_version\)"),
    ([], lambda c: c["optim"].update(beta2=0.5), r"differs in: optim.beta2\)"),
])
def test_resume_with_another_config_names_every_difference(w, tmp_path, capsys, extra, edit, match):
    run = _interrupted_copy(w, tmp_path)
    if edit:
        edit_json(run / "config.json", edit)
    before = hashes(run)
    refused(capsys, _train_args(w, run, "--resume", *extra), r"cannot resume .* with a different config \(" + match)
    assert hashes(run) == before


def test_a_second_run_into_the_same_folder_is_refused(w, tmp_path, capsys):
    run = copy(w.ref, tmp_path / "run")
    before = hashes(run)
    refused(capsys, _train_args(w, run), r"already holds a run; pass --resume to continue it or choose another --out")
    assert hashes(run) == before


def test_nothing_to_resume(w, tmp_path, capsys):
    refused(capsys, _train_args(w, tmp_path / "new", "--resume"), r"nothing to resume: .*new holds no run")
    assert not (tmp_path / "new").exists()


def test_a_refused_run_can_be_retried_in_the_same_folder(w, tmp_path, capsys):
    """A run refused after the config checks (its layer cannot be built) leaves nothing that blocks the retry."""
    refused(capsys, _train_args(w, tmp_path / "run", "--router", "hash"), r"router='hash' is invalid")
    assert not (tmp_path / "run").exists()
    assert _cli(*_train_args(w, tmp_path / "run", "--train-tokens", 5 * 256)) == 0


# --- activation caches ----------------------------------------------------------------------------


def _manifest(c):
    return c / "manifest.json"


def _shard(c):
    return c / "shard-000.json"


CACHE_DAMAGE = {
    "chunk flipped": (lambda c: flip(c / "chunk-000-000001.safetensors"), r"chunk-000-000001.safetensors \(checksum mismatch\)"),
    "chunk truncated": (lambda c: (c / "chunk-000-000002.safetensors").write_bytes(b"\0" * 100),
                        r"chunk-000-000002.safetensors \(truncated: 100 of \d+ bytes\)"),
    "chunk missing": (lambda c: (c / "chunk-000-000003.safetensors").unlink(), r"chunk-000-000003.safetensors \(missing\)"),
    "incomplete": (lambda c: edit_json(_manifest(c), lambda m: m.update(complete=False)),
                   r"is incomplete \(its harvest was interrupted .*\); finish it .* or pass --allow-partial"),
    "manifest names another layer": (lambda c: edit_json(_manifest(c), lambda m: m.update(layers=[2])),
                                     r"harvested with layers=\[1\], manifest.json says layers=\[2\]"),
    "manifest names two layers": (lambda c: edit_json(_manifest(c), lambda m: m.update(layers=[1, 2])),
                                  r"x is F32 \[1, 128, 32\], manifest.json implies F32 \[2, 128, 32\]"),
    "manifest d_in edited": (lambda c: edit_json(_manifest(c), lambda m: m.update(d_in=64)),
                             r"manifest.json implies F32 \[1, 128, 64\]"),
    "manifest dtype edited": (lambda c: edit_json(_manifest(c), lambda m: m.update(dtype="bf16")),
                              r"x is F32 .*, manifest.json implies BF16"),
    "manifest model edited": (lambda c: edit_json(_manifest(c), lambda m: m.update(model="gpt2")),
                              r"harvested with model=.*tiny-llama', manifest.json says model='gpt2'"),
    "manifest source edited": (lambda c: edit_json(_manifest(c), lambda m: m.update(source_sha256="0" * 64)),
                               r"and 15 more \(harvested with source_sha256='[0-9a-f]{12}\.\.\.', manifest.json says source_sha256='0000"),
    "manifest broken": (lambda c: _manifest(c).write_text('{\n "model": "x",\n "layers": [1\n}'),
                        r"manifest.json: invalid JSON at line 4 column 1"),
    "manifest field missing": (lambda c: edit_json(_manifest(c), lambda m: m.pop("shards")),
                               r"manifest.json: not an activation cache manifest \(missing fields \['shards'\]\)"),
    "manifest shard outside": (lambda c: edit_json(_manifest(c), lambda m: m.update(shards=["../shard-000.json"])),
                               r"manifest.json: file name '../shard-000.json' is invalid: must be a plain file name inside"),
    "shard broken": (lambda c: _shard(c).write_text('{"rank": 0,\n "chunks": [\n'), r"shard-000.json: invalid JSON at line 3"),
    "shard names ../": (lambda c: edit_json(_shard(c), lambda s: s["chunks"][0].update(file="../../../etc/passwd")),
                        r"shard-000.json: file name '../../../etc/passwd' is invalid"),
    "shard names an absolute path": (lambda c: edit_json(_shard(c), lambda s: s["chunks"][0].update(file="/etc/passwd")),
                                     r"shard-000.json: file name '/etc/passwd' is invalid"),
    "shard entry without checksum": (lambda c: edit_json(_shard(c), lambda s: s["chunks"][0].pop("sha256")),
                                     r"shard-000.json: not a shard file"),
    "shard lost a chunk": (lambda c: edit_json(_shard(c), lambda s: s["chunks"].pop()),
                           r"its shards list 1,920 tokens but manifest.json says 2,048"),
}


@pytest.mark.parametrize("case", sorted(CACHE_DAMAGE))
def test_damaged_cache_is_not_trained_on(w, tmp_path, capsys, case):
    cache, match, before = damaged_copy(w.cache, tmp_path / "cache", CACHE_DAMAGE, case)
    refused(capsys, _train_args(w, tmp_path / "run", cache=cache), match)
    assert not (tmp_path / "run").exists() and hashes(cache) == before


def test_chunk_from_another_harvest_is_refused(w, tmp_path, capsys):
    """A validation chunk put in place of a training chunk, with the shard's size and checksum updated."""
    cache = copy(w.cache, tmp_path / "cache")
    shutil.copy(Path(w.val) / "chunk-000-000000.safetensors", cache / "chunk-000-000000.safetensors")
    rewrite_chunk(cache, 0, lambda t: None)
    refused(capsys, _train_args(w, tmp_path / "run", cache=cache), r"harvested with split='validation', manifest.json says split='train'")


def test_partial_cache_trains_with_allow_partial(w, tmp_path, capsys):
    cache = copy(w.cache, tmp_path / "cache")
    edit_json(_manifest(cache), lambda m: m.update(complete=False))
    assert _cli(*_train_args(w, tmp_path / "run", "--allow-partial", "--train-tokens", 5 * 256, cache=cache)) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["allow_partial"] is True


def test_extending_a_cache_after_its_corpus_changed_is_refused(w, tmp_path, capsys):
    text = copy(w.text, tmp_path / "text")
    cache = tmp_path / "cache"
    assert _cli(*_harvest_args(w, cache, tokens=8 * CTX, source=text)) == 0
    (text / "lee.txt").write_text((text / "lee.txt").read_text().replace("the", "THE"))
    before = hashes(cache)
    refused(capsys, _harvest_args(w, cache, tokens=16 * CTX, source=text),
            r"holds a different harvest \(the files of source .* changed since this cache was harvested\)")
    assert hashes(cache) == before


@pytest.mark.parametrize("extra,match", [
    (["--dtype", "bf16"], r"holds a different harvest \(dtype: cache has 'fp32', requested 'bf16'\)"),
    (["--layers", "0", "1"], r"holds a different harvest \(layers: cache has \[1\], requested \[0, 1\]\)"),
    (["--chunk-tokens", 8 * CTX], r"holds a different harvest \(chunk_tokens: cache has 128, requested 256\)"),
])
def test_harvest_into_a_different_cache_is_refused(w, tmp_path, capsys, extra, match):
    cache = copy(w.cache, tmp_path / "cache")
    before = hashes(cache)
    refused(capsys, _harvest_args(w, cache, *extra), match)
    assert hashes(cache) == before


def test_harvest_does_not_resume_over_a_damaged_chunk(w, tmp_path, capsys):
    cache = copy(w.cache, tmp_path / "cache")
    flip(cache / "chunk-000-000004.safetensors")
    before = hashes(cache)
    refused(capsys, _harvest_args(w, cache, tokens=80 * CTX), r"chunk-000-000004.safetensors \(checksum mismatch\)")
    assert hashes(cache) == before


# --- NaN and Inf ----------------------------------------------------------------------------------


def _poison(value):
    def change(tensors):
        tensors["y"][0, 5, 3] = value
    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_a_training_chunk_stops_naming_step_and_chunk(w, tmp_path, capsys, value):
    cache = copy(w.cache, tmp_path / "cache")
    rewrite_chunk(cache, 6, _poison(value))
    line = refused(capsys, _train_args(w, tmp_path / "run", cache=cache), code=1,
                   match=r"the loss became (nan|inf) at step \d+: the training cache .* holds NaN/Inf in "
                         r"chunk-000-000006.safetensors; harvest it again; ")
    assert "no checkpoint was written yet" in line or re.search(r"the last good checkpoint, .*step-\d+, is kept", line)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_nan_in_the_validation_cache_stops_the_run(w, tmp_path, capsys):
    val = copy(w.val, tmp_path / "val")
    rewrite_chunk(val, 2, _poison(float("nan")))
    refused(capsys, _train_args(w, tmp_path / "run", val=val), code=1,
            match=r"the validation nmse became nan at step 10: the validation cache .* holds NaN/Inf in "
                  r"chunk-000-000002.safetensors; harvest it again; the last good checkpoint, .*step-5, is kept")
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(c))
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_nmse" in r for r in records)  # no NaN validation record
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-5"]


def test_metrics_jsonl_stays_strict_json(tmp_path):
    from mxd.tracking import MetricsLogger

    logger = MetricsLogger(tmp_path, [], {})
    logger.log({"step": 1, "loss": float("nan"), "nmse": float("inf"), "dead": float("-inf"), "l0": 2.0})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record == {"step": 1, "loss": None, "nmse": None, "dead": None, "l0": 2.0}


def test_a_checkpoint_of_nan_weights_is_never_written(w, tmp_path):
    from mxd.train import Trainer, TrainConfig, TrainingDiverged

    run = _interrupted_copy(w, tmp_path)
    config = json.loads((run / "config.json").read_text()) | {"out": str(run), "resume": True}
    trainer = Trainer(TrainConfig(**config), progress=False)
    before = hashes(run / "checkpoints")
    with torch.no_grad():
        next(trainer.layer.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=rf"non-finite weights at step {STEPS}; the last good checkpoint, "
                                               rf".*step-{STEPS}, is kept"):
        trainer.save_checkpoint()
    assert hashes(run / "checkpoints") == before


# --- kill -9 --------------------------------------------------------------------------------------

_SLOWED = """
import time
{owner}
original = owner.{function}
owner.{function} = lambda *a, **k: (time.sleep({pause}), original(*a, **k))[1]
from mxd.cli import main
main({argv!r})
"""


def _start_slowed(owner, function, pause, argv):
    """`mxd ARGV` in a subprocess, with `owner.function` (owner: an import statement) made slow enough to kill midway."""
    script = _SLOWED.format(owner=owner, function=function, pause=pause, argv=[str(a) for a in argv])
    env = os.environ | {"PYTHONPATH": str(Path(mxd.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)


def _kill_when(proc, ready) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_during_harvest_then_resume_is_bit_exact(w, tmp_path):
    cache = tmp_path / "cache"
    proc = _start_slowed("import mxd.activations as owner", "mlp_activations", 0.25, _harvest_args(w, cache))

    def two_chunks():
        try:
            return len(json.loads(_shard(cache).read_text())["chunks"]) >= 2
        except (OSError, ValueError):
            return False

    _kill_when(proc, two_chunks)
    assert not json.loads(_manifest(cache).read_text())["complete"], "the harvest finished before it could be killed"
    assert _cli(*_harvest_args(w, cache)) == 0
    assert json.loads(_shard(cache).read_text()) == json.loads(_shard(Path(w.cache)).read_text())


def test_kill_9_during_training_then_resume_is_bit_exact(w, tmp_path):
    run = tmp_path / "run"
    proc = _start_slowed("from mxd.train import Trainer as owner", "_train_step", 0.2, _train_args(w, run))
    _kill_when(proc, lambda: (run / "checkpoints" / "step-5" / "state.json").exists())
    assert not (run / "final").exists(), "training finished before it could be killed"
    assert _cli(*_train_args(w, run, "--resume")) == 0
    assert_same_final(run, w.ref)


# --- disk full and read-only folders (tmpfs; root only) -------------------------------------------


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs at tmp_path/disk; disk(size) (re)mounts it with that size, disk(None, ro=True) read-only."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = []

    def mount(size, ro=False):
        options = f"size={size}" + (",ro" if ro else "")
        cmd = ["mount", "-o", f"remount,{options}", str(folder)] if mounted else ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
        if subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(True)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_disk_full_during_harvest_then_resume_is_bit_exact(w, disk, capsys):
    folder = disk("200k")
    refused(capsys, _harvest_args(w, folder / "cache"), r"chunk-000-\d+.safetensors: No space left on device; free some "
                                                        r"space and run the command again")
    assert not json.loads(_manifest(folder / "cache").read_text())["complete"]
    disk("4m")
    assert _cli(*_harvest_args(w, folder / "cache")) == 0
    assert json.loads(_shard(folder / "cache").read_text()) == json.loads(_shard(Path(w.cache)).read_text())


def test_disk_full_during_training_then_resume_is_bit_exact(w, disk, capsys):
    folder = disk("250k")  # config.json and two checkpoints of ~120 kB: the third does not fit
    refused(capsys, _train_args(w, folder / "run"), r"No space left on device; free some space and run the command again .*--resume")
    written = hashes(folder / "run" / "checkpoints")
    assert written and not (folder / "run" / "final").exists()
    assert not [p for p in (folder / "run").rglob("*") if ".tmp" in p.name]  # no half-written file
    disk("8m")
    assert _cli(*_train_args(w, folder / "run", "--resume")) == 0
    assert_same_final(folder / "run", w.ref)


@pytest.mark.parametrize("command", ["train", "harvest"])
def test_read_only_out_is_refused(w, disk, capsys, command):
    folder = disk("64k", ro=True)
    args = _train_args(w, folder / "run") if command == "train" else _harvest_args(w, folder / "run")
    refused(capsys, args, r"run: Read-only file system; choose a writable folder")


# --- security -------------------------------------------------------------------------------------


def test_no_load_path_unpickles(w, monkeypatch):
    """Layers, runs, caches and models load without pickle (torch.load and pickle are made to fail)."""
    import pickle

    from mxd.activations import ActivationCache
    from mxd.models import load_model
    from mxd.runs import read_run

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, forbidden)
    mxd.load(w.ref / "final")
    run = read_run(w.ref)
    next(ActivationCache(w.cache).batches(1, 64))
    load_model(w.model)
    assert run.layer_index == 1


PAYLOADS = ["<script>alert(1)</script>", '" onmouseover="alert(1)', "<img src=x onerror=alert(1)>", "</style><b>x",
            "&lt;already&gt;"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_dashboard_escapes_every_text(payload):
    import html

    from mxd.dashboard import ExpertCard, render_html

    card = ExpertCard(0, 0.5, 1.0, [1, 2], [([(payload, 1.0), ("x", 0.2)], 0)], [(payload, 1.0)], [(payload, -1.0)])
    summary = {"run": payload, "kind": "MxD", "n_experts": 4, "layer": 1, "model": payload, "n_tokens": 10,
               "source": payload, "fired": 1, "frequencies": [0.5, 0.0, 0.0, 0.0]}
    page = render_html([card], summary)
    assert payload not in page and html.escape(payload) in page


# --- other readers ------------------------------------------------------------------------------


def test_broken_metrics_jsonl_is_named_with_its_line(w, tmp_path):
    from mxd.sweep import final_val_nmse

    run = copy(w.ref, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "val_nmse": NaN\n')
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match=rf"metrics.jsonl: invalid JSON at line {lines} column"):
        final_val_nmse(run)


def test_broken_probe_task_file_is_named_with_its_line(tmp_path):
    from mxd.tasks import load_task

    (tmp_path / "task.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": }\n')
    with pytest.raises(ValueError, match=r"task.jsonl: invalid JSON at line 2 column 24"):
        load_task(str(tmp_path / "task.jsonl"))


def test_real_bugs_keep_their_traceback(monkeypatch):
    """Only expected failures become one line: a bug (here a KeyError) propagates with its traceback."""
    from mxd import cli

    def buggy(cfg):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "report", (cli.COMMANDS["report"][0], buggy, "report"))
    with pytest.raises(KeyError, match="a bug"):
        main(["report", "somewhere"])
