"""Table of the last validation record of every run under a folder: python summarise.py runs/always-on"""

import json
import sys
from pathlib import Path

KEYS = ("val_nmse", "val_l0", "val_effective_l0", "val_always_on_slots", "val_dense", "val_dead")
rows = []
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [r for r in records if "val_nmse" in r]
    if val:
        rows.append({"run": metrics.parent.name, "tokens": val[-1]["tokens"]} | {k: val[-1].get(k) for k in KEYS})
print("| run | tokens | " + " | ".join(k.removeprefix("val_") for k in KEYS) + " |")
print("|---|---|" + "---|" * len(KEYS))
for r in rows:
    cells = [f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in KEYS]
    print(f"| {r['run']} | {r['tokens']:,} | " + " | ".join(cells) + " |")
