"""`mxd steer`: push one expert (or transcoder latent) while the model generates, and measure the effect.

    run = read_run("runs/demo/mxd-k32-seed0")
    model, tokenizer = run.load_model()
    site = find_mlp(model, run.layer_index, run.module_path)
    with steer(model, site, run.layer, expert=42, value=20.0):          # or mode="clamp"
        ids = model.generate(...)

Inside the block the MLP's real output y becomes y + Δ · o_n(x), where o_n(x) is expert n's output
per unit coefficient (c_n ⊙ Dᵀz for an MxD, W_d[n] for a transcoder) and Δ is `value` (mode "add",
the paper adds +100) or value − a_n(x) (mode "clamp": the coefficient is set to `value`). This is
exactly the change that editing the coefficient makes to the sparse layer's output, applied to the
real model (its reconstruction error is kept), at every position, prompt and generated tokens alike.

`compare` generates unsteered and steered continuations of each prompt (greedy by default) and
measures the shift of: a keyword score (share of continuation tokens that are keywords, by default
the tokens the expert's output on the prompts promotes through the unembedding), optionally a
probe's mean log-odds of a class (a logistic regression on the mean-pooled MLP inputs of a labelled
task, see mxd.probe, applied to prompt + continuation read by the unsteered model), and the
continuations' perplexity under the unsteered model (fluency).
"""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mxd.checks import check_at_least, check_experts
from mxd.layers import MxD, SparseLayer
from mxd.models import MLPSite, find_mlp, logit_effects, mlp_activations, mlp_hooks
from mxd.probe import balanced, pooled_features
from mxd.runs import read_run
from mxd.tasks import load_task

MODES = ("add", "clamp")
DEFAULT_PROMPTS = ["The weather today is", "My favourite food is", "In the news this morning,"]


@dataclass
class SteerConfig:
    """Which expert is steered, how, and on which prompts.

    run: training run folder; expert: the expert (latent) index steered; value: added to its
    coefficient (mode add) or the coefficient it is clamped to (mode clamp); mode: add or clamp;
    prompts: prompts continued with and without steering; max_new_tokens: tokens generated per
    prompt; sample: sample (seeded) instead of greedy decoding; seed: sampling seed; keywords: tokens
    counted by the keyword score, default the expert's top promoted tokens; n_keywords: how many
    promoted tokens form the default keywords; probe_task: a labelled task (see mxd probe) whose
    probe scores the continuations (none: no probe); probe_class: the class whose log-odds are
    reported (default the task's first); width: characters per column when printing
    """

    run: str = "runs/mxd"
    expert: int = 0
    value: float = 20.0
    mode: str = "add"
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 30
    sample: bool = False
    seed: int = 0
    keywords: list[str] | None = None
    n_keywords: int = 20
    probe_task: str | None = None
    probe_class: str | None = None
    width: int = 60

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: valid values are {', '.join(MODES)}")
        if not self.prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        check_at_least(self, 1, "max_new_tokens", "n_keywords", "width")


def unit_output(layer: SparseLayer, x: Tensor, expert: int) -> Tensor:
    """Expert `expert`'s output per unit coefficient at each token.  [B, d_in] -> [B, d_out]."""
    if isinstance(layer, MxD):
        return layer.modulators[expert] * layer.decoder(layer.hidden(x))  # c_n ⊙ Dᵀz
    return layer.decoder[expert].expand(len(x), -1)  # W_d[n]


@contextmanager
def steer(model: nn.Module, site: MLPSite, layer: SparseLayer, expert: int, value: float,
          mode: str = "add") -> Iterator[None]:
    """Within the block, the MLP at `site` outputs y + Δ · o_n(x) (see the module doc); restored on exit."""
    check_experts([expert], layer.n_latents)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: valid values are {', '.join(MODES)}")
    dtype = next(layer.parameters()).dtype

    def edit(site, x, y):
        x = x.reshape(-1, x.shape[-1]).to(dtype)  # [B, d_in]
        if mode == "add":
            delta = torch.full((len(x), 1), value, dtype=dtype, device=x.device)
        else:
            codes = layer.encode(x)
            current = (codes.values * (codes.indices == expert)).sum(-1, keepdim=True)  # a_n [B, 1]
            delta = value - current
        return y + (delta * unit_output(layer, x, expert)).reshape(y.shape).to(y.dtype)

    with torch.no_grad(), mlp_hooks([site], edit):
        yield


def _prompt_ids(tokenizer, prompt: str, device) -> Tensor:
    return tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, s], BOS where the model wants it


@torch.no_grad()
def continuation(model, tokenizer, prompt: str, cfg: SteerConfig) -> Tensor:
    """The generated token ids (without the prompt): [n_new]."""
    ids = _prompt_ids(tokenizer, prompt, next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                         do_sample=cfg.sample, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].cpu()


@torch.no_grad()
def perplexity(model, tokenizer, prompt: str, new: Tensor) -> float:
    """exp(mean next-token cross-entropy) of the continuation `new` [n] after the prompt."""
    ids = _prompt_ids(tokenizer, prompt, new.device)
    full = torch.cat([ids[0], new])[None].to(next(model.parameters()).device)
    logits = model(full).logits[0, ids.shape[1] - 1 : -1].float()  # predictions of the new tokens
    return float(torch.nn.functional.cross_entropy(logits, full[0, ids.shape[1] :]).exp())


