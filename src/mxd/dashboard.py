"""`mxd inspect`: a static HTML dashboard of a trained layer's experts (or transcoder latents).

    write_dashboard(InspectConfig(run="runs/demo/mxd-k32-seed0", out="dashboard.html", experts=[7, 42]))

Per expert: its top-activating contexts (each token shaded by the expert's coefficient on it, the
top token outlined), firing frequency, a histogram of its non-zero coefficients, and the tokens its
mean output direction promotes and suppresses through the unembedding (the direct logit effect
head(norm(d)) − head(norm(0)) of the direction d, with the model's final norm and output head).

An expert's output on a token is a_n · (c_n ⊙ Dᵀz) for an MxD and a_n · W_d[n] for a transcoder;
its mean output direction averages that over the tokens where it fires. The activations come from
an activation cache (by default the run's held-out validation cache), which also holds the tokens,
or, for a run that streamed its activations, from the model on its text's validation split.
The page is one self-contained file (inline CSS, JS and images) that opens from disk; every piece of
text in it is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mxd.checks import check_at_least, check_experts
from mxd.activations import ActivationCache
from mxd.layers import MxD, SparseLayer
from mxd.data import load_blocks
from mxd.models import find_mlp, logit_effects, mlp_activations
from mxd.runs import RunInfo, read_run

SHADES = 10  # activation shading levels in the page


@dataclass
class InspectConfig:
    """What `mxd inspect` shows and where it writes it.

    run: training run folder (written by mxd train); out: the HTML file written; experts: expert
    (latent) indices to show, default every one that fired on the tokens read; cache: activation
    cache to read, default the run's validation cache, else its training cache (a streamed run
    without either runs the model on its text's validation split); max_tokens: tokens read; examples: top-activating contexts per expert; context_left, context_right: tokens
    shown before and after each top token; top_tokens: promoted and suppressed tokens listed per
    expert; bins: histogram bins; batch_tokens: tokens encoded at once
    """

    run: str = "runs/mxd"
    out: str = "dashboard.html"
    experts: list[int] | None = None
    cache: str | None = None
    max_tokens: int = 65_536
    examples: int = 5
    context_left: int = 10
    context_right: int = 3
    top_tokens: int = 8
    bins: int = 20
    batch_tokens: int = 4096

    def __post_init__(self):
        check_at_least(self, 1, "max_tokens", "examples", "top_tokens", "bins", "batch_tokens")
        check_at_least(self, 0, "context_left", "context_right")


@dataclass
class ExpertCard:
    """Everything shown for one expert (plain data: `render_html` escapes every string).

    contexts: one list of (token text, activation) per example, and the position of its top token;
    promoted, suppressed: (token text, logit effect), strongest first.
    """

    index: int
    frequency: float
    max_activation: float
    histogram: list[int]
    contexts: list[tuple[list[tuple[str, float]], int]]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


def activations(cfg: InspectConfig, run: RunInfo, model, tokenizer) -> tuple[Tensor, int, Iterator[Tensor], str]:
    """(token ids [T], context length, batches of MLP inputs [B, d_in] for those tokens in order, source name).

    From an activation cache (cfg.cache, else the run's validation or training cache), or, for a run
    that streamed its activations, computed from the validation split of its text source.
    """
    path = cfg.cache or run.val_cache or run.cache
    if path is not None:
        cache = ActivationCache(path, allow_partial=bool(run.config.get("allow_partial")))
        cache.check_matches(run.model, run.layer_index)
        tokens = torch.cat([cache.tokens(c).flatten() for c in range(len(cache.chunks))])[: cfg.max_tokens]
        batches = (x for x, _ in cache.batches(run.layer_index, cfg.batch_tokens, shuffle=False))
        return tokens, cache.manifest["context_len"], batches, str(path)
    ctx = run.data.context_len
    blocks = load_blocks(run.data, tokenizer, "validation", max(cfg.max_tokens, ctx))  # [n_blocks, ctx]
    site = find_mlp(model, run.layer_index, run.module_path)
    per_batch = max(1, cfg.batch_tokens // ctx)
    batches = (mlp_activations(model, blocks[i : i + per_batch], [site])[run.layer_index][0].flatten(0, 1)
               for i in range(0, len(blocks), per_batch))
    return blocks.flatten(), ctx, batches, f"{run.data.source} (validation split)"


@torch.no_grad()
def encode(layer: SparseLayer, n_tokens: int, batches: Iterator[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Encode the first n_tokens rows of the batches of MLP inputs.

    Returns indices [T, K], values [T, K] and output sums [N, d_out]: the sum over tokens of each
    expert's output a_n · (its output per unit coefficient).
    """
    indices, values, done = [], [], 0
    sums = torch.zeros(layer.n_latents, layer.config.d_out)  # [N, d_out]
    bar = tqdm(total=n_tokens, desc="encode", unit="tok", unit_scale=True)
    for x in batches:
        x = x[: n_tokens - done].float()  # [B, d_in]
        if not len(x):
            break
        codes = layer.encode(x)
        indices.append(codes.indices)
        values.append(codes.values.float())
        done += len(x)
        bar.update(len(x))
        flat = codes.indices.flatten()  # [B K]
        if isinstance(layer, MxD):  # Σ_t a_tn (Dᵀz_t); c_n ⊙ is applied once at the end
            u = layer.decoder(layer.hidden(x)).float()  # [B, d_out]
            sums.index_add_(0, flat, (codes.values.float()[..., None] * u[:, None]).flatten(0, 1))
        else:  # a transcoder latent always writes along W_d[n]
            sums.index_add_(0, flat, codes.values.float().flatten()[:, None] * layer.decoder[flat].float())
    bar.close()
    if isinstance(layer, MxD):
        sums *= layer.modulators.float()
    return torch.cat(indices), torch.cat(values), sums


def expert_cards(cfg: InspectConfig) -> tuple[list[ExpertCard], dict]:
    """The cards of the selected experts and a summary {run, kind, n_experts, n_tokens, fired, ...}."""
    run = read_run(cfg.run)
    layer = run.layer
    if cfg.experts is not None:
        check_experts(cfg.experts, layer.n_latents)
    model, tokenizer = run.load_model()
    tokens, ctx, batches, source = activations(cfg, run, model, tokenizer)
    indices, values, sums = encode(layer, len(tokens), batches)
    n_tokens, k = indices.shape

    # Every (expert, token, value) entry, grouped by expert and sorted by decreasing value.
    flat_expert = indices.flatten().numpy()
    flat_value = values.flatten().numpy()
    flat_token = np.repeat(np.arange(n_tokens), k)
    live = flat_value != 0  # fired (signed MxD coefficients may be negative)
    flat_expert, flat_value, flat_token = flat_expert[live], flat_value[live], flat_token[live]
    order = np.lexsort((-flat_value, flat_expert))
    flat_expert, flat_value, flat_token = flat_expert[order], flat_value[order], flat_token[order]
    counts = np.bincount(flat_expert, minlength=layer.n_latents)
    starts = np.concatenate([[0], np.cumsum(counts)])

    experts = cfg.experts if cfg.experts is not None else np.flatnonzero(counts).tolist()
    chosen = torch.tensor(experts, dtype=torch.long)
    directions = sums[chosen] / torch.from_numpy(counts[experts]).clamp_min(1)[:, None].float()  # mean outputs
    effects = torch.cat([logit_effects(model, d) for d in directions.split(256)]) if experts else torch.empty(0, 1)
    n_top = min(cfg.top_tokens, effects.shape[1])
    (up, up_ids), (down, down_ids) = effects.topk(n_top, dim=1), (-effects).topk(n_top, dim=1)
    text = _TokenText(tokenizer)

    cards = []
    for row, e in enumerate(experts):
        e_values = flat_value[starts[e] : starts[e + 1]]  # decreasing
        e_tokens = flat_token[starts[e] : starts[e + 1]]
        top = float(e_values[0]) if len(e_values) else 0.0
        contexts = []
        for t in e_tokens[: cfg.examples]:
            block = t - t % ctx
            lo, hi = max(t - cfg.context_left, block), min(t + cfg.context_right + 1, block + ctx)
            acts = (values[lo:hi] * (indices[lo:hi] == e)).sum(1).tolist()  # expert e's coefficient per token
            contexts.append(([(text(int(tokens[i])), a) for i, a in zip(range(lo, hi), acts)], int(t - lo)))
        fired = len(e_values) > 0
        cards.append(ExpertCard(
            index=e,
            frequency=counts[e] / n_tokens,
            max_activation=top,
            histogram=np.histogram(e_values, bins=cfg.bins,
                                   range=(min(float(e_values[-1]), 0.0) if fired else 0.0, max(top, 1e-6)))[0].tolist(),
            contexts=contexts,
            promoted=[(text(i), v) for v, i in zip(up[row].tolist(), up_ids[row].tolist())] if fired else [],
            suppressed=[(text(i), -v) for v, i in zip(down[row].tolist(), down_ids[row].tolist())] if fired else [],
        ))
    summary = {
        "run": str(run.path), "kind": type(layer).__name__, "model": run.model, "layer": run.layer_index,
        "source": source, "n_experts": layer.n_latents, "n_tokens": n_tokens,
        "fired": int((counts > 0).sum()), "frequencies": (counts / n_tokens).tolist(),
    }
    return cards, summary


class _TokenText:
    """Token id -> its text (decoded alone, newlines and tabs made visible), memoised."""

    def __init__(self, tokenizer):
        self.tokenizer, self.memo = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.memo:
            self.memo[token] = self.tokenizer.decode([token]).replace("\n", "⏎").replace("\t", "⇥")
        return self.memo[token]


# ---------------------------------------------------------------- HTML


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _svg_histogram(counts: list[int], width: int = 200, height: int = 40) -> str:
    """Bars of the counts as an inline SVG."""
    top, w = max(max(counts), 1), width / len(counts)
    bars = "".join(f'<rect x="{i * w:.1f}" y="{height - height * c / top:.1f}" width="{w - 1:.1f}" '
                   f'height="{height * c / top:.1f}"/>' for i, c in enumerate(counts) if c)
    return f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{bars}</svg>'


def _context_html(tokens: list[tuple[str, float]], top: int, scale: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(tokens):
        level = min(SHADES, int(np.ceil(SHADES * act / scale))) if act > 0 else 0
        cls = " ".join(filter(None, [f"a{level}" if level else "", "top" if i == top else ""]))
        spans.append(f'<i class="{cls}">{_e(tok)}</i>' if cls else f"<i>{_e(tok)}</i>")
    return f'<div class="ctx">{"".join(spans)}<span class="v">{tokens[top][1]:.2f}</span></div>'


def _token_list(pairs: list[tuple[str, float]]) -> str:
    return " ".join(f'<code title="{v:+.2f}">{_e(t)}</code>' for t, v in pairs)


def _card_html(card: ExpertCard) -> str:
    contexts = "".join(_context_html(tokens, top, card.max_activation) for tokens, top in card.contexts)
    return (
        f'<section class="card" id="e{card.index}" data-id="{card.index}" data-freq="{card.frequency:.6g}" '
        f'data-max="{card.max_activation:.4g}"><h2>expert {card.index}</h2>'
        f'<p class="stats">fires on {card.frequency:.3%} of tokens · max {card.max_activation:.2f}</p>'
        f"{_svg_histogram(card.histogram)}"
        f'<p class="up">promotes {_token_list(card.promoted)}</p>'
        f'<p class="down">suppresses {_token_list(card.suppressed)}</p>'
        f"{contexts or '<p>never fired on these tokens</p>'}</section>"
    )


def _row_html(card: ExpertCard) -> str:
    return (f'<tr data-id="{card.index}"><td><a href="#e{card.index}">{card.index}</a></td>'
            f"<td>{card.frequency:.3%}</td><td>{card.max_activation:.2f}</td>"
            f"<td>{_token_list(card.promoted[:3])}</td></tr>")


def _frequency_plot(frequencies: list[float]) -> str:
    """A PNG (base64 data URI) of the distribution of log10 firing frequencies over the live experts."""
    from matplotlib.figure import Figure

    freq = np.asarray(frequencies)
    fig = Figure(figsize=(6, 2.2), dpi=80)
    ax = fig.subplots()
    ax.hist(np.log10(freq[freq > 0]), bins=40, color="#c60")
    ax.set(xlabel="log10 firing frequency", ylabel="experts")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222}
#bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
#index{border-collapse:collapse;margin:1em 0;max-height:20em;display:block;overflow-y:auto}
#index td,#index th{padding:0 .8em;text-align:left}#index th{cursor:pointer}
.card{border:1px solid #ccc;border-radius:6px;padding:.4em 1em;margin:.8em 0}
.card h2{font-size:1.05em;margin:.2em 0}.stats{color:#555;margin:.2em 0}
.hist{fill:#c60;background:#f6f6f6}
.ctx{font:13px ui-monospace,monospace;white-space:pre;overflow-x:auto;margin:.15em 0}
i{font-style:normal}.top{box-shadow:inset 0 -3px #036;font-weight:bold}.v{color:#036;margin-left:1em}
$shades
code{background:#eef;padding:0 .2em;white-space:pre}.down code{background:#fee}
</style></head><body>
<h1>$title</h1><p>$summary</p><img alt="firing frequencies" src="$plot">
<div id="bar"><input id="q" type="search" placeholder="search tokens or expert id" size="40">
<select id="sort"><option value="freq-desc">frequency ↓</option><option value="freq-asc">frequency ↑</option>
<option value="max-desc">max activation ↓</option><option value="id-asc">index</option></select>
<span id="count"></span></div>
<table id="index"><thead><tr><th data-sort="id-asc">expert</th><th data-sort="freq-desc">frequency</th>
<th data-sort="max-desc">max</th><th>promotes</th></tr></thead><tbody>$rows</tbody></table>
<main id="cards">$cards</main>
<script>
"use strict";
const cards = Array.from(document.querySelectorAll(".card"));
const rows = new Map(Array.from(document.querySelectorAll("#index tbody tr")).map(r => [r.dataset.id, r]));
const keys = {"freq-desc": c => -c.dataset.freq, "freq-asc": c => +c.dataset.freq,
              "max-desc": c => -c.dataset.max, "id-asc": c => +c.dataset.id};
function update() {
  const q = document.getElementById("q").value.trim().toLowerCase();
  const key = keys[document.getElementById("sort").value];
  cards.sort((a, b) => key(a) - key(b));
  let shown = 0;
  for (const card of cards) {
    const hit = !q || card.dataset.id === q || card.textContent.toLowerCase().includes(q);
    card.hidden = !hit; rows.get(card.dataset.id).hidden = !hit; shown += hit;
    document.getElementById("cards").appendChild(card);
    document.querySelector("#index tbody").appendChild(rows.get(card.dataset.id));
  }
  document.getElementById("count").textContent = shown + " of " + cards.length + " experts";
}
document.getElementById("q").addEventListener("input", update);
document.getElementById("sort").addEventListener("change", update);
for (const th of document.querySelectorAll("#index th[data-sort]"))
  th.addEventListener("click", () => { document.getElementById("sort").value = th.dataset.sort; update(); });
update();
document.body.dataset.ready = String(cards.length);
</script></body></html>
""")


def render_html(cards: list[ExpertCard], summary: dict) -> str:
    """The self-contained dashboard page."""
    shades = "".join(f".a{i}{{background:rgba(255,120,0,{i / SHADES:.1f})}}" for i in range(1, SHADES + 1))
    text = (f"{summary['kind']} with {summary['n_experts']:,} experts on layer {summary['layer']} of "
            f"{summary['model']}; {summary['n_tokens']:,} tokens of {summary['source']}; "
            f"{summary['fired']:,} experts fired ({1 - summary['fired'] / summary['n_experts']:.1%} dead); "
            f"{len(cards):,} shown")
    return _PAGE.substitute(
        title=_e(f"mxd inspect: {summary['run']}"), summary=_e(text), shades=shades,
        plot=_frequency_plot(summary["frequencies"]), rows="".join(map(_row_html, cards)),
        cards="".join(map(_card_html, cards)),
    )


def write_dashboard(cfg: InspectConfig) -> dict:
    """Compute the cards and write the page to cfg.out; returns the summary (without frequencies)."""
    start = time.perf_counter()
    cards, summary = expert_cards(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(cards, summary), encoding="utf-8")
    summary.pop("frequencies")
    summary.update(out=str(out), cards=len(cards), bytes=out.stat().st_size, seconds=time.perf_counter() - start)
    return summary
