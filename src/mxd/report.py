"""Figures and a Markdown report from evaluated runs or sweeps (`mxd report`).

    REPORT/report.md                      the table and the figures, embedded
    REPORT/frontier.{png,svg}             nmse, delta_ce and ce_recovered vs K, one line per method or variant
                                          (the dense-only MxD as a horizontal reference line)
    REPORT/experts.{png,svg}              what MxD's experts add over its dense path, vs K (MxD runs with ablations)
    REPORT/training.{png,svg}             training and validation nmse vs training tokens, one line per run
    REPORT/firing.{png,svg}               how often latents fire, one histogram per run
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no backend chosen at import

from mxd.evaluate import ABLATIONS, EVAL_FILE, EXPERTS_CAPTION, FRONTIER, experts_table, find_runs, markdown_table
from mxd.checks import check_out
from mxd.files import read_json, read_jsonl
from mxd.metrics import ALWAYS_ON_RATE, DENSE_RATE

METHOD_LABELS = {"mxd": "MxD", "mxd_paper": "MxD (paper form)", "transcoder": "TopK transcoder",
                 "skip_transcoder": "skip transcoder", "sparsify_transcoder": "sparsify TopK transcoder",
                 "sparsify_skip_transcoder": "sparsify skip transcoder", "saelens_transcoder": "SAELens transcoder",
                 "saelens_skip_transcoder": "SAELens skip transcoder"}
# Training settings that do not make a run another variant: what varies within one line of the frontier
# (K, seed) and where and how it was run or logged.
NOT_VARIANT = {"out", "resume", "seed", "ks", "sparse.k", "sparse.variant", "optim.lr_scale", "device", "placement",
               "log_every", "log_to", "eval_every", "checkpoint_every", "keep_last"}


@dataclass
class ReportConfig:
    """What `mxd report` draws.

    inputs: sweep folders (holding frontier.json), evaluated run folders or folders of runs;
    out: folder for report.md and the figures; title: the report's heading
    """

    inputs: list[str]
    out: str = "report"
    title: str = "mxd report"

    def __post_init__(self):
        check_out(self.out)


def collect_records(inputs: list[str]) -> list[dict]:
    """Evaluation records from sweeps' frontier.json and runs' eval.json files."""
    records = []
    for path in map(Path, inputs):
        if (path / FRONTIER).is_file():
            records += read_json(path / FRONTIER)
            continue
        for run in find_runs([str(path)]):
            if not (run / EVAL_FILE).is_file():
                raise ValueError(f"run {str(run)!r} has no {EVAL_FILE}: evaluate it first (mxd eval {run})")
            records.append(read_json(run / EVAL_FILE))
    if not records:
        raise ValueError(f"no evaluated runs in {inputs}")
    return records


def _flat(config: dict, prefix: str = "") -> dict:
    """A nested config as {"sparse.router": value, ...}."""
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items |= _flat(value, f"{prefix}{key}.")
        else:
            items[prefix + key] = value
    return items


def variant_labels(records: list[dict]) -> list[str]:
    """One label per record: its method, plus the training settings (K and seed aside) in which its
    run differs from the others, e.g. "MxD (router=product_key)"; records without a config get the method."""
    flat = [_flat(r.get("config") or {}) for r in records]
    keys = sorted({k for f in flat for k in f} - NOT_VARIANT - {"sparse.kind"})
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    labels = []
    for r, f in zip(records, flat):
        settings = ", ".join(f"{k.split('.')[-1]}={f.get(k)}" for k in differing)
        labels.append(METHOD_LABELS.get(r["method"], r["method"]) + (f" ({settings})" if settings else ""))
    return labels


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def is_dense_only(record: dict) -> bool:
    """Whether an evaluation record is of the dense-only MxD reference (k = 0, no experts)."""
    return record["method"].startswith("mxd") and record["n_latents"] == 0


def plot_frontier(records: list[dict], out: Path) -> list[Path]:
    """nmse, delta_ce and ce_recovered against K, one line per variant (mean over seeds; bars: the
    paired 95% interval over sequences for the CE metrics, else min to max over seeds); the
    dense-only MxD as a horizontal line."""
    metrics = [("nmse", "nmse (lower is better)"), ("delta_ce", "Δ CE, nats (lower is better)"),
               ("ce_recovered", "CE recovered (higher is better)")]
    fig = Figure(figsize=(5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics))
    by_variant = defaultdict(lambda: defaultdict(list))
    sparse = [r for r in records if not is_dense_only(r)]
    for r, variant in zip(sparse, variant_labels(sparse)):
        by_variant[variant][r["k"]].append(r)
    for ax, (key, label) in zip(axes, metrics):
        for variant, by_k in sorted(by_variant.items()):
            ks = sorted(by_k)
            values = [np.array([r[key] for r in by_k[k]], dtype=float) for k in ks]
            mean = np.array([v.mean() for v in values])
            lo = [min(r.get(f"{key}_ci95", [r[key]] * 2)[0] for r in by_k[k]) for k in ks]
            hi = [max(r.get(f"{key}_ci95", [r[key]] * 2)[1] for r in by_k[k]) for k in ks]
            lo, hi = np.minimum(lo, [v.min() for v in values]), np.maximum(hi, [v.max() for v in values])
            ax.errorbar(ks, mean, yerr=np.array([mean - lo, hi - mean]), marker="o", capsize=3, label=variant)
        for r in records:
            if is_dense_only(r):
                ax.axhline(r[key], color="grey", linestyle="--", label="MxD dense path only (no experts)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (active experts / latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=8)
    params = sorted({r["n_params"] for r in sparse or records})
    fig.suptitle(f"{records[0]['model']} layer {records[0]['layer']}: sparsity vs faithfulness "
                 f"({params[0]:,}–{params[-1]:,} parameters per layer, {records[0]['eval_tokens']:,} held-out tokens)")
    return _save(fig, out, "frontier")


def plot_experts(records: list[dict], out: Path) -> list[Path] | None:
    """What MxD's experts add, against K: the share of the reference's nmse they remove, and the
    nmse of each eval-time ablation next to the full MxD and the dense-only reference."""
    mxd = [r for r in records if r.get("experts_share") is not None]
    if not mxd:
        return None
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    by_variant = defaultdict(list)
    for r, variant in zip(mxd, variant_labels(mxd)):
        by_variant[variant].append(r)
    for variant, rs in sorted(by_variant.items()):
        rs = sorted(rs, key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        left.plot(ks, [r["experts_share"] for r in rs], marker="o", label=variant)
        line = right.plot(ks, [r["nmse"] for r in rs], marker="o", label=f"{variant}: full")[0]
        for style, name in zip((":", "-.", (0, (1, 3))), ABLATIONS):
            right.plot(ks, [r["ablations"][name]["nmse"] for r in rs], linestyle=style, marker=".",
                       color=line.get_color(), label=f"{variant}: {name.replace('_', ' ')}")
    for r in records:
        if is_dense_only(r):
            right.axhline(r["nmse"], color="grey", linestyle="--", label="dense path only (trained, no experts)")
    reference = mxd[0].get("experts_share_reference")
    left.set_ylabel("share of the reference's nmse the experts remove")
    left.set_title(f"reference: {'the dense-only MxD run' if reference != 'mean_routing' else 'mean routing'}")
    right.set_ylabel("nmse")
    right.set_title("eval-time ablations")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "experts")


def plot_training(records: list[dict], out: Path) -> list[Path] | None:
    """Training-batch nmse and validation nmse against training tokens, one line per run with a metrics.jsonl."""
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    drawn = 0
    for r in records:
        metrics = Path(r["run"]) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        logged = read_jsonl(metrics)
        for ax, key in zip(axes, ("nmse", "val_nmse")):
            points = [(m["tokens"], m[key]) for m in logged if key in m]
            if points:
                ax.plot(*zip(*points), label=Path(r["run"]).name)
                drawn += 1
    if not drawn:
        return None
    for ax, title in zip(axes, ("training batches", "validation")):
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nmse")
    axes[0].legend(fontsize=7, ncol=2)
    return _save(fig, out, "training")


def plot_firing(records: list[dict], out: Path) -> list[Path]:
    """Histogram of log10 firing frequency per run, with the never-firing share in the legend."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in records:
        if not r["n_latents"]:
            continue
        f = r["firing"]
        centres = (np.array(f["log10_edges"][:-1]) + np.array(f["log10_edges"][1:])) / 2
        share = np.array(f["log10_counts"]) / r["n_latents"]
        ax.plot(centres, share, marker=".", label=f"{Path(r['run']).name} (dead {100 * r['dead']:.0f}%, "
                                                  f"{r.get('always_on_slots', 0):.1f} always-on slots)")
    for rate, name in ((DENSE_RATE, "dense"), (ALWAYS_ON_RATE, "always on")):
        ax.axvline(np.log10(rate), color="grey", linestyle=":")
        ax.annotate(f"{name} (> {rate:.0%})", (np.log10(rate), 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("log10 firing frequency (share of tokens)")
    ax.set_ylabel("share of latents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out, "firing")


def write_report(cfg: ReportConfig) -> Path:
    """Draw the figures and write report.md; returns its path."""
    records = sorted(collect_records(cfg.inputs), key=lambda r: (r["method"], r["k"], r.get("seed") or 0))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("Sparsity-accuracy frontier", plot_frontier(records, out)),
               ("What the experts add", plot_experts(records, out)),
               ("Training", plot_training(records, out)), ("Expert firing", plot_firing(records, out))]
    r0 = records[0]
    lines = [f"# {cfg.title}", "",
             f"Model `{r0['model']}`, layer {r0['layer']}; {r0['eval_tokens']:,} held-out tokens ({r0['eval_split']} split), "
             f"model in {r0['eval_dtype']}. Metrics as defined in docs/metrics.md of the mxd repository.", "",
             markdown_table(records), ""]
    experts = experts_table(records)
    if experts:
        lines += [EXPERTS_CAPTION, "", experts, ""]
    ranks = [r for r in records if r.get("expert_rank")]
    if ranks:
        lines += ["Normalised rank of MxD experts (sampled): " + ", ".join(
            f"{Path(r['run']).name} {r['expert_rank']['mean']:.3f} (min {r['expert_rank']['min']:.3f})" for r in ranks), ""]
    for title, paths in figures:
        if paths:
            lines += [f"## {title}", "", f"![{title}]({paths[0].name})", f"([SVG]({paths[1].name}))", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