def keyword_score(tokenizer, new: Tensor, keywords: set[str]) -> float:
    """Share of the tokens of `new` whose text (stripped, lower case) is one of the keywords."""
    words = [tokenizer.decode([t]).strip().lower() for t in new.tolist()]
    return sum(w in keywords for w in words) / max(len(words), 1)


@torch.no_grad()
def promoted_tokens(model, tokenizer, site, layer: SparseLayer, expert: int, prompts: list[str], n: int) -> list[str]:
    """The n tokens the expert's output (averaged over the prompts' tokens) promotes most through the unembedding."""
    device = next(model.parameters()).device
    xs = [mlp_activations(model, _prompt_ids(tokenizer, p, device), [site])[site.layer][0][0] for p in prompts]
    x = torch.cat(xs).to(next(layer.parameters()).dtype)  # [tokens, d_in]
    direction = unit_output(layer, x, expert).mean(0, keepdim=True)  # [1, d_out]
    top = logit_effects(model, direction)[0].topk(n).indices.tolist()
    return [tokenizer.decode([t]) for t in top]


def _train_probe(model, tokenizer, site, cfg: SteerConfig):
    """(logistic regression on mean-pooled MLP inputs, class name) for cfg.probe_task, one class vs the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task = load_task(cfg.probe_task, max_per_class=250, seed=cfg.seed)
    target = cfg.probe_class or task.classes[0]
    if target not in task.classes:
        raise ValueError(f"probe_class={target!r} is not a class of task {cfg.probe_task!r}: {', '.join(task.classes)}")
    labels = np.array(task.labels, dtype=object)
    rows, y = balanced(np.arange(len(labels)), labels == target, np.random.default_rng(cfg.seed))
    raw, _ = pooled_features(model, tokenizer, site, [], [task.texts[i] for i in rows], 128, 16, progress=False)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(raw.numpy(), y)
    return probe, target


def compare(cfg: SteerConfig) -> dict:
    """Unsteered and steered continuations of every prompt and the measured shifts (see the module doc)."""
    run = read_run(cfg.run)
    check_experts([cfg.expert], run.layer.n_latents)
    model, tokenizer = run.load_model()
    site = find_mlp(model, run.layer_index, run.module_path)
    keywords = cfg.keywords or promoted_tokens(model, tokenizer, site, run.layer, cfg.expert, cfg.prompts, cfg.n_keywords)
    keyword_set = {k.strip().lower() for k in keywords if k.strip()}
    probe, target = _train_probe(model, tokenizer, site, cfg) if cfg.probe_task else (None, None)

    rows = []
    for prompt in cfg.prompts:
        plain = continuation(model, tokenizer, prompt, cfg)
        with steer(model, site, run.layer, cfg.expert, cfg.value, cfg.mode):
            steered = continuation(model, tokenizer, prompt, cfg)
        row = {"prompt": prompt}
        for name, new in (("unsteered", plain), ("steered", steered)):
            row[name] = tokenizer.decode(new)
            row[f"{name}_keywords"] = keyword_score(tokenizer, new, keyword_set)
            row[f"{name}_perplexity"] = perplexity(model, tokenizer, prompt, new)
        if probe is not None:
            texts = [prompt + row["unsteered"], prompt + row["steered"]]
            raw, _ = pooled_features(model, tokenizer, site, [], texts, 128, 2, progress=False)
            log_odds = probe.decision_function(raw.numpy())  # of the target class (probe.classes_ is [False, True])
            row["unsteered_probe"], row["steered_probe"] = float(log_odds[0]), float(log_odds[1])
        rows.append(row)
    means = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key.endswith(("_keywords", "_perplexity", "_probe"))}
    return {"run": cfg.run, "expert": cfg.expert, "mode": cfg.mode, "value": cfg.value, "keywords": sorted(keyword_set),
            "probe": f"{cfg.probe_task}={target}" if probe is not None else None, "rows": rows, "means": means}


def format_comparison(result: dict, width: int = 60) -> str:
    """The continuations side by side, then the mean scores unsteered -> steered."""
    lines = [f"expert {result['expert']} of {result['run']}, {result['mode']} {result['value']:g}"]
    for row in result["rows"]:
        lines += ["", f"prompt: {row['prompt']}", f"{'unsteered':<{width}} | steered", "-" * width + "-+-" + "-" * width]
        left = textwrap.wrap(row["unsteered"].replace("\n", " ⏎ "), width) or [""]
        right = textwrap.wrap(row["steered"].replace("\n", " ⏎ "), width) or [""]
        lines += [f"{a:<{width}} | {b}" for a, b in zip_longest(left, right, fillvalue="")]
    m = result["means"]
    shown_keywords = ", ".join(repr(k) for k in result["keywords"][:10]) + (", ..." if len(result["keywords"]) > 10 else "")
    lines += ["", f"keyword score (share of continuation tokens in {{{shown_keywords}}}): "
                  f"{m['unsteered_keywords']:.3f} -> {m['steered_keywords']:.3f} "
                  f"({m['steered_keywords'] - m['unsteered_keywords']:+.3f})"]
    if result["probe"]:
        lines.append(f"probe log-odds of {result['probe']}: {m['unsteered_probe']:.2f} -> {m['steered_probe']:.2f} "
                     f"({m['steered_probe'] - m['unsteered_probe']:+.2f})")
    lines.append(f"perplexity under the unsteered model: {m['unsteered_perplexity']:.1f} -> {m['steered_perplexity']:.1f}")
    return "\n".join(lines)
