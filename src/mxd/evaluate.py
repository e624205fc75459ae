"""Faithfulness of trained sparse layers on held-out text (metric names and definitions: docs/metrics.md).

    results = evaluate_runs([read_run("runs/mxd"), read_run("runs/transcoder")], EvalConfig())

Runs of one model share every pass over it. Pass 1 (stopping after the deepest MLP) gives the
reconstruction metrics (nmse, fvu, l0, dead, firing counts) and each layer's mean MLP output;
pass 2 runs the model unmodified (ce_base), with each run spliced in (ce_spliced, kl), with each
layer's MLP zeroed (ce_zero) or mean-ablated (ce_mean_ablation), and with each MxD ablation. In
pass 2 the blocks before the lowest evaluated layer run once per batch (`SharedPrefix`): every
other forward starts from their saved output. Evaluation text must be held out: blocks that also
occur in a run's training cache are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mxd.checks import check_at_least
from mxd.activations import DTYPES, ActivationCache, site_dims
from mxd.data import SPLITS, DataConfig, load_blocks, splits_by_document
from mxd.layers import MxD
from mxd.metrics import ALWAYS_ON_RATE, firing_metrics
from mxd.models import SharedPrefix, as_mlp, find_mlp, load_model, mlp_activations, mlp_hooks, splice
from mxd.runs import RUN_CONFIG, RunInfo, SiteOptions, is_run, read_run
from mxd.share import write_model_card
from mxd.train import method_name

EVAL_FILE = "eval.json"
FRONTIER = "frontier.json"  # a sweep's evaluation records, all cells
EXPERTS_CAPTION = ("What the experts add (docs/metrics.md): experts_share is the share of the reference's nmse the "
                   "experts remove; retained is the share of the reference → MxD nmse improvement an ablation keeps.")
ABLATIONS = ("mean_routing", "always_on_only", "token_specific_only")  # of an MxD's experts, at evaluation time


@dataclass
class EvalConfig:
    """How runs are evaluated.

    eval_tokens: held-out tokens evaluated; eval_batch_size: sequences per forward pass;
    eval_source: text source, None for the runs' training source; eval_split: validation, test or
    train documents of that source (blocks a run trained on are refused either way, and test blocks
    that are in a run's validation cache too); eval_dtype: fp32 or bf16 for the model, None for
    the dtype its activations were harvested in; rank_sample: MxD experts whose normalised rank is
    computed (a random sample); ablations: MxD ablations evaluated without retraining, among
    mean_routing, always_on_only and token_specific_only (None: all three for every MxD run with
    experts and none for other runs, an empty list: none); shared_prefix: run the blocks before the
    lowest evaluated layer once per batch in the loss pass (off: every forward runs the whole model,
    the same numbers, slower)
    """

    eval_tokens: int = 65_536
    eval_batch_size: int = 8
    eval_source: str | None = None
    eval_split: str = "validation"
    eval_dtype: str | None = None
    rank_sample: int = 128
    ablations: list[str] | None = None
    shared_prefix: bool = True

    def __post_init__(self):
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split={self.eval_split!r} is invalid: valid values are {', '.join(SPLITS)}")
        bad = [a for a in self.ablations or [] if a not in ABLATIONS]
        if bad:
            raise ValueError(f"ablations {bad} are invalid: valid values are {', '.join(ABLATIONS)}")
        if self.eval_dtype is not None and self.eval_dtype not in DTYPES:
            raise ValueError(f"eval_dtype={self.eval_dtype!r} is invalid: valid values are {', '.join(DTYPES)}")
        check_at_least(self, 1, "eval_tokens", "eval_batch_size")


@dataclass
class EvalCommand:
    """`mxd eval`: which runs, and where the combined results go.

    runs: run folders, or folders of runs (as mxd train --ks or mxd sweep write), or hookpoint
    folders of coders saved by sparsify; out: folder for the combined eval.json and eval.md (every
    run also gets its own eval.json)
    """

    runs: list[str]
    out: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    site: SiteOptions = field(default_factory=SiteOptions)

    def __post_init__(self):
        if isinstance(self.eval, dict):
            self.eval = EvalConfig(**self.eval)
        if isinstance(self.site, dict):
            self.site = SiteOptions(**self.site)


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders among `paths`; a folder without a run of its own stands for the runs directly inside it."""
    found = []
    for path in map(Path, paths):
        if is_run(path) or not path.is_dir():
            found.append(path)
        else:
            inner = sorted(p for p in path.iterdir() if is_run(p))
            if not inner:
                raise ValueError(f"{str(path)!r} is not a training run and holds none (written by mxd train or sparsify)")
            found += inner
    return found


def _eval_blocks(runs: list[RunInfo], cfg: EvalConfig, tokenizer, data: DataConfig | None = None) -> Tensor:
    """Held-out token blocks [n, context_len] of the runs' text source (of the first mxd run, else
    `data`); raises if any of them was in a run's training cache, or, for the test split, in a run's
    validation cache (used for selection)."""
    data = next((run.data for run in runs if run.config.get("format") is None), data or runs[0].data)
    data = data if cfg.eval_source is None else replace(data, source=cfg.eval_source)
    if cfg.eval_split == "test" and not data.test_fraction and splits_by_document(data):
        raise ValueError(f"eval_split='test' is empty: source {data.source!r} was split with test_fraction=0; "
                         "harvest and train with --test-fraction > 0 (e.g. 0.1) to hold out test documents")
    blocks = load_blocks(data, tokenizer, cfg.eval_split, cfg.eval_tokens)
    if cfg.eval_split == "train" and any(run.cache is None and run.data == data for run in runs):
        raise ValueError("the evaluation set overlaps training: a run streamed the train split of this source; "
                         "evaluate on held-out text (eval_split=validation or test)")
    wanted = {row.numpy().astype(np.int32).tobytes() for row in blocks}
    caches = {(run.cache, "training") for run in runs if run.cache is not None}
    if cfg.eval_split == "test":
        caches |= {(run.val_cache, "validation") for run in runs if run.val_cache is not None}
    for cache_path, role in sorted(caches):
        cache = ActivationCache(cache_path, allow_partial=True)  # a run may have trained on a partial one
        if cache.manifest["context_len"] != blocks.shape[1]:
            continue  # blocks of another length cannot coincide
        seen = sum(row.tobytes() in wanted for i in range(len(cache.chunks)) for row in cache.tokens(i).numpy().astype(np.int32))
        if seen:
            raise ValueError(f"the evaluation set overlaps {role}: {seen} of its {len(blocks)} blocks are in the "
                             f"{role} cache {cache_path}; evaluate on held-out text "
                             f"({'eval_split=test' if role == 'validation' else 'eval_split=validation or test'})")
    return blocks


def _next_token_logprobs(model, ids: Tensor) -> Tensor:
    """log p(next token) at every position but the last: [B, T-1, vocab], in fp32 at least."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class _Constant(torch.nn.Module):
    """A stand-in MLP whose output is one fixed vector at every token (zero or mean ablation)."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: Tensor) -> Tensor:
        return self.value.to(x.dtype).expand(len(x), -1)


class _Ablated(torch.nn.Module):
    """An MxD with only the experts in `keep` used, or its modulation fixed (see MxD.ablated)."""

    def __init__(self, layer: MxD, keep: Tensor | None, modulation: Tensor | None):
        super().__init__()
        self.layer, self.keep, self.modulation = layer, keep, modulation

    def forward(self, x: Tensor) -> Tensor:
        return self.layer.ablated(x, self.keep, self.modulation)


def _expert_rank(run: RunInfo, sample: int, seed: int = 0) -> dict | None:
    if not isinstance(run.layer, MxD) or sample < 1 or not run.layer.n_latents:
        return None
    n = run.layer.n_latents
    experts = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(sample, n)]
    ranks = run.layer.expert_rank(experts)
    return {"mean": ranks.mean().item(), "min": ranks.min().item(), "max": ranks.max().item(), "n_sampled": len(experts)}


