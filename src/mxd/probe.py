"""`mxd probe`: sparse probing of trained layers on labelled text tasks (method: docs/reading-the-experts.md, SAEBench-style).

    rows = run_probe(ProbeConfig(runs=["runs/demo/mxd-k32-seed0", "runs/demo/transcoder-k32-seed0"], tasks=["sentiment"]))

For each task, each text's features are the layer's coefficients mean-pooled over its tokens (BOS
and padding masked), next to the mean-pooled raw MLP input x as a reference. The texts are split
into train and test (stratified); for each class, a balanced one-vs-rest problem (as many negatives,
sampled from the other classes, as positives; binary tasks use their first class only) selects the
k features with the largest |mean(positive) − mean(negative)| on the training texts, fits an L2
logistic regression on them (standardised), and reports its test accuracy; "all" uses every feature.
Scores are averaged over a task's classes. Runs on the same model site share one forward pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mxd.activations import site_dims
from mxd.checks import check_at_least, check_out
from mxd.data import prepended_bos
from mxd.layers import SparseLayer
from mxd.models import find_mlp, mlp_activations
from mxd.runs import read_run
from mxd.tasks import BUILTIN_TASKS, Task, load_task


@dataclass
class ProbeConfig:
    """Which runs are probed on which tasks, and how.

    runs: training run folders, probed side by side; tasks: built-in tasks (sentiment, domain, spam,
    question, code), local .csv/.jsonl/.json files or Hugging Face datasets with a text and a label
    column; text_column: the text column of file and dataset tasks; label_column: their label column;
    dataset_config: the Hugging Face dataset's config name; dataset_split: the split read from a
    Hugging Face dataset; ks: numbers of features k given to each probe;
    max_per_class: texts sampled per class; max_len: tokens kept per text; test_fraction: share of
    each task's texts held out for testing; seed: sampling and splits; batch_size: texts per forward
    pass; out: folder written (probe.json, probe.md)
    """

    runs: list[str] = field(default_factory=lambda: ["runs/mxd"])
    tasks: list[str] = field(default_factory=lambda: list(BUILTIN_TASKS))
    text_column: str = "text"
    label_column: str = "label"
    dataset_config: str | None = None
    dataset_split: str = "train"
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])
    max_per_class: int = 250
    max_len: int = 128
    test_fraction: float = 0.3
    seed: int = 0
    batch_size: int = 16
    out: str = "probe"

    def __post_init__(self):
        if not self.runs or not self.tasks:
            raise ValueError("runs and tasks must each name at least one entry")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks={self.ks} is invalid: give one or more integers >= 1")
        check_at_least(self, 1, "max_per_class", "max_len", "batch_size")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction} is invalid: must be in (0, 1)")
        check_out(self.out)


@torch.no_grad()
def pooled_features(model, tokenizer, site, layers: list[SparseLayer], texts: list[str], max_len: int,
                    batch_size: int, progress: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Mean-pooled raw MLP inputs [n_texts, d_in] and, per layer, mean-pooled coefficients [n_texts, N]."""
    bos = prepended_bos(tokenizer)
    ids = [t[: max_len - (bos is not None)] or [tokenizer.eos_token_id]
           for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    ids = [[bos, *t] if bos is not None else t for t in ids]
    order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths share a batch
    device = next(model.parameters()).device
    raw = torch.zeros(len(texts), site_dims(model, site)[0])
    codes = [torch.zeros(len(texts), layer.n_latents) for layer in layers]
    for start in tqdm(range(0, len(texts), batch_size), desc="features", unit="batch", disable=not progress):
        rows = torch.from_numpy(order[start : start + batch_size])
        lengths = torch.tensor([len(ids[r]) for r in rows])
        batch = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # right padding: causal, harmless
        for i, r in enumerate(rows):
            batch[i, : lengths[i]] = torch.tensor(ids[r])
        x = mlp_activations(model, batch.to(device), [site])[site.layer][0].float().cpu()  # [b, s, d_in]
        mask = torch.arange(batch.shape[1]) < lengths[:, None]  # [b, s]
        if bos is not None:
            mask[:, 0] = False
        weight = (mask / mask.sum(1, keepdim=True)).flatten()  # [b s]: mean over each text's kept tokens
        raw[rows] = (x * weight.view(mask.shape)[..., None]).sum(1)
        text_of = torch.arange(len(rows)).repeat_interleave(batch.shape[1])  # [b s]
        for layer, pooled in zip(layers, codes):
            c = layer.encode(x.flatten(0, 1).to(next(layer.parameters()).dtype))  # [b s, K]
            part = torch.zeros(len(rows), layer.n_latents)
            part.view(-1).index_add_(0, (text_of[:, None] * layer.n_latents + c.indices).flatten(),
                                     (c.values.float() * weight[:, None]).flatten())
            pooled[rows] = part
    return raw, codes


def top_features(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns of x [n, f] with the largest |mean over y − mean over not y|."""
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def balanced(indices: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """As many positives as negatives from `indices` (the larger side sampled down): (indices, is positive)."""
    pos, neg = indices[positive[indices]], indices[~positive[indices]]
    n = min(len(pos), len(neg))
    chosen = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    return chosen, positive[chosen]


def probe_task(task: Task, features: dict[str, np.ndarray], ks: list[int], test_fraction: float,
               seed: int) -> list[dict]:
    """One record {task, class, method, k, accuracy, features, n_train, n_test} per class, method and k.

    features: the k selected feature (expert) indices, by decreasing |mean difference|; k = "all"
    uses every feature (features None).
    """
    from sklearn.linear_model import LogisticRegression  # heavy imports, only needed here
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.array(task.labels, dtype=object)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    classes = task.classes[:1] if len(task.classes) == 2 else task.classes
    records = []
    for c in classes:
        rng = np.random.default_rng(seed)
        tr, y_tr = balanced(train, labels == c, rng)
        te, y_te = balanced(test, labels == c, rng)
        for method, x in features.items():
            for k in [*ks, "all"]:
                cols = np.arange(x.shape[1]) if k == "all" else top_features(x[tr], y_tr, k)
                probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                probe.fit(x[tr][:, cols], y_tr)
                records.append({"task": task.name, "class": c, "method": method, "k": k,
                                "accuracy": float(probe.score(x[te][:, cols], y_te)),
                                "features": cols.tolist() if k != "all" else None,
                                "n_train": len(tr), "n_test": len(te)})
    return records


def summarise(records: list[dict]) -> list[dict]:
    """Mean accuracy over classes: one row {task, method, k, accuracy} per task, method and k."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["k"]), []).append(r["accuracy"])
    return [{"task": t, "method": m, "k": k, "accuracy": float(np.mean(a))} for (t, m, k), a in groups.items()]


def markdown_table(summary: list[dict]) -> str:
    """Rows task × method, columns k = ... and all."""
    ks = list(dict.fromkeys(r["k"] for r in summary))
    cells: dict[tuple, dict] = {}
    for r in summary:
        cells.setdefault((r["task"], r["method"]), {})[r["k"]] = r["accuracy"]
    head = "| task | method | " + " | ".join(f"k={k}" if k != "all" else "all" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 2)]
    for (task, method), acc in cells.items():
        lines.append(f"| {task} | {method} | " + " | ".join(f"{acc[k]:.3f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def run_probe(cfg: ProbeConfig, progress: bool = True) -> list[dict]:
    """Probe every run on every task; writes cfg.out/probe.json (config, records, summary) and probe.md."""
    runs = [read_run(r) for r in cfg.runs]
    tasks = [load_task(name, cfg.max_per_class, cfg.seed, cfg.text_column, cfg.label_column,
                       cfg.dataset_config, cfg.dataset_split) for name in cfg.tasks]
    sites: dict[tuple, list] = {}  # runs grouped by the model site they read
    for run, path in zip(runs, cfg.runs):
        sites.setdefault((run.model, run.layer_index, run.module_path, run.model_dtype), []).append((path, run))
    records = []
    for (model_name, layer_index, module_path, _), group in sites.items():
        model, tokenizer = group[0][1].load_model()
        site = find_mlp(model, layer_index, module_path)
        raw_name = f"raw x (layer {layer_index})" if len(sites) == 1 else f"raw x ({model_name}, layer {layer_index})"
        for task in tasks:
            raw, pooled = pooled_features(model, tokenizer, site, [run.layer for _, run in group], task.texts,
                                          cfg.max_len, cfg.batch_size, progress)
            features = {raw_name: raw.numpy()} | {path: p.numpy() for (path, _), p in zip(group, pooled)}
            records += probe_task(task, features, cfg.ks, cfg.test_fraction, cfg.seed)
    summary = summarise(records)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"config": asdict(cfg), "records": records, "summary": summary},
                                               indent=1) + "\n")
    (out / "probe.md").write_text(markdown_table(summary))
    return summary
