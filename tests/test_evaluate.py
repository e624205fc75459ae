"""mxd eval / sweep / report on a tiny Llama: every metric against a hand computation, the MLP itself
and an all-zero layer as limiting cases, resumable sweeps, figures, bad input."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_layers import _mxd_as_mlp

import mxd
from mxd.activations import HarvestConfig, harvest
from mxd.cli import main
from mxd.data import DataConfig, load_blocks
from mxd.evaluate import EvalConfig, evaluate_paths, evaluate_runs
from mxd.models import find_mlp, load_model, mlp_activations
from mxd.report import ReportConfig, variant_labels, write_report
from mxd.runs import read_run
from mxd.sweep import SweepConfig, run_sweep
from mxd.train import LayerSpec, OptimConfig, Trainer, TrainConfig

CTX = 32
EVAL = EvalConfig(eval_tokens=8 * CTX, eval_batch_size=3, rank_sample=4)


@pytest.fixture
def cache(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    harvest(HarvestConfig(out=str(out), model=str(tiny_model_dir), layers=[1], max_tokens=64 * CTX, chunk_tokens=16 * CTX,
                          data=DataConfig(source=str(text_dir), context_len=CTX)), progress=False)
    return str(out)


def _train(cache, out, kind="mxd", k=4, steps=15):
    cfg = TrainConfig(out=str(out), cache=cache, train_tokens=steps * 128, batch_tokens=128, log_every=5,
                      sparse=LayerSpec(kind=kind, k=k, expansion=4), optim=OptimConfig(lr=3e-3, warmup_steps=2))
    Trainer(cfg, progress=False).train()
    return out


def _hand_metrics(model_dir, text_dir, layer):
    """The metrics of docs/metrics.md, computed directly from the logits with a patched MLP (float64)."""
    model, tok = load_model(str(model_dir), dtype=torch.float64)
    blocks = load_blocks(DataConfig(source=str(text_dir), context_len=CTX), tok, "validation", 8 * CTX)
    mlp = model.model.layers[1].mlp
    original = mlp.forward
    xs, ys = zip(*(mlp_activations(model, blocks[i : i + 3], [find_mlp(model, 1)])[1] for i in range(0, len(blocks), 3)))
    x, y = torch.cat(xs).reshape(-1, 32), torch.cat(ys).reshape(-1, 32)
    y_hat, codes = layer(x.float())
    y_hat = y_hat.double()

    def mean_ce(forward):
        mlp.forward = forward
        try:
            logits = model(input_ids=blocks).logits[:, :-1]  # float64 (HF's own loss would round to float32)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
            return ce.item(), F.log_softmax(logits, -1)
        finally:
            mlp.forward = original

    with torch.no_grad():
        ce_base, lp_base = mean_ce(original)
        ce_spliced, lp_spliced = mean_ce(lambda h: layer(h.reshape(-1, 32).float())[0].double().reshape(h.shape))
        ce_zero, _ = mean_ce(lambda h: torch.zeros_like(h))
        ce_mean, _ = mean_ce(lambda h: y.mean(0).expand_as(h))
    err = (y_hat - y).pow(2).sum().item()
    return {"nmse": err / y.pow(2).sum().item(), "fvu": err / (y - y.mean(0)).pow(2).sum().item(),
            "l0": (codes.values != 0).sum(-1).float().mean().item(), "ce_base": ce_base, "ce_spliced": ce_spliced,
            "ce_zero": ce_zero, "ce_mean_ablation": ce_mean, "delta_ce": ce_spliced - ce_base,
            "ce_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_base),
            "kl": (lp_base.exp() * (lp_base - lp_spliced)).sum(-1).mean().item(),
            "dead": 1 - codes.indices[codes.values != 0].unique().numel() / layer.n_latents}


def test_metrics_match_a_hand_computation(cache, tiny_model_dir, text_dir, tmp_path):
    runs = [read_run(_train(cache, tmp_path / kind, kind)) for kind in ("mxd", "skip_transcoder")]
    model, tokenizer = load_model(str(tiny_model_dir), dtype=torch.float64)  # so that ratios of small differences are exact
    records = evaluate_runs(runs, EVAL, model, tokenizer, progress=False)
    for run, record in zip(runs, records):
        expected = _hand_metrics(tiny_model_dir, text_dir, run.layer)
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert record["eval_tokens"] == 8 * CTX and record["method"] == run.config["sparse"]["kind"]
        assert 0 < record["kl"] and record["ce_zero"] > record["ce_base"]
    assert records[0]["expert_rank"]["n_sampled"] == 4 and 0 < records[0]["expert_rank"]["mean"] <= 1
    assert records[1]["expert_rank"] is None
    assert sum(records[0]["firing"]["log10_counts"]) + records[0]["firing"]["never"] == runs[0].layer.n_latents


def test_the_mlp_itself_is_perfect_and_a_zero_layer_is_ce_zero(cache, tiny_model_dir, tmp_path):
    run_dir = _train(cache, tmp_path / "run", steps=2)
    model, _ = load_model(str(tiny_model_dir))
    mlp = model.model.layers[1].mlp
    _mxd_as_mlp(mlp.gate_proj.weight, None, mlp.up_proj.weight, None, mlp.down_proj.weight, None, "silu").save(run_dir / "final")
    (same,) = evaluate_runs([read_run(run_dir)], EVAL, progress=False)
    assert same["nmse"] < 1e-10 and same["fvu"] < 1e-10 and same["l0"] == 1
    assert same["delta_ce"] == pytest.approx(0, abs=1e-6) and same["kl"] == pytest.approx(0, abs=1e-7)
    assert same["ce_recovered"] == pytest.approx(1, abs=1e-5)
    zero = mxd.load(run_dir / "final")
    with torch.no_grad():
        zero.modulators.zero_()
    zero.save(run_dir / "final")
    (none,) = evaluate_runs([read_run(run_dir)], EVAL, progress=False)
    assert none["ce_spliced"] == pytest.approx(none["ce_zero"], rel=1e-6) and none["ce_recovered"] == pytest.approx(0, abs=1e-5)
    assert none["nmse"] == pytest.approx(1, rel=1e-6)


def test_sweep_trains_evaluates_and_resumes(cache, tmp_path, monkeypatch):
    train = TrainConfig(out=str(tmp_path / "sweep"), cache=cache, ks=[2, 4], train_tokens=6 * 128, batch_tokens=128,
                        sparse=LayerSpec(expansion=4), optim=OptimConfig(warmup_steps=2))
    cfg = SweepConfig(train=train, methods=["mxd", "transcoder"], eval=EVAL)
    records = run_sweep(cfg, progress=False)
    assert [(r["method"], r["k"]) for r in records] == [("mxd", 2), ("mxd", 4), ("transcoder", 2), ("transcoder", 4)]
    frontier = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    required = {"method", "k", "n_params", "train_tokens", "nmse", "fvu", "delta_ce", "ce_recovered", "kl", "dead"}
    assert all(required <= set(r) for r in frontier) and frontier == json.loads(json.dumps(records))
    params = {r["method"]: r["n_params"] for r in records}
    assert abs(params["mxd"] - params["transcoder"]) / params["transcoder"] < 0.01  # parameter-matched

    trained, evaluated = [], []
    monkeypatch.setattr(Trainer, "train", lambda self: trained.append(self.cfg.out))
    monkeypatch.setattr("mxd.sweep.evaluate_runs", lambda runs, *a, **kw: evaluated.append(runs) or [])
    assert run_sweep(cfg, progress=False) == records and not trained and not evaluated  # finished cells are skipped
    with pytest.raises(ValueError, match="holds a sweep with other training settings \\(differs in: train_tokens\\)"):
        run_sweep(SweepConfig(train=TrainConfig(**(train.to_dict() | {"train_tokens": 7 * 128})), eval=EVAL), progress=False)


def test_report_draws_the_frontier(cache, tmp_path):
    for kind in ("mxd", "transcoder"):
        _train(cache, tmp_path / "runs" / kind, kind)
    evaluate_paths([str(tmp_path / "runs")], EVAL, out=str(tmp_path / "eval"), progress=False)
    assert "| mxd |" in (tmp_path / "eval" / "eval.md").read_text()
    report = write_report(ReportConfig(inputs=[str(tmp_path / "runs")], out=str(tmp_path / "report")))
    text = report.read_text()
    for name in ("frontier", "training", "firing"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 10_000 and (tmp_path / "report" / f"{name}.svg").exists()
        assert f"]({name}.png)" in text
    assert "| transcoder |" in text


def test_bad_input(cache, tiny_model_dir, text_dir, tmp_path, capsys):
    run = _train(cache, tmp_path / "run", steps=2)
    with pytest.raises(ValueError, match="overlaps training: 8 of its 8 blocks are in the training cache"):
        evaluate_runs([read_run(run)], EvalConfig(eval_tokens=8 * CTX, eval_split="train"), progress=False)
    other = tmp_path / "other-cache"  # the same model folder under another name stands for another model
    (tmp_path / "other-model").symlink_to(tiny_model_dir)
    harvest(HarvestConfig(out=str(other), model=str(tmp_path / "other-model"), layers=[1], max_tokens=16 * CTX,
                          chunk_tokens=16 * CTX, data=DataConfig(source=str(text_dir), context_len=CTX)), progress=False)
    with pytest.raises(ValueError, match="runs of different models .* cannot be evaluated together"):
        evaluate_runs([read_run(run), read_run(_train(str(other), tmp_path / "run2", steps=2))], EVAL, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "cache")])
    assert e.value.code == 2 and "is not a training run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(run), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "has no eval.json: evaluate it first" in capsys.readouterr().err


def test_a_streamed_run_is_evaluated_and_its_train_split_refused(tiny_model_dir, text_dir, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), model=str(tiny_model_dir), layers=[1], train_tokens=40 * 128,
                      batch_tokens=128, buffer_tokens=1024, val_tokens=256, data=DataConfig(source=str(text_dir), context_len=CTX),
                      sparse=LayerSpec(k=4, expansion=4), optim=OptimConfig(lr=3e-3, warmup_steps=2))
    Trainer(cfg, progress=False).train()
    (record,) = evaluate_runs([read_run(tmp_path / "run")], EVAL, progress=False)
    assert record["layer"] == 1 and 0 < record["nmse"] < 2 and record["l0"] <= 4 and record["k"] == 4
    with pytest.raises(ValueError, match="overlaps training: a run streamed the train split"):
        evaluate_runs([read_run(tmp_path / "run")], EvalConfig(eval_tokens=8 * CTX, eval_split="train"), progress=False)


def test_report_tells_variants_apart_by_the_settings_that_differ():
    def record(kind, k, seed, **changes):
        config = {"out": f"runs/{kind}-{k}-{seed}", "seed": seed, "lr_note": 1, "balance_coef": 0.0,
                  "sparse": {"kind": kind, "k": k, "router": "flat"}}
        for key, value in changes.items():
            (config["sparse"] if key == "router" else config)[key] = value
        return {"method": kind, "k": k, "config": config}

    sweep = [record(kind, k, seed) for kind in ("mxd", "transcoder") for k in (16, 32) for seed in (0, 1)]
    assert variant_labels(sweep) == ["MxD"] * 4 + ["TopK transcoder"] * 4  # K, seed and out are not variants
    routers = [record("mxd", 32, 0), record("mxd", 32, 0, router="product_key"),
               record("mxd", 32, 0, router="product_key", balance_coef=0.01)]
    assert variant_labels(routers) == ["MxD (balance_coef=0.0, router=flat)", "MxD (balance_coef=0.0, router=product_key)",
                                       "MxD (balance_coef=0.01, router=product_key)"]
    assert variant_labels([{"method": "skip_transcoder", "k": 8}]) == ["skip transcoder"]  # a record without config


@pytest.fixture
def split_caches(tiny_model_dir, text_dir, tmp_path):
    """Train and validation caches of a source that also holds out test documents."""
    data = DataConfig(source=str(text_dir), context_len=CTX, validation_fraction=0.2, test_fraction=0.2)
    caches = {}
    for split, tokens in (("train", 64 * CTX), ("validation", 8 * CTX), ("test", 8 * CTX)):
        caches[split] = str(tmp_path / f"cache-{split}")
        harvest(HarvestConfig(out=caches[split], model=str(tiny_model_dir), layers=[1], split=split, max_tokens=tokens,
                              chunk_tokens=8 * CTX, data=data), progress=False)
    return caches


def test_sweep_selects_learning_rates_on_validation_and_reports_on_test(split_caches, tmp_path):
    train = TrainConfig(out=str(tmp_path / "sweep"), cache=split_caches["train"], val_cache=split_caches["validation"],
                        ks=[2, 4], train_tokens=6 * 128, batch_tokens=128, val_tokens=8 * CTX,
                        sparse=LayerSpec(expansion=4), optim=OptimConfig(lr=3e-3, warmup_steps=2))
    cfg = SweepConfig(train=train, methods=["mxd", "mxd_paper", "transcoder"], lr_grid=[0.1, 1.0], lr_grid_k=4,
                      dense_reference=True, eval=replace(EVAL, eval_split="test"))
    records = run_sweep(cfg, progress=False)
    selection = json.loads((tmp_path / "sweep" / "lr-grid" / "selection.json").read_text())
    assert {s["method"] for s in selection} == {"mxd", "mxd_paper", "transcoder"}
    for s in selection:  # the multiplier with the lowest final validation nmse
        assert s["val_nmse"] == min(s["grid"].values()) == s["grid"][f"{s['lr_multiplier']:g}"]
        cells = {r["k"]: r for r in records if r["method"] == s["method"]}
        assert Path(cells[4]["run"]).parent.name == "lr-grid" and f"lrx{s['lr_multiplier']:g}" in cells[4]["run"]
        assert cells[2]["config"]["optim"]["lr_scale"] == s["lr_multiplier"]
    assert sorted((r["method"], r["k"]) for r in records) == [("mxd", 0), ("mxd", 2), ("mxd", 4), ("mxd_paper", 2),
                                                             ("mxd_paper", 4), ("transcoder", 2), ("transcoder", 4)]
    assert all(r["eval_split"] == "test" for r in records)
    for r in records:
        expected = {"mean_routing", "always_on_only", "token_specific_only"} if r["method"].startswith("mxd") and r["k"] else set()
        assert set(r["ablations"]) == expected
        if expected:
            assert r["experts_share_reference"].endswith("mxd-k0-seed0")
            for a in r["ablations"].values():
                assert {"nmse", "delta_ce", "retained_nmse", "retained_delta_ce"} <= set(a)
        lo, hi = r["delta_ce_ci95"]
        assert lo <= r["delta_ce"] <= hi and {"dense", "always_on_slots", "effective_l0"} <= set(r)
    text = write_report(ReportConfig(inputs=[str(tmp_path / "sweep")], out=str(tmp_path / "report"))).read_text()
    assert "](experts.png)" in text and "| mxd-k0-seed0 | mxd | 0 |" in text and "experts_share" in text
    assert (tmp_path / "report" / "experts.png").stat().st_size > 10_000

    # a later sweep takes the selection instead of training a grid; its K = lr_grid_k cells are its own
    again = replace(cfg, train=replace(train, out=str(tmp_path / "again"), ks=[4]), methods=["transcoder"], lr_grid=None,
                    lr_selection=str(tmp_path / "sweep" / "lr-grid" / "selection.json"), dense_reference=False)
    [record] = run_sweep(again, progress=False)
    chosen = next(s["lr_multiplier"] for s in selection if s["method"] == "transcoder")
    assert Path(record["run"]).parent.name == "again" and record["config"]["optim"]["lr_scale"] == chosen
    assert not (tmp_path / "again" / "lr-grid").exists()
    with pytest.raises(ValueError, match="chooses no learning rate for .*skip_transcoder"):
        run_sweep(replace(again, methods=["skip_transcoder"]), progress=False)
    with pytest.raises(ValueError, match="give lr_grid .* or lr_selection"):
        replace(again, lr_grid=[1.0])


def test_the_test_split_must_exist_and_stay_apart_from_selection(split_caches, cache, tmp_path):
    run = _train(cache, tmp_path / "run", steps=2)  # its source holds out no test documents
    with pytest.raises(ValueError, match="eval_split='test' is empty: source .* was split with test_fraction=0"):
        evaluate_runs([read_run(run)], replace(EVAL, eval_split="test"), progress=False)
    cfg = TrainConfig(out=str(tmp_path / "selected-on-test"), cache=split_caches["train"], val_cache=split_caches["test"],
                      train_tokens=2 * 128, batch_tokens=128, val_tokens=4 * CTX, sparse=LayerSpec(k=4, expansion=4))
    Trainer(cfg, progress=False).train()
    with pytest.raises(ValueError, match="overlaps validation: .* blocks are in the validation cache"):
        evaluate_runs([read_run(cfg.out)], replace(EVAL, eval_split="test"), progress=False)
    with pytest.raises(ValueError, match=r"ablations \['mean_routing'\] need MxD runs with experts"):
        transcoder = read_run(_train(cache, tmp_path / "tc", kind="transcoder", steps=2))
        evaluate_runs([transcoder], replace(EVAL, ablations=["mean_routing"]), progress=False)
    with pytest.raises(ValueError, match="ablations \\['everything'\\] are invalid: valid values are mean_routing"):
        EvalConfig(ablations=["everything"])