def _firing(counts: Tensor, tokens: int) -> dict:
    """How often latents fire: quantiles of per-token frequency and a log10 histogram (never-firing apart)."""
    freq = counts.double() / tokens
    live = freq[freq > 0]
    edges = np.arange(-7.0, 0.5, 0.5)
    hist = np.histogram(np.log10(live.numpy()), bins=edges)[0] if len(live) else np.zeros(len(edges) - 1)
    q = [0.1, 0.5, 0.9, 0.99]
    return {"never": int((freq == 0).sum()), "log10_edges": edges.tolist(), "log10_counts": hist.tolist(),
            "quantiles": dict(zip(map(str, q), torch.quantile(freq.float(), torch.tensor(q)).tolist())) if len(freq) else {}}


def _sequence_ce(logp: Tensor, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy of each sequence (nats), [B] float64."""
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).double().sum(-1)


def _paired_ci(base: np.ndarray, spliced: np.ndarray, zero: np.ndarray, per_seq: int, seed: int = 0,
               resamples: int = 1000) -> dict:
    """95% bootstrap intervals of delta_ce and ce_recovered, resampling sequences (paired across the three models)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(resamples, len(base)))
    b, s, z = base[idx].sum(1), spliced[idx].sum(1), zero[idx].sum(1)
    delta = (s - b) / (len(base) * per_seq)
    with np.errstate(divide="ignore", invalid="ignore"):
        recovered = (z - s) / (z - b)
    return {"delta_ce_ci95": np.nanpercentile(delta, [2.5, 97.5]).tolist(),
            "ce_recovered_ci95": np.nanpercentile(recovered, [2.5, 97.5]).tolist()}


