"""mxd probe: offline tasks, feature selection, balanced one-vs-rest probes, runs side by side, bad input."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mxd.cli import main
from mxd.models import find_mlp, mlp_activations
from mxd.probe import ProbeConfig, balanced, pooled_features, probe_task, run_probe, top_features
from mxd.runs import read_run
from mxd.tasks import BUILTIN_TASKS, CODE_LANGUAGES, Task, load_task


def test_builtin_tasks():
    expected = {"sentiment": {"negative", "positive"}, "domain": {"amazon", "movie", "nyt", "tweets"},
                "spam": {"ham", "spam"}, "question": {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"},
                "code": set(CODE_LANGUAGES)}
    assert set(BUILTIN_TASKS) == set(expected) and len(CODE_LANGUAGES) >= 4
    for name, classes in expected.items():
        task = load_task(name, max_per_class=40, seed=1)
        counts = Counter(task.labels)
        assert set(counts) == classes and max(counts.values()) == 40, name
        assert len(set(task.texts)) == len(task.texts) and all(t.strip() for t in task.texts)
        assert load_task(name, max_per_class=40, seed=1).texts == task.texts  # deterministic
    code = load_task("code", max_per_class=40)
    python = [t for t, label in zip(code.texts, code.labels) if label == "python"]
    assert sum(("def " in t or "import " in t or "self" in t) for t in python) > len(python) / 2


def test_local_tasks_and_bad_input(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("body,tag\nhello there,a\n\"good, day\",b\nhello there,b\nnight,a\n")
    task = load_task(str(csv_file), text_column="body", label_column="tag")
    assert task.texts == ["hello there", "good, day", "night"] and task.labels == ["a", "b", "a"]  # first label wins
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "x y", "label": 1}\n{"text": "z", "label": 0}\n')
    assert load_task(str(jsonl)).labels == ["1", "0"]
    one_class = tmp_path / "one.jsonl"
    one_class.write_text('{"text": "x", "label": "pos"}\n{"text": "y", "label": "pos"}\n')
    with pytest.raises(ValueError, match=r"has 1 class \(pos\): probing needs at least two"):
        load_task(str(one_class))
    with pytest.raises(ValueError, match="has no column 'label'"):
        load_task(str(csv_file), text_column="body")
    with pytest.raises(ValueError, match="unknown task 'no-such-task-xyz': not a built-in task"):
        load_task("no-such-task-xyz")
    with pytest.raises(ValueError, match="unknown task './missing.csv'"):
        load_task("./missing.csv")


def test_feature_selection_and_balancing():
    rng = np.random.default_rng(0)
    y = np.arange(200) < 50
    x = rng.normal(size=(200, 30))
    x[:, 7] += 3 * y
    x[:, 2] -= 2 * y
    assert top_features(x, y, 2).tolist() == [7, 2]
    chosen, labels = balanced(np.arange(200), y, rng)
    assert len(chosen) == 100 and labels.sum() == 50 and len(set(chosen)) == 100
    assert (labels == y[chosen]).all()


def test_probes_find_the_informative_feature():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], 600)
    informative = rng.normal(size=(600, 40))
    informative[:, 11] += 4 * (labels == "a") - 4 * (labels == "b")  # separates a and b from the rest
    informative[:, 5] += 4 * (labels == "c")
    noise = rng.normal(size=(600, 40))
    records = probe_task(Task("t", [""] * 600, list(labels)), {"signal": informative, "noise": noise}, [1, 2],
                         test_fraction=0.3, seed=0)
    assert len(records) == 3 * 2 * 3  # classes x methods x (k=1, k=2, all)
    acc = {(r["class"], r["method"], r["k"]): r["accuracy"] for r in records}
    assert all(acc[(c, "signal", 1)] > 0.9 for c in "abc")
    assert all(acc[(c, "noise", 1)] < 0.7 for c in "abc")
    chosen = {(r["class"], r["method"], r["k"]): r["features"] for r in records}
    assert chosen[("a", "signal", 1)] == chosen[("b", "signal", 1)] == [11] and chosen[("c", "signal", 1)] == [5]
    assert chosen[("c", "signal", "all")] is None
    assert all(r["n_train"] % 2 == 0 and r["n_test"] % 2 == 0 for r in records)  # balanced


def _letters_task(path: Path) -> Path:
    """Texts made of vowels vs texts made of digits: separable from the raw activations of any model."""
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join("".join(rng.choice(list(alphabet), 4)) for _ in range(6)), "label": label}
            for _ in range(60) for label, alphabet in (("vowels", "aeiou"), ("digits", "0123456789"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_runs_side_by_side(tiny_runs, tmp_path):  # noqa: F811
    task = _letters_task(tmp_path / "letters.jsonl")
    runs = [str(tiny_runs["mxd"]), str(tiny_runs["transcoder"])]
    summary = run_probe(ProbeConfig(runs=runs, tasks=[str(task)], out=str(tmp_path / "out"), batch_size=8), progress=False)
    acc = {(r["method"], r["k"]): r["accuracy"] for r in summary}
    assert set(acc) == {(m, k) for m in ["raw x (layer 1)", *runs] for k in [1, 2, 5, "all"]}
    assert acc[("raw x (layer 1)", "all")] > 0.9 and acc[(runs[0], 5)] > 0.75
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["summary"] == summary and saved["config"]["runs"] == runs
    table = (tmp_path / "out" / "probe.md").read_text()
    assert table.startswith("| task | method | k=1 | k=2 | k=5 | all |") and table.count(f"| {task} |") == 3


def test_features_pool_over_the_text_only(tiny_runs):  # noqa: F811
    """Mean pooling ignores padding: a text's features do not depend on the batch it is in."""
    run = read_run(tiny_runs["mxd"])
    model, tokenizer = run.load_model()
    site = find_mlp(model, 1)
    texts = ["short", "a much longer text that needs padding of the short one in its batch"]
    raw, (codes,) = pooled_features(model, tokenizer, site, [run.layer], texts, 128, 2, progress=False)
    alone, (alone_codes,) = pooled_features(model, tokenizer, site, [run.layer], texts[:1], 128, 1, progress=False)
    assert np.allclose(raw[0], alone[0], atol=1e-5) and np.allclose(codes[0], alone_codes[0], atol=1e-5)
    x = mlp_activations(model, tokenizer(texts[:1], return_tensors="pt").input_ids, [site])[1][0][0]  # [s, d]
    assert codes[0].sum().item() == pytest.approx(run.layer.encode(x).values.sum(-1).mean().item(), rel=1e-5)


def test_cli_bad_task(tiny_runs, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", str(tiny_runs["mxd"]), "--tasks", "no-such-task-xyz", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown task 'no-such-task-xyz'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_spam():
    """On the embedded model's demo runs, spam is easy for the raw activations and for 5 experts."""
    runs = {}  # kind -> the first finished demo run of that kind
    for final in sorted(Path("runs/demo").glob("**/final")):
        runs.setdefault(json.loads((final.parent / "config.json").read_text())["sparse"]["kind"], str(final.parent))
    if not {"mxd", "transcoder"} <= set(runs):
        pytest.skip("no finished MxD and transcoder runs under runs/demo (make demo)")
    summary = run_probe(ProbeConfig(runs=[runs["mxd"], runs["transcoder"]], tasks=["spam"], max_per_class=100,
                                    out="/tmp/mxd-probe-spam"), progress=False)
    acc = {(r["method"], r["k"]): r["accuracy"] for r in summary}
    assert acc[("raw x (layer 15)", "all")] > 0.9 and acc[(runs["mxd"], 5)] > 0.85
