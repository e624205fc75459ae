"""One training step of our sparse layers vs the dense reference of the same layer (GitHub issue 6).

A step is what the trainer does per batch: zero_grad, forward, nmse loss, backward, Adam step (fused
Adam for both sides; see benchmarks/README.md for the per-op Adam). "ours"
runs `layer(x)` (mxd.sparse_ops kernels); "dense" runs `mxd.reference.dense_forward(layer, x)`: the
top-k coefficients scattered into a [B, N] tensor and dense matmuls forward and backward, as in the
paper's code, from a copy of the same parameters with its own Adam. Layers: an MxD with
d_in = d_out = 576, H = 1536, GLU/SiLU (SmolLM2-135M's MLP), N experts, K active; and the TopK
transcoder with the same parameter count (width M = N + 2,305 at these sizes). Inputs are N(0, 1).

Reported per cell (N, K, dtype; dtype bf16 = CPU bf16 autocast):
- tokens/s = B / median step time; repetitions of ours, dense and the matmul, in every requested
  dtype, are interleaved so that load from other processes hits all alike; `load_avg_1min` is
  recorded with each cell. With both dtypes, `ours_bf16_over_fp32` (our bf16 step's speed-up over
  our fp32 step) comes from those interleaved timings, next to `matmul_bf16_over_fp32`, the same
  ratio for the reference GEMM: what bf16 can gain at most where all the work is GEMMs.
- peak activation memory (bytes): each side runs 2 steps in a fresh subprocess (glibc mmap threshold
  fixed at 128 KiB so freed tensors leave the resident set); the figure is the peak resident set
  during the steps (VmHWM, reset through /proc/self/clear_refs) minus the resident set just before
  them, when parameters, gradients and Adam state are already allocated.
- useful FLOPs: the work no implementation can skip, one formula for ours and dense:
    MxD         2·B·N·I            router logits (all N are needed for the top-k)
              + 2·2·B·K·I          router backward, input and weight gradients of the K selected rows
              + 3·2·B·I·H·2        encoder and up projection (GLU), forward + input and weight gradients
              + 3·2·B·H·O          shared decoder, the same
              + 3·2·B·K·O          the K-sparse modulator combination C a, forward + both gradients
    Transcoder  2·B·M·I + 2·2·B·K·I + 3·2·B·K·O    (encoder logits, its sparse backward, K-sparse decoder)
  with I = d_in, O = d_out. useful GFLOP/s = useful FLOPs / step time; `matmul_gflops` is a
  [B, I] @ [I, N] GEMM (the router's shape) in the cell's dtype into a preallocated output, timed
  in the same run.

    python benchmarks/layers.py                                    # the full grid, table on stdout
    python benchmarks/layers.py --n-experts 16384 --k 32 --dtype fp32 --json out.json   # one cell
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from mxd import MxD, MxDConfig, Transcoder, TranscoderConfig
from mxd.reference import dense_forward
from mxd.train import reconstruction_loss

D_IN = D_OUT = 576
D_HIDDEN = 1536
SIDES = ("ours", "dense")


def build(kind: str, n_experts: int, k: int, seed: int = 0):
    """The MxD with N experts, or the TopK transcoder with the same parameter count."""
    torch.manual_seed(seed)
    mxd = MxDConfig(D_IN, D_OUT, D_HIDDEN, n_experts, k, activation="silu", glu=True)
    if kind == "mxd":
        return MxD(mxd)
    width = round((mxd.param_count() - D_OUT) / (D_IN + D_OUT + 1))
    return Transcoder(TranscoderConfig(D_IN, D_OUT, width, k))


def useful_flops(layer, batch: int) -> float:
    """The useful FLOPs of one training step (see the module docstring)."""
    c, b = layer.config, batch
    if isinstance(layer, MxD):
        return (2 * b * c.n_experts * c.d_in + 4 * b * c.k * c.d_in + 3 * 2 * b * c.d_in * c.d_hidden * 2
                + 3 * 2 * b * c.d_hidden * c.d_out + 3 * 2 * b * c.k * c.d_out)
    return 2 * b * c.width * c.d_in + 4 * b * c.k * c.d_in + 3 * 2 * b * c.k * c.d_out


class Step:
    """One training step of `layer` (ours or the dense reference) with `opt`, by default its own
    Adam (fused: one pass over each parameter, several times faster than the per-op Adam on CPU)."""

    def __init__(self, layer, side: str, dtype: str, opt: torch.optim.Optimizer | None = None):
        self.layer, self.side = layer, side
        self.autocast = dtype == "bf16"
        self.opt = opt or torch.optim.Adam(layer.parameters(), lr=1e-4, fused=True)

    def init_state(self) -> None:
        """Allocate gradients and Adam state without changing the parameters (a zero-gradient step)."""
        for p in self.layer.parameters():
            p.grad = torch.zeros_like(p)
        self.opt.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            y_hat = self.layer(x)[0] if self.side == "ours" else dense_forward(self.layer, x)
            loss = reconstruction_loss(y_hat, y)
        loss.backward()
        self.opt.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_step(batch: int, n: int, dtype: str):
    """A [batch, I] @ [I, n] GEMM in `dtype` into a preallocated output, and its FLOPs.

    The output is allocated once so that the figure is the GEMM's, not the page faults of a fresh
    [batch, n] tensor (up to 1 GiB) on every call.
    """
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b, out = torch.randn(batch, D_IN, dtype=dt), torch.randn(D_IN, n, dtype=dt), torch.empty(batch, n, dtype=dt)
    return (lambda: torch.mm(a, b, out=out)), 2 * batch * D_IN * n


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def probe_memory(kind: str, side: str, n_experts: int, k: int, dtype: str, batch: int) -> dict:
    """Peak activation bytes of 2 steps of one side (run in a fresh process: see `memory`)."""
    step = Step(build(kind, n_experts, k), side, dtype)
    x, y = torch.randn(batch, D_IN), torch.randn(batch, D_OUT)
    step.init_state()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    for _ in range(2):
        step(x, y)
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024, "base_rss_bytes": base * 1024}


def memory(kind: str, side: str, n_experts: int, k: int, dtype: str, batch: int) -> dict:
    """`probe_memory` in a fresh interpreter, so that neither side inherits the other's peak."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    args = [sys.executable, __file__, "--probe", kind, side, "--n-experts", str(n_experts), "--k", str(k),
            "--dtype", dtype, "--batch", str(batch)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def run_cell(kind: str, n_experts: int, k: int, dtypes: list[str], batch: int, reps: int) -> list[dict]:
    """Interleaved timings and subprocess memory of ours vs dense for one layer and (N, K), a record per dtype.

    All dtypes' steps are interleaved in one loop, so that `ours_bf16_over_fp32` compares timings
    taken under the same load.
    """
    ours = {dtype: build(kind, n_experts, k) for dtype in dtypes}
    steps = {(dtype, side): Step(ours[dtype] if side == "ours" else copy.deepcopy(ours[dtype]), side, dtype)
             for dtype in dtypes for side in SIDES}
    gemms = {dtype: matmul_step(batch, n_experts, dtype) for dtype in dtypes}
    x, y = torch.randn(batch, D_IN), torch.randn(batch, D_OUT)
    times = {key: [] for key in [*steps, *((dtype, "matmul") for dtype in dtypes)]}
    for step in steps.values():
        step(x, y)  # warm-up
    for gemm, _ in gemms.values():
        gemm()
    for _ in range(reps):
        for dtype in dtypes:
            for side in SIDES:
                times[dtype, side].append(timed(lambda: steps[dtype, side](x, y)))
            times[dtype, "matmul"].append(timed(gemms[dtype][0]))
    median = {key: statistics.median(t) for key, t in times.items()}
    records = []
    for dtype in dtypes:
        mem = {side: memory(kind, side, n_experts, k, dtype, batch) for side in SIDES}
        flops = useful_flops(ours[dtype], batch)
        matmul_gflops = gemms[dtype][1] / median[dtype, "matmul"] / 1e9
        ours_useful = flops / median[dtype, "ours"] / 1e9
        records.append({
            "layer": kind, "n_experts": n_experts, "k": k, "dtype": dtype, "batch_tokens": batch,
            "latents": ours[dtype].n_latents, "params": ours[dtype].param_count(), "reps": reps,
            "ours_tokens_per_s": batch / median[dtype, "ours"], "dense_tokens_per_s": batch / median[dtype, "dense"],
            "ratio": median[dtype, "dense"] / median[dtype, "ours"],
            "ours_step_s": times[dtype, "ours"], "dense_step_s": times[dtype, "dense"],
            "ours_peak_bytes": mem["ours"]["peak_bytes"], "dense_peak_bytes": mem["dense"]["peak_bytes"],
            "ours_base_rss_bytes": mem["ours"]["base_rss_bytes"], "dense_base_rss_bytes": mem["dense"]["base_rss_bytes"],
            "useful_gflop_per_step": flops / 1e9, "matmul_gflops": matmul_gflops,
            "ours_useful_gflops": ours_useful, "dense_useful_gflops": flops / median[dtype, "dense"] / 1e9,
            "ours_matmul_fraction": ours_useful / matmul_gflops,
            "load_avg_1min": os.getloadavg()[0], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    if set(dtypes) >= {"fp32", "bf16"}:
        for record in records:
            record["ours_bf16_over_fp32"] = median["fp32", "ours"] / median["bf16", "ours"]
            record["matmul_bf16_over_fp32"] = median["fp32", "matmul"] / median["bf16", "matmul"]  # the GEMMs' own gain
    return records


def _speedups(record: dict) -> str:
    """"2.05x (2.28x)": our bf16/fp32 step speed-up and the GEMM's, or "" for a one-dtype run."""
    if "ours_bf16_over_fp32" not in record:
        return ""
    return f"{record['ours_bf16_over_fp32']:.2f}x ({record['matmul_bf16_over_fp32']:.2f}x)"


def table(cells: list[dict]) -> str:
    mib = 2**20
    rows = ["| layer | latents | K | dtype | ours tok/s | dense tok/s | ratio | ours act MiB | dense act MiB | "
            "act ratio | useful GFLOP/s | matmul GFLOP/s | fraction | bf16/fp32 (GEMM) | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        rows.append(
            f"| {c['layer']} | {c['latents']:,} | {c['k']} | {c['dtype']} | {c['ours_tokens_per_s']:,.0f} | "
            f"{c['dense_tokens_per_s']:,.0f} | {c['ratio']:.2f}x | {c['ours_peak_bytes'] / mib:,.0f} | "
            f"{c['dense_peak_bytes'] / mib:,.0f} | {c['ours_peak_bytes'] / c['dense_peak_bytes']:.2f} | "
            f"{c['ours_useful_gflops']:.0f} | {c['matmul_gflops']:.0f} | {c['ours_matmul_fraction']:.0%} | "
            f"{_speedups(c)} | "
            f"{c['load_avg_1min']:.1f} |")
    return "\n".join(rows)


def profile(kind: str, n_experts: int, k: int, dtype: str, batch: int, rows: int = 20) -> None:
    """Print the operators that dominate our step."""
    step = Step(build(kind, n_experts, k), "ours", dtype)
    x, y = torch.randn(batch, D_IN), torch.randn(batch, D_OUT)
    step(x, y)
    with torch.profiler.profile() as prof:
        step(x, y)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-experts", type=int, nargs="+", default=[4096, 16384, 65536], help="MxD expert counts N")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 128], help="active experts/latents K")
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="fp32, or bf16 CPU autocast")
    parser.add_argument("--layer", nargs="+", choices=("mxd", "transcoder"), default=["mxd", "transcoder"],
                        help="MxD, and/or the TopK transcoder with the MxD's parameter count")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--json", help="write the results here: one cell's record, or {'cells': [...]}; a cell is the "
                        "MxD's record with the matched transcoder's under 'transcoder'")
    parser.add_argument("--profile", action="store_true", help="print a profile of our step per cell instead")
    parser.add_argument("--probe", nargs=2, metavar=("LAYER", "SIDE"), help=argparse.SUPPRESS)  # see `memory`
    args = parser.parse_args()
    if args.probe:
        (n,), (k,), (dtype,) = args.n_experts, args.k, args.dtype
        print(json.dumps(probe_memory(*args.probe, n, k, dtype, args.batch)))
        return
    cells = []
    for n in args.n_experts:
        for k in args.k:
            if args.profile:
                for dtype in args.dtype:
                    for kind in args.layer:
                        print(f"## {kind} N={n} K={k} {dtype}")
                        profile(kind, n, k, dtype, args.batch)
                continue
            by_layer = {}
            for kind in args.layer:
                by_layer[kind] = run_cell(kind, n, k, args.dtype, args.batch, args.reps)
                print(table(by_layer[kind]).split("\n", 2)[2], flush=True)
            for i, record in enumerate(by_layer[args.layer[0]]):
                cells.append(record | ({"transcoder": by_layer["transcoder"][i]} if len(by_layer) == 2 else {}))
    if args.profile:
        return
    print(table([r for c in cells for r in (c, c.get("transcoder")) if r]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells[0] if len(cells) == 1 else {"cells": cells}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