def _check_ablations(runs: list[RunInfo], ablations: list[str] | None) -> list[list[str]]:
    """The ablations evaluated for each run: all of them for MxD runs with experts unless a list is given."""
    if ablations is None:
        return [list(ABLATIONS) if isinstance(r.layer, MxD) and r.layer.n_latents else [] for r in runs]
    not_mxd = [str(r.path) for r in runs if not (isinstance(r.layer, MxD) and r.layer.n_latents)] if ablations else []
    if not_mxd:
        raise ValueError(f"ablations {ablations} need MxD runs with experts; not one: {', '.join(not_mxd)}")
    return [list(ablations) for _ in runs]


def _check_widths(runs: list[RunInfo], dims: dict[int, tuple[int, int]]) -> None:
    """ValueError naming the first run whose layer does not fit its MLP's (d_in, d_out)."""
    for run in runs:
        c, (d_in, d_out) = run.layer.config, dims[run.layer_index]
        if (c.d_in, c.d_out) != (d_in, d_out):
            raise ValueError(f"{run.path}: its layer maps d_in={c.d_in} to d_out={c.d_out}, but the MLP of layer "
                             f"{run.layer_index} of {run.model} maps {d_in} to {d_out}; give the --model and --layer it was trained on")


@torch.no_grad()
def evaluate_runs(runs: list[RunInfo], cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True,
                  data: DataConfig | None = None) -> list[dict]:
    """One record of metrics per run (same model for all); see the module docstring for the passes.
    `data`: the text source when no run is an mxd run that names one (coders saved by sparsify)."""
    models = {(run.model, run.data.context_len) for run in runs}
    if len(models) > 1:
        raise ValueError(f"runs of different models or context lengths cannot be evaluated together: "
                         f"{sorted(map(str, models))}; evaluate them separately")
    todo = _check_ablations(runs, cfg.ablations)
    dtype = cfg.eval_dtype or runs[0].model_dtype
    if model is None:
        model, tokenizer = load_model(runs[0].model, dtype=DTYPES[dtype])
    device = next(model.parameters()).device
    for run in runs:
        run.layer.to(device)
    sites = {run.layer_index: find_mlp(model, run.layer_index, run.module_path) for run in runs}
    _check_widths(runs, {layer: site_dims(model, site) for layer, site in sites.items()})
    blocks = _eval_blocks(runs, cfg, tokenizer, data)
    batches = blocks.split(cfg.eval_batch_size)
    n_tokens = blocks.numel()

    # pass 1: reconstruction, firing, mean MLP outputs and (MxD) mean modulation
    stats = [{"err": 0.0, "fired": torch.zeros(run.layer.n_latents, dtype=torch.long), "modulation": 0.0} for run in runs]
    sum_y = {layer: 0.0 for layer in sites}
    sq_y = {layer: 0.0 for layer in sites}
    for ids in tqdm(batches, desc="eval: reconstruction", disable=not progress):
        acts = mlp_activations(model, ids.to(device), list(sites.values()))
        for layer, (x, y) in acts.items():
            y = y.reshape(-1, y.shape[-1]).double()
            sum_y[layer] = sum_y[layer] + y.sum(0)
            sq_y[layer] += y.pow(2).sum().item()
        for run, s, ablations in zip(runs, stats, todo):
            x, y = (t.reshape(-1, t.shape[-1]) for t in acts[run.layer_index])
            y_hat, codes = run.layer(x.to(next(run.layer.parameters()).dtype))
            s["err"] += (y_hat.double() - y.double()).pow(2).sum().item()
            active = codes.values != 0
            s["fired"] += torch.bincount(codes.indices[active].cpu(), minlength=run.layer.n_latents)
            if ablations:
                s["modulation"] = s["modulation"] + run.layer.modulation(codes, x.to(next(run.layer.parameters()).dtype)).double().sum(0)
    mean_y = {layer: (sum_y[layer] / n_tokens) for layer in sites}

    # the ablated MxDs: token-independent modulation, only the always-on experts, or all others
    stand_ins = {}
    for i, (run, s, ablations) in enumerate(zip(runs, stats, todo)):
        always_on = s["fired"].to(device) > ALWAYS_ON_RATE * n_tokens
        for name in ablations:
            keep = {"always_on_only": always_on, "token_specific_only": ~always_on}.get(name)
            mean = (s["modulation"] / n_tokens).float() if name == "mean_routing" else None
            stand_ins[(name, i)] = _Ablated(run.layer, keep, mean)

    # pass 2: next-token loss of the model as is, spliced, zero- and mean-ablated; ablations' reconstruction
    constants = {(kind, layer): _Constant(value.float().to(device)) for layer in sites
                 for kind, value in (("zero", torch.zeros_like(mean_y[layer])), ("mean", mean_y[layer]))}
    ce = {key: [] for key in ["base", *[("run", i) for i in range(len(runs))], *constants, *stand_ins]}
    kl = [0.0] * len(runs)
    ablation_err = {key: 0.0 for key in stand_ins}
    prefix = SharedPrefix(model, min(sites) if cfg.shared_prefix else 0)  # layer 0: nothing shared
    for ids in tqdm(batches, desc=f"eval: loss ({len(runs)} runs)", disable=not progress):
        ids = ids.to(device)
        captured = {}
        with prefix.capture(), mlp_hooks(list(sites.values()), lambda site, x, y: captured.__setitem__(site.layer, (x, y))):
            base = _next_token_logprobs(model, ids)
        ce["base"].append(_sequence_ce(base, ids))
        for (name, i), stand_in in stand_ins.items():
            x, y = (t.reshape(-1, t.shape[-1]) for t in captured[runs[i].layer_index])
            ablation_err[(name, i)] += (as_mlp(stand_in)(x).double() - y.double()).pow(2).sum().item()
        replacements = [(("run", i), run.layer_index, run.layer) for i, run in enumerate(runs)]
        replacements += [(key, key[1], stand_in) for key, stand_in in constants.items()]
        replacements += [(key, runs[key[1]].layer_index, stand_in) for key, stand_in in stand_ins.items()]
        with prefix.reuse():
            for key, layer, replacement in replacements:
                with splice(model, sites[layer], replacement):
                    logp = _next_token_logprobs(model, ids)
                ce[key].append(_sequence_ce(logp, ids))
                if key[0] == "run":
                    kl[key[1]] += (base.exp() * (base - logp)).sum().item()
    ce = {key: torch.cat(values).numpy() for key, values in ce.items()}

    per_seq = blocks.shape[1] - 1  # tokens with a next token, per sequence
    predicted = len(blocks) * per_seq
    records = []
    for i, (run, s) in enumerate(zip(runs, stats)):
        layer = run.layer_index
        ce_base, ce_spliced = ce["base"].sum() / predicted, ce[("run", i)].sum() / predicted
        ce_zero, ce_mean = ce[("zero", layer)].sum() / predicted, ce[("mean", layer)].sum() / predicted
        var = sq_y[layer] - mean_y[layer].pow(2).sum().item() * n_tokens
        records.append({
            "run": str(run.path), "model": run.model, "layer": layer, "method": method_name(run.config["sparse"]),
            "k": run.layer.config.k, "seed": run.config.get("seed"), "n_params": run.layer.param_count(),
            "n_latents": run.layer.n_latents, "train_tokens": run.config.get("train_tokens"),
            "eval_tokens": n_tokens, "eval_dtype": dtype, "eval_split": cfg.eval_split,
            "nmse": s["err"] / sq_y[layer], "fvu": s["err"] / var,
            **firing_metrics(s["fired"], n_tokens),
            "ce_base": ce_base, "ce_spliced": ce_spliced, "ce_zero": ce_zero, "ce_mean_ablation": ce_mean,
            "delta_ce": ce_spliced - ce_base,
            "ce_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_base) if ce_zero != ce_base else math.nan,
            **_paired_ci(ce["base"], ce[("run", i)], ce[("zero", layer)], per_seq),
            "kl": kl[i] / predicted,
            "ablations": {name: {"nmse": ablation_err[(name, j)] / sq_y[layer],
                                 "delta_ce": ce[(name, j)].sum() / predicted - ce_base}
                          for (name, j) in stand_ins if j == i},
            "expert_rank": _expert_rank(run, cfg.rank_sample), "firing": _firing(s["fired"], n_tokens),
            "eval_config": asdict(cfg), "config": run.config,
        })
    _add_expert_shares(records)
    return records


