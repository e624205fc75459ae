"""mxd inspect: run folders, expert cards checked against a direct encoding, HTML escaping, headless Chromium.

`tiny_runs` (conftest.py: an MxD and a transcoder trained briefly on layer 1 of a tiny Llama) is
shared with test_probe.py and test_steer.py.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

import mxd
from mxd.activations import ActivationCache
from mxd.cli import main
from mxd.dashboard import ExpertCard, InspectConfig, expert_cards, render_html, write_dashboard
from mxd.models import final_norm, logit_effects
from mxd.runs import read_run

from tiny import TINY_CTX as CTX


def test_read_run(tiny_runs, tmp_path):
    run = read_run(tiny_runs["mxd"])
    assert isinstance(run.layer, mxd.MxD) and run.layer_index == 1 and run.model.endswith("tiny-llama")
    assert run.data.context_len == CTX and run.val_cache.name == "cache-validation" and run.model_dtype == "fp32"
    with pytest.raises(ValueError, match="is not a training run"):
        read_run(tmp_path)


def _direct_codes(run_dir):
    """Indices and values [T, K] of the run's layer on its whole validation cache, in order."""
    run = read_run(run_dir)
    x = torch.cat([x for x, _ in ActivationCache(run.val_cache).batches(1, 4096, shuffle=False)])
    codes = run.layer.encode(x.float())
    return run, codes.indices, codes.values


@pytest.mark.parametrize("kind", ["mxd", "transcoder"])
def test_cards_match_a_direct_encoding(tiny_runs, tmp_path, kind):
    run, indices, values = _direct_codes(tiny_runs[kind])
    cards, summary = expert_cards(InspectConfig(run=str(tiny_runs[kind]), examples=3))
    fired = torch.unique(indices[values != 0])
    assert [c.index for c in cards] == fired.tolist() and summary["fired"] == len(fired)
    assert summary["n_tokens"] == len(indices) == 32 * CTX
    for card in cards[:: max(1, len(cards) // 10)]:
        mask = (indices == card.index) & (values != 0)
        assert card.frequency == pytest.approx(mask.any(1).float().mean().item())
        assert card.max_activation == pytest.approx(values[mask].max().item(), rel=1e-5)
        assert sum(card.histogram) == mask.sum()
        assert 1 <= len(card.contexts) <= 3
        tokens, top = card.contexts[0]
        assert tokens[top][1] == pytest.approx(card.max_activation, rel=1e-5)  # the top token carries the max
        assert len(card.promoted) == len(card.suppressed) == 8
        assert card.promoted[0][1] > card.promoted[-1][1] and card.suppressed[0][1] < card.suppressed[-1][1]


def test_logit_effects_read_the_unembedding(tiny_runs):
    model, _ = read_run(tiny_runs["mxd"]).load_model()
    assert final_norm(model) is model.model.norm
    unembedding = model.get_output_embeddings().weight  # [V, d]
    effects = logit_effects(model, torch.stack([unembedding[65], -unembedding[66]]))
    assert effects[0].argmax() == 65 and effects[1].argmin() == 66


def test_promoted_tokens_follow_the_decoder_direction(tiny_runs, tmp_path):
    """A transcoder latent whose decoder row is token t's unembedding promotes t first."""
    run_dir = tmp_path / "edited"
    shutil.copytree(tiny_runs["transcoder"], run_dir)
    run = read_run(run_dir)
    model, tokenizer = run.load_model()
    cards, _ = expert_cards(InspectConfig(run=str(run_dir)))
    latent, token = cards[0].index, tokenizer.convert_tokens_to_ids("Q")
    with torch.no_grad():
        run.layer.decoder[latent] = model.get_output_embeddings().weight[token]
    run.layer.save(run_dir / "final")
    cards, _ = expert_cards(InspectConfig(run=str(run_dir), experts=[latent]))
    assert cards[0].promoted[0][0] == "Q"


def test_every_text_is_escaped():
    card = ExpertCard(3, 0.25, 2.0, [1, 0, 2], [([("<script>alert(1)</script>", 2.0), ('" onmouseover="x', 0.5)], 0)],
                      [("<b>bold</b>", 1.0)], [("&amp;", -1.0)])
    page = render_html([card], {"run": "<run>", "kind": "MxD", "model": "<m>", "layer": 1, "source": "<s>",
                                "n_experts": 4, "n_tokens": 8, "fired": 1, "frequencies": [0.25, 0, 0, 0]})
    assert page.count("<script") == 1 and "<b>bold" not in page and "<run>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&quot; onmouseover=&quot;x" in page
    assert "&amp;amp;" in page


def test_bad_input(tiny_runs, tmp_path, capsys):
    n = read_run(tiny_runs["mxd"]).layer.n_latents
    with pytest.raises(ValueError, match=f"expert {n} is out of range: the layer has {n} experts"):
        expert_cards(InspectConfig(run=str(tiny_runs["mxd"]), experts=[0, n]))
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path), "--out", str(tmp_path / "d.html")])
    assert exit_info.value.code == 2 and "is not a training run" in capsys.readouterr().err


# ---------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed with apt-get when missing and we are root, else the test is skipped."""
    if shutil.which("chromium") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and installing it needs root and apt-get")
        install = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                                 env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
        if install.returncode or shutil.which("chromium") is None:
            pytest.skip(f"apt-get install chromium failed: {install.stderr.strip().splitlines()[-1:]}")
    return shutil.which("chromium")


def _open(chromium, page, *flags):
    """(stdout, console messages) of headless Chromium on a local file."""
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    return result.stdout, re.findall(r"CONSOLE[^\]]*\] (.*)", result.stderr)


def test_console_errors_are_caught(chromium, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    _, console = _open(chromium, broken, "--dump-dom")
    assert any("undefinedFunction is not defined" in line for line in console)


def test_dashboard_in_headless_chromium(chromium, tiny_runs, tmp_path):
    page = tmp_path / "dashboard.html"
    summary = write_dashboard(InspectConfig(run=str(tiny_runs["mxd"]), out=str(page)))
    dom, console = _open(chromium, page, "--dump-dom")
    assert console == []
    assert dom.count('<section class="card"') == summary["cards"] > 10
    assert f'data-ready="{summary["cards"]}"' in dom  # the page's script ran to the end
    assert f"{summary['cards']} of {summary['cards']} experts" in dom
    freqs = [float(f) for f in re.findall(r'<section class="card"[^>]*data-freq="([^"]+)"', dom)]
    assert freqs == sorted(freqs, reverse=True)  # sorted by frequency on load
    screenshot = tmp_path / "dashboard.png"
    _, console = _open(chromium, page, f"--screenshot={screenshot}", "--window-size=1200,1600")
    assert console == [] and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_tokens_show_as_text_in_the_browser(chromium, tmp_path):
    card = ExpertCard(0, 0.5, 1.0, [1], [([("<script>alert('x')</script>", 1.0)], 0)], [("<img src=x onerror=alert(1)>", 1.0)], [])
    page = tmp_path / "escaped.html"
    page.write_text(render_html([card], {"run": "r", "kind": "MxD", "model": "m", "layer": 0, "source": "s",
                                         "n_experts": 1, "n_tokens": 2, "fired": 1, "frequencies": [0.5]}))
    dom, console = _open(chromium, page, "--dump-dom")
    assert console == [] and "<img src=x" not in dom and "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom
