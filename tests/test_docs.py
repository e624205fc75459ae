"""The printed outputs quoted in the README have the shape of what the commands print today (the
code blocks themselves run through Sybil: see conftest.py at the repository root)."""

import json
import re
from pathlib import Path

from mxd.demo import format_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> list[str]:
    """The lines of the first fenced block after `marker` in the README."""
    rest = README[README.index(marker):]
    return rest.split("```\n", 2)[1].splitlines()


def test_demo_output_has_the_columns_mxd_demo_prints():
    lines = _block_after("and prints (that run")
    assert lines[0].split() == format_table([]).split()
    rows = [line.split() for line in lines[1:] if line.startswith(("mxd ", "transcoder "))]
    assert [r[0] for r in rows] == ["mxd", "transcoder"] and all(len(r) == len(lines[0].split()) for r in rows)
    assert re.search(r"measured [^)]* on 20\d\d-\d\d-\d\d", README), "the demo output says when it was produced"


def _quoted_values_come_from(text: str, records) -> None:
    """Every 3-4 decimal figure in `text` is a rounded value of `records` (any JSON)."""
    values = list(_numbers(records))
    for quoted in re.findall(r"(?<![\d.])0\.\d{3,4}(?!\d)", text):
        digits = len(quoted) - 2
        assert any(round(v, digits) == float(quoted) for v in values), f"{quoted} is not in the results"


def test_frontier_figures_in_the_readme_come_from_their_results():
    """The README's learning-rate grid table from lr-grid/selection.json, the first frontier's figures from its frontier.json."""
    section = README[README.index("## Result: MxD vs transcoders"):README.index("## Result: a product-key router")]
    grid, first = section.split("**The first frontier")
    folder = ROOT / "experiments/smollm2-frontier"
    _quoted_values_come_from(grid, json.loads((folder / "lr-grid/selection.json").read_text()))
    _quoted_values_come_from(first, json.loads((folder / "first/frontier.json").read_text()))


def test_product_key_figures_in_the_readme_come_from_its_eval():
    section = README[README.index("## Result: a product-key router"):README.index("## Speed")]
    path = ROOT / "experiments/product-key-routing/eval.json"
    _quoted_values_come_from(section, json.loads(path.read_text()))


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


def test_speed_figures_in_the_readme_come_from_the_benchmark_results():
    """The tokens/s of the Speed section's first bullet are rounded values of benchmarks/results/layers-target*.json."""
    section = README[README.index("## Speed"):README.index("## Reading the experts")]
    cells = [c for path in sorted((ROOT / "benchmarks/results").glob("layers-target*.json"))
             for c in json.loads(path.read_text())["cells"] if c["layer"] == "mxd" and c["dtype"] == "fp32"]
    measured = {round(c[key]) for c in cells for key in ("ours_tokens_per_s", "dense_tokens_per_s")}
    bullet = section[section.index("**Speed.**"):section.index("- **Memory.**")]
    quoted = {int(n.replace(",", "")) for n in re.findall(r"\d,\d{3}", bullet)}
    assert quoted and quoted <= measured, quoted - measured