def _add_expert_shares(records: list[dict]) -> None:
    """Per MxD record with ablations: what the experts add over a dense path without them.

    The reference is a dense-only MxD (k = 0) evaluated with it at the same layer when there is one,
    else the run's own mean-routing ablation. experts_share = (ref nmse − nmse) / ref nmse, the share
    of the reference's error the experts remove; each ablation's `retained_nmse` / `retained_delta_ce`
    = (ref − ablated) / (ref − full), the share of the reference → MxD improvement it keeps.
    """
    dense_only = {r["layer"]: r for r in records if r["method"] == "mxd" and r["n_latents"] == 0}
    for r in records:
        if not r["ablations"]:
            continue
        ref = dense_only.get(r["layer"])
        ref_name = "dense_only_run" if ref else "mean_routing"
        ref = ref or r["ablations"].get("mean_routing")
        if ref is None:
            continue
        r["experts_share"] = (ref["nmse"] - r["nmse"]) / ref["nmse"] if ref["nmse"] else math.nan
        r["experts_share_reference"] = ref_name if ref_name == "mean_routing" else ref.get("run")
        for metric in ("nmse", "delta_ce"):
            gain = ref[metric] - r[metric]
            for a in r["ablations"].values():
                a[f"retained_{metric}"] = (ref[metric] - a[metric]) / gain if gain else math.nan


