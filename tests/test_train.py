"""Training on a tiny harvested cache or streamed activations: learning, checkpoints, bit-exact resume
after kill -9, several runs, torchrun (replicated and spread), trackers, errors."""

import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import mxd
from mxd.activations import HarvestConfig, harvest
from mxd.data import DataConfig
from mxd.train import LayerSpec, OptimConfig, Trainer, TrainConfig, TrainingDiverged, train_runs

CTX = 32


@pytest.fixture
def caches(tiny_model_dir, text_dir, tmp_path):
    """(train cache, validation cache) of layer 1 of the tiny Llama on real text."""
    paths = []
    for split, tokens in (("train", 160 * CTX), ("validation", 16 * CTX)):
        out = tmp_path / f"cache-{split}"
        harvest(HarvestConfig(out=str(out), model=str(tiny_model_dir), layers=[1], split=split, max_tokens=tokens,
                              chunk_tokens=32 * CTX, data=DataConfig(source=str(text_dir), context_len=CTX)), progress=False)
        paths.append(str(out))
    return paths


def _cfg(caches, out, **kw):
    args = dict(out=str(out), cache=caches[0], val_cache=caches[1], train_tokens=120 * 256, batch_tokens=256,
                eval_every=40, checkpoint_every=25, log_every=5, sparse=LayerSpec(kind="mxd", k=4, expansion=4),
                optim=OptimConfig(lr=3e-3, warmup_steps=10))
    return TrainConfig(**(args | kw))


@pytest.mark.parametrize("kind", ["mxd", "transcoder", "skip_transcoder"])
def test_training_learns_and_writes_a_run(caches, tmp_path, kind):
    cfg = _cfg(caches, tmp_path / "run", sparse=LayerSpec(kind=kind, k=4, expansion=4))
    layer = Trainer(cfg, progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_nmse" in r]
    assert train[-1]["step"] == cfg.steps == 120 and len(val) == 3
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert val[-1]["val_nmse"] < val[0]["val_nmse"] and val[-1]["val_l0"] <= 4
    if kind == "mxd":
        assert val[-1]["val_nmse"] < 0.5
    assert {"tokens_per_s", "l0", "dead", "lr"} <= set(train[-1])
    loaded = mxd.load(tmp_path / "run" / "final")
    assert type(loaded) is type(layer)
    assert type(layer).__name__ == {"mxd": "MxD", "transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder"}[kind]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sparse"]["kind"] == kind
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step-120" in checkpoints and len(checkpoints) <= 3  # keep_last=2 plus the best


def test_mxd_is_sized_from_the_host_mlp(caches, tmp_path):
    layer = Trainer(_cfg(caches, tmp_path / "run"), progress=False).layer
    # tiny Llama: d = 32, SwiGLU width 64; matched to a transcoder of width 4 * 32
    assert layer.config.glu and layer.config.activation == "silu" and layer.config.d_hidden == 64
    # the default form's c0 and W_m are paid for with experts: the same budget as the transcoder
    assert layer.config.n_experts == mxd.match_n_experts(32, 32, 64, 128, glu=True, extra=32 + 32 * 32)
    assert abs(layer.param_count() - mxd.TranscoderConfig(32, 32, 128, 1).param_count()) <= 65 / 2


def _final_weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


_KILLABLE = """
import sys, time
sys.path.insert(0, {tests!r})
from test_train import _cfg
from mxd.train import Trainer
trainer = Trainer(_cfg({caches!r}, {out!r}), progress=False)
step = trainer._train_step
trainer._train_step = lambda x, y: (time.sleep(0.03), step(x, y))[1]
trainer.train()
"""


def _start(caches, out):
    script = _KILLABLE.format(tests=os.path.dirname(__file__), caches=caches, out=str(out))
    return subprocess.Popen([sys.executable, "-c", script])


def _wait_for_checkpoint(out, proc, step):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / f"step-{step}" / "state.json").exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step {step} within 120 s (training exited with {proc.poll()})")


