"""Sharing runs: `mxd export` (mxd format with its standalone reader), model cards, and runs pushed
to and read from the Hugging Face Hub (a local Hub cache stands in for the network)."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import mxd
from mxd.cli import main
from mxd.share import CARD_FILE, ExportConfig, export, model_card, stage
from mxd.runs import read_run
from mxd.train import LayerSpec, OptimConfig, Trainer, TrainConfig


def _standalone(folder):
    """The exported folder's mxd_layer.py imported as its own module (no mxd import inside)."""
    spec = importlib.util.spec_from_file_location(f"mxd_layer_{abs(hash(str(folder)))}", folder / "mxd_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standalone_reader_equals_mxd_load(layer, tmp_path):
    """Every layer kind: the exported mxd_layer.py gives mxd.load's outputs, without importing mxd."""
    layer.save(tmp_path / "layer")
    shutil.copy2(mxd.__path__[0] + "/mxd_layer.py", tmp_path / "layer" / "mxd_layer.py")
    source = (tmp_path / "layer" / "mxd_layer.py").read_text()
    assert "import mxd\n" not in source and "from mxd." not in source and "from mxd import" not in source
    standalone = _standalone(tmp_path / "layer").load_layer(tmp_path / "layer")
    x = torch.randn(2, 7, 12)
    expected, _ = mxd.load(tmp_path / "layer")(x.reshape(-1, 12))
    torch.testing.assert_close(standalone(x), expected.reshape(2, 7, -1), atol=1e-5, rtol=1e-5)


def test_standalone_reader_runs_in_a_python_without_mxd(tmp_path):
    """The reader needs only torch and safetensors: run it with mxd's folder off the path."""
    layer = mxd.MxD(mxd.MxDConfig(12, 10, 16, 40, 5, shared_modulator=True, linear_modulation=True))
    layer.save(tmp_path / "layer")
    shutil.copy2(mxd.__path__[0] + "/mxd_layer.py", tmp_path / "layer" / "mxd_layer.py")
    script = ("import sys, torch; sys.modules['mxd'] = None\n"
              "from mxd_layer import load_layer\n"
              "print(load_layer('.')(torch.ones(3, 12)).shape)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "layer", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([3, 10])"


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir, text_dir):
    """A tiny MxD run on a cache of a tiny Llama, trained for a few steps."""
    from mxd.activations import HarvestConfig, harvest
    from mxd.data import DataConfig

    harvest(HarvestConfig(out=str(tmp_path / "cache"), model=str(tiny_model_dir), layers=[1], max_tokens=64 * 32,
                          chunk_tokens=16 * 32, data=DataConfig(source=str(text_dir), context_len=32)), progress=False)

    def train(kind="mxd", name="run"):
        cfg = TrainConfig(out=str(tmp_path / name), cache=str(tmp_path / "cache"), train_tokens=8 * 128, batch_tokens=128,
                          sparse=LayerSpec(kind=kind, k=4, expansion=4), optim=OptimConfig(lr=3e-3, warmup_steps=2))
        Trainer(cfg, progress=False).train()
        return tmp_path / name
    return train


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_says_what_was_trained_and_its_latest_eval(trained_run, capsys):
    run = trained_run()
    meta = _front_matter(model_card(read_run(run)))
    assert meta["library_name"] == "mxd" and "mixture-of-decoders" in meta["tags"]
    m = meta["mxd"]
    assert (m["layer"], m["method"], m["class"], m["k"], m["train_tokens"]) == (1, "mxd", "MxD", 4, 1024)
    assert m["parameters"] == mxd.load(run).param_count() and "eval" not in m
    main(["eval", str(run), "--eval-tokens", "128", "--eval-batch-size", "2", "--rank-sample", "2"])
    card = (run / CARD_FILE).read_text()  # written by mxd eval
    evaluated = _front_matter(card)["mxd"]["eval"]
    record = json.loads((run / "eval.json").read_text())
    assert evaluated["nmse"] == record["nmse"] and evaluated["delta_ce"] == record["delta_ce"]
    assert f"mxd.load('{run}')" in card and "| nmse |" in card


def test_mxd_train_writes_the_card(tmp_path, trained_run, capsys):
    trained_run(name="first")  # builds the cache
    out = tmp_path / "cli-run"
    main(["train", "--cache", str(tmp_path / "cache"), "--out", str(out), "--train-tokens", "512",
          "--batch-tokens", "128", "--kind", "transcoder", "--k", "4", "--expansion", "4"])
    meta = _front_matter((out / CARD_FILE).read_text())
    assert meta["mxd"]["class"] == "Transcoder" and "transcoder" in meta["tags"]


def _seed_hub_cache(hub_cache, repo_id, folder, commit="0" * 40):
    """Lay out `folder` as huggingface_hub's cache holds a downloaded model repo at revision main."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_pushed_run_loads_from_the_hub_cache(trained_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    run = trained_run()
    uploads = []

    class FakeApi:  # records what `mxd push` would send, and plays the Hub by filling the local cache
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploads.append(("upload", sorted(p.relative_to(folder_path).as_posix() for p in
                                             __import__("pathlib").Path(folder_path).rglob("*") if p.is_file())))
            _seed_hub_cache(tmp_path / "hub", repo_id, folder_path)
            return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    main(["push", str(run), "me/tiny"])
    assert "pushed" in capsys.readouterr().out
    assert uploads[0] == ("create", "me/tiny", False)
    assert uploads[1][1] == ["README.md", "config.json", "final/config.json", "final/model.safetensors", "metrics.jsonl"]
    model = read_run(run).model
    shutil.rmtree(tmp_path / "cache")  # a pushed run needs no activation cache
    x = torch.randn(5, 32)
    torch.testing.assert_close(mxd.load("hf:me/tiny")(x)[0], mxd.load(run / "final")(x)[0])
    pulled = read_run("hf:me/tiny")
    assert (pulled.layer_index, pulled.model, pulled.cache) == (1, model, None)
    assert "mxd.load('hf:me/tiny')" in (pulled.path / CARD_FILE).read_text()


@pytest.mark.parametrize("path, message", [("hf:me", "is not a Hub path"), ("hf:me/x@", "is not a Hub path"),
                                           ("hf:me/not-in-cache", "cannot download hf:me/not-in-cache")])
def test_bad_hub_paths_fail_in_one_line(path, message, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=message):
        mxd.load(path)


def test_export_mxd_format_and_refusals(trained_run, tmp_path, capsys):
    run = trained_run()
    main(["export", str(run), "--out", str(tmp_path / "exported")])
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors", "mxd_layer.py"]
    x = torch.randn(4, 32)
    torch.testing.assert_close(_standalone(tmp_path / "exported").load_layer(tmp_path / "exported")(x),
                               mxd.load(run)(x)[0], atol=1e-5, rtol=1e-5)
    for argv, message in [(["--format", "sparsify", "--out", str(tmp_path / "sp")], "a MxD has no sparsify form"),
                          (["--out", str(tmp_path / "exported")], "already exists and is not an empty folder"),
                          (["--format", "onnx", "--out", str(tmp_path / "o")], "format='onnx' is invalid")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(run), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "sp").exists()


def test_stage_writes_a_self_contained_config(trained_run, tmp_path):
    run = trained_run()
    stage(run, tmp_path / "staged", "me/x")
    config = json.loads((tmp_path / "staged" / "config.json").read_text())
    assert config["cache"] is None and config["layers"] == [1] and config["data"]["context_len"] == 32
    export(ExportConfig(run=str(tmp_path / "staged"), out=str(tmp_path / "again")))  # a staged run is a run