COLUMNS = ("method", "k", "n_params", "nmse", "fvu", "l0", "effective_l0", "dense", "dead", "delta_ce", "ce_recovered",
           "kl")


def markdown_table(records: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """A Markdown table of the given columns, one row per record."""
    def cell(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(("run",) + columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for r in records:
        lines.append("| " + " | ".join([Path(r["run"]).name] + [cell(r.get(c)) for c in columns]) + " |")
    return "\n".join(lines)


def experts_table(records: list[dict]) -> str | None:
    """A Markdown table of what MxD runs' experts add: experts_share and, per ablation, nmse,
    delta_ce and the share of the reference → MxD improvement retained (None when no run has ablations)."""
    rows = [r for r in records if r.get("ablations")]
    if not rows:
        return None
    head = ["run", "k", "nmse", "delta_ce", "experts_share"] + [f"{a}: nmse / delta_ce / retained" for a in ABLATIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [Path(r["run"]).name, str(r["k"]), f"{r['nmse']:.4f}", f"{r['delta_ce']:.4f}",
                 "n/a" if r.get("experts_share") is None else f"{r['experts_share']:.3f}"]
        for name in ABLATIONS:
            a = r["ablations"].get(name)
            cells.append("n/a" if a is None else f"{a['nmse']:.4f} / {a['delta_ce']:.4f} / {a.get('retained_nmse', math.nan):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(records: list[dict], runs: list[RunInfo], out: Path | None) -> None:
    """Each run's record to RUN/eval.json (and its model card refreshed, for mxd runs); with `out`,
    all of them to out/eval.json and out/eval.md. `runs`: the evaluated runs, in the records' order."""
    for r, run in zip(records, runs):
        (run.path / EVAL_FILE).write_text(json.dumps(r, indent=1) + "\n")
        if (run.path / RUN_CONFIG).is_file():
            write_model_card(run)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / EVAL_FILE).write_text(json.dumps(records, indent=1) + "\n")
        experts = experts_table(records)
        (out / "eval.md").write_text(markdown_table(records) + "\n" + (f"\n{EXPERTS_CAPTION}\n\n{experts}\n" if experts else ""))


def evaluate_paths(paths: list[str], cfg: EvalConfig, out: str | None = None, progress: bool = True,
                   site: SiteOptions | None = None) -> list[dict]:
    """`mxd eval`: read the runs under `paths`, evaluate them together, write the results."""
    runs = [read_run(p, site=site) for p in find_runs(paths)]
    records = evaluate_runs(runs, cfg, progress=progress)
    write_results(records, runs, Path(out) if out else None)
    return records