def test_kill_9_and_resume_is_bit_exact(caches, tmp_path):
    out = tmp_path / "killed"
    proc = _start(caches, out)
    _wait_for_checkpoint(out, proc, 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "training finished before it could be killed"
    Trainer(_cfg(caches, out, resume=True), progress=False).train()
    Trainer(_cfg(caches, tmp_path / "whole"), progress=False).train()
    resumed, whole = _final_weights(out), _final_weights(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def _logged_steps(out) -> list[int]:
    """The training steps logged so far in out/metrics.jsonl ([0] before the first)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [0] + [r["step"] for r in map(json.loads, lines[:-1] if lines and not lines[-1].endswith("}") else lines)
                  if "loss" in r]


def test_ctrl_c_checkpoints_and_exits_cleanly(caches, tmp_path):
    out = tmp_path / "run"
    proc = _start(caches, out)
    _wait_for_checkpoint(out, proc, 25)
    deadline = time.time() + 60
    while _logged_steps(out)[-1] < 30 and time.time() < deadline:  # past the step-25 checkpoint
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps[-1] >= max(30, _logged_steps(out)[-1])  # a checkpoint at the interrupted step, not only step 25
    assert not list((out / "checkpoints").glob(".tmp*"))
    Trainer(_cfg(caches, out, resume=True), progress=False).train()
    assert (out / "final" / "model.safetensors").exists()


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(caches, tmp_path):
    trainer = Trainer(_cfg(caches, tmp_path / "run"), progress=False)
    good = trainer._train_step
    calls = []

    def poisoned(x, y):
        calls.append(1)
        return good(x, y if len(calls) < 40 else y * float("nan"))

    trainer._train_step = poisoned
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 39"):
        trainer.train()
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-25"]
    weights = load_file(str(checkpoints[0] / "layer" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_options_run(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", train_tokens=60 * 256, autocast="bf16", loss="token_nmse", aux_k=8,
               dead_window=512, balance_coef=0.01, sparse=LayerSpec(kind="mxd", k=4, expansion=4, unit_norm=True),
               optim=OptimConfig(optimizer="adamw", decay="cosine", weight_decay=0.01, warmup_steps=5))
    layer = Trainer(cfg, progress=False).train()
    torch.testing.assert_close(layer.modulators.norm(dim=1), torch.ones(layer.n_latents))


def test_l1_transcoder_trains_sparse(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", sparse=LayerSpec(kind="transcoder", sparsity="l1", l1_coef=1e-2, expansion=4))
    Trainer(cfg, progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_l0"] < 128


def test_lr_schedule():
    opt = OptimConfig(lr=1.0, warmup_steps=10, decay="linear", min_lr_ratio=0.1)
    assert opt.lr_factor(0, 110) == pytest.approx(0.1) and opt.lr_factor(9, 110) == pytest.approx(1.0)
    assert opt.lr_factor(60, 110) == pytest.approx(0.55) and opt.lr_factor(110, 110) == pytest.approx(0.1)
    cos = OptimConfig(lr=1.0, warmup_steps=0, decay="cosine")
    assert cos.lr_factor(50, 100) == pytest.approx(0.5)
    assert OptimConfig(warmup_steps=0, decay="constant").lr_factor(99, 100) == 1.0


def test_bad_input(caches, tmp_path):
    with pytest.raises(ValueError, match="train_tokens=100 is too small for one step of batch_tokens=256"):
        _cfg(caches, tmp_path / "a", train_tokens=100)
    with pytest.raises(ValueError, match="kind='sae' is invalid"):
        LayerSpec(kind="sae")
    Trainer(_cfg(caches, tmp_path / "run", train_tokens=10 * 256), progress=False).train()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        Trainer(_cfg(caches, tmp_path / "run", train_tokens=10 * 256), progress=False)
    with pytest.raises(ValueError, match="cannot resume .* with a different config \\(differs in: seed\\)"):
        Trainer(_cfg(caches, tmp_path / "run", train_tokens=10 * 256, seed=1, resume=True), progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(_cfg(caches, tmp_path / "new", resume=True), progress=False)
    with pytest.raises(ValueError, match="holds the same split of the same data"):
        Trainer(_cfg(caches, tmp_path / "b", val_cache=caches[0]), progress=False)
    with pytest.raises(ValueError, match="not layer 2 of"):
        Trainer(_cfg(caches, tmp_path / "c", layers=[2]), progress=False)

    with pytest.raises(ValueError, match="give exactly one source: cache .* or model"):
        _cfg(caches, tmp_path / "d", model="smollm2-135m")
    with pytest.raises(ValueError, match="give exactly one source"):
        _cfg(caches, tmp_path / "d", cache=None)
    with pytest.raises(ValueError, match="log_to='mlflow' is invalid: valid values are tensorboard, wandb"):
        _cfg(caches, tmp_path / "d", log_to=["mlflow"])
    with pytest.raises(ValueError, match="the config names 2 runs"):
        Trainer(_cfg(caches, tmp_path / "e", ks=[2, 4]), progress=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_batch_must_divide_across_ranks(caches, tmp_path, monkeypatch):
    monkeypatch.setattr("mxd.train.rank_and_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="batch_tokens=256 does not divide across 3 ranks"):
        Trainer(_cfg(caches, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_several_ks_and_layers_from_one_cache(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "grid", ks=[2, 4], train_tokens=20 * 256)
    runs = train_runs(cfg, progress=False)
    assert [p.name for p in runs] == ["k2", "k4"]
    for run, k in zip(runs, (2, 4)):
        saved = json.loads((run / "config.json").read_text())
        assert saved["sparse"]["k"] == k and saved["ks"] is None and saved["out"] == str(run)
        assert mxd.load(run / "final").config.k == k
        val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_nmse" in line]
        assert 0 < val[-1]["val_l0"] <= k
    names = [r.out for r in _cfg(caches, tmp_path / "g", layers=[1, 3], ks=[8, 16]).runs()]
    assert names == [str(tmp_path / "g" / n) for n in ("layer1-k8", "layer1-k16", "layer3-k8", "layer3-k16")]


def _stream_cfg(tiny_model_dir, text_dir, out, **kw):
    args = dict(out=str(out), model=str(tiny_model_dir), layers=[1], train_tokens=60 * 256, batch_tokens=256,
                buffer_tokens=2048, val_tokens=1024, eval_every=20, checkpoint_every=10, log_every=5,
                data=DataConfig(source=str(text_dir), context_len=CTX), sparse=LayerSpec(kind="mxd", k=4, expansion=4),
                optim=OptimConfig(lr=3e-3, warmup_steps=10))
    return TrainConfig(**(args | kw))


def test_training_from_streamed_activations_learns_and_resumes_bit_exactly(tiny_model_dir, text_dir, tmp_path):
    Trainer(_stream_cfg(tiny_model_dir, text_dir, tmp_path / "whole"), progress=False).train()
    val = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines() if "val_nmse" in line]
    assert len(val) == 3 and val[-1]["val_nmse"] < 0.7 * val[0]["val_nmse"]
    # Ctrl-C after 25 steps, then resume: the stream is replayed to the checkpointed step
    trainer = Trainer(_stream_cfg(tiny_model_dir, text_dir, tmp_path / "split"), progress=False)
    step = trainer._train_step

    def interrupting(x, y):
        if trainer.step == 25:
            os.kill(os.getpid(), signal.SIGINT)
        return step(x, y)

    trainer._train_step = interrupting
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "split" / "checkpoints" / "step-26").exists()
    Trainer(_stream_cfg(tiny_model_dir, text_dir, tmp_path / "split", resume=True), progress=False).train()
    resumed, whole = _final_weights(tmp_path / "split"), _final_weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_tensorboard_receives_the_metrics(caches, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_cfg(caches, tmp_path / "run", train_tokens=40 * 256, log_to=["tensorboard"]), progress=False).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("nmse", "val_nmse", "tokens_per_s"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == logged


def test_wandb_receives_the_metrics(caches, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    run = types.SimpleNamespace(log=lambda data, step: calls.append((step, data)), finish=lambda: calls.append("finish"))
    fake.init = lambda **kw: calls.append(kw) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Trainer(_cfg(caches, tmp_path / "run", train_tokens=20 * 256, log_to=["wandb"]), progress=False).train()
    init, logs, end = calls[0], calls[1:-1], calls[-1]
    assert init["name"] == "run" and init["config"]["train_tokens"] == 20 * 256 and end == "finish"
    assert [step for step, _ in logs] == [5, 10, 15, 20, 20] and "val_nmse" in logs[-1][1] and "nmse" in logs[0][1]


def _torchrun(*args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "mxd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def _train_args(caches, out, *extra):
    return ["train", "--cache", caches[0], "--val-cache", caches[1], "--out", str(out), "--train-tokens", str(60 * 256),
            "--batch-tokens", "256", "--eval-every", "40", "--checkpoint-every", "25", "--log-every", "5",
            "--kind", "mxd", "--k", "4", "--expansion", "4", "--lr", "3e-3", "--warmup-steps", "10", *extra]


def test_torchrun_replicated_training_matches_one_process(caches, tmp_path):
    result = _torchrun(*_train_args(caches, tmp_path / "two", "--aux-k", "4", "--dead-window", "512",
                                    "--balance-coef", "0.01"), port=29541)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = _cfg(caches, tmp_path / "one", train_tokens=60 * 256, aux_k=4, dead_window=512, balance_coef=0.01)
    Trainer(cfg, progress=False).train()
    two, one = _final_weights(tmp_path / "two"), _final_weights(tmp_path / "one")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    lines = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    m2, m1 = lines(tmp_path / "two"), lines(tmp_path / "one")
    assert [r["step"] for r in m2] == [r["step"] for r in m1]  # rank 0 alone wrote: no duplicate records
    assert m2[0]["ranks"] == 2 and m1[0]["ranks"] == 1
    for r2, r1 in zip(m2, m1):
        for key in ("loss", "nmse", "l0", "dead", "val_nmse", "val_l0", "val_dead"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


def test_torchrun_spread_places_runs_on_ranks(caches, tmp_path):
    result = _torchrun(*_train_args(caches, tmp_path / "grid", "--ks", "2", "4", "--placement", "spread",
                                    "--train-tokens", str(20 * 256)), port=29542)
    assert result.returncode == 0, result.stderr[-3000:]
    for k in (2, 4):  # each rank trained its run alone: identical to a one-process run of that config
        Trainer(_cfg(caches, tmp_path / f"one-k{k}", train_tokens=20 * 256, sparse=LayerSpec(kind="mxd", k=k, expansion=4)),
                progress=False).train()
        spread, one = _final_weights(tmp_path / "grid" / f"k{k}"), _final_weights(tmp_path / f"one-k{k}")
        assert all(torch.equal(spread[key], one[key]) for key in one)


def test_torchrun_batch_that_does_not_divide_is_refused(caches, tmp_path):
    result = _torchrun(*_train_args(caches, tmp_path / "run", "--batch-tokens", "255"), port=29543)
    assert result.returncode != 0
    assert "mxd train: error: batch_tokens=255 does not divide across 2 ranks" in result.stderr
    assert "Traceback" not in result.stderr.split("mxd train: error")[0].split("\n")[-1]
    assert not (tmp_path / "run").exists()


# --- the recipe: data init, width-scaled learning rates, AuxK, signum, balancing, dead "n/a" ----


def test_data_init_sets_the_biases_from_the_first_batch(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", train_tokens=256, sparse=LayerSpec(kind="transcoder", k=4, expansion=4))
    trainer = Trainer(cfg, progress=False)
    x, y = next(trainer._batches())
    seen = []
    original = trainer.layer.init_from_means_
    trainer.layer.init_from_means_ = lambda mx, my: seen.append((mx, my)) or original(mx, my)
    trainer.train()
    (mean_x, mean_y), = seen
    torch.testing.assert_close(mean_x, x.float().mean(0))
    torch.testing.assert_close(mean_y, y.float().mean(0))
    fresh = Trainer(_cfg(caches, tmp_path / "no-init", train_tokens=256, data_init=False,
                         sparse=LayerSpec(kind="transcoder", k=4, expansion=4)), progress=False)
    fresh.layer.init_from_means_ = lambda *a: pytest.fail("data_init=False must not initialise from data")
    fresh.train()


def test_learning_rate_defaults_scale_with_width_and_lr_scale_multiplies(caches, tmp_path):
    runs = iter(range(100))

    def lr(**kw):
        return Trainer(_cfg(caches, tmp_path / f"run{next(runs)}", **kw), progress=False).lr

    width = 4 * 32  # expansion 4 of d = 32
    tc = LayerSpec(kind="transcoder", k=4, expansion=4)
    assert lr(sparse=tc, optim=OptimConfig(optimizer="adam")) == pytest.approx(2e-4 / (width / 2**14) ** 0.5)
    assert lr(sparse=tc, optim=OptimConfig()) == pytest.approx(5e-3 / (width / 2**14) ** 0.5)  # signum
    assert lr(optim=OptimConfig()) == pytest.approx(3e-3)  # MxD
    assert lr(optim=OptimConfig(lr=1e-2, lr_scale=0.5)) == pytest.approx(5e-3)
    assert OptimConfig().resolved("transcoder") == OptimConfig(optimizer="signum", warmup_steps=0, decay="constant")
    assert OptimConfig().resolved("mxd") == OptimConfig(optimizer="adam", warmup_steps=100, decay="linear")
    assert OptimConfig(optimizer="signum", warmup_steps=5).resolved("mxd").warmup_steps == 5  # given values stay


def test_signum_trains_and_saves_the_averaged_point(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", train_tokens=40 * 256, eval_every=20,
               sparse=LayerSpec(kind="transcoder", k=4, expansion=4),
               optim=OptimConfig(optimizer="signum", decay="constant", warmup_steps=0))
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_nmse"] for r in records if "val_nmse" in r]
    assert val[-1] < 0.9 * val[0] or val[-1] < 0.5
    trainer.opt.eval()  # the averaged point x is what final/ holds
    final = _final_weights(tmp_path / "run")
    for name, p in trainer.layer.state_dict().items():
        torch.testing.assert_close(final[name], p)


def test_aux_k_defaults_to_half_the_output_width_and_dead_reads_na_before_the_window(caches, tmp_path):
    cfg = _cfg(caches, tmp_path / "run", train_tokens=20 * 256, dead_window=10 * 256)
    trainer = Trainer(cfg, progress=False)
    assert trainer.aux_k == 16 and Trainer(_cfg(caches, tmp_path / "off", aux_k=0), progress=False).aux_k == 0
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dead = {r["step"]: r["dead"] for r in records if "loss" in r}
    assert dead[5] is None and dead[10] is None and isinstance(dead[15], float)  # window: 10 steps of 256 tokens


def test_balancing_spreads_the_load_during_training(caches, tmp_path):
    balanced = LayerSpec(kind="mxd", k=4, expansion=4, balance_rate=0.05)
    trainer = Trainer(_cfg(caches, tmp_path / "run", train_tokens=60 * 256, sparse=balanced), progress=False)
    layer = trainer.train()
    beta = layer.router.selection_bias
    assert beta.abs().max() > 0 and beta.std() > 0  # moved, differently per expert
    assert mxd.load(tmp_path / "run" / "final").router.selection_bias.equal(beta)  # saved with the layer
    with pytest.raises(ValueError, match="variant='newest' is invalid: valid values are paper, balanced"):
        LayerSpec(variant="newest")
