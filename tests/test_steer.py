"""mxd steer: the steering edit equals the layer's own decode change, restores the model, and moves generations."""

import numpy as np
import pytest
import torch

from mxd.cli import main
from mxd.layers import SparseCodes
from mxd.models import find_mlp, mlp_activations
from mxd.runs import read_run
from mxd.steer import SteerConfig, compare, format_comparison, keyword_score, steer, unit_output


def _setup(run_dir):
    run = read_run(run_dir)
    model, tokenizer = run.load_model()
    site = find_mlp(model, run.layer_index)
    ids = tokenizer(["The cat sat on the mat and looked at the dog."], return_tensors="pt").input_ids
    return run.layer, model, tokenizer, site, ids


@pytest.mark.parametrize("kind", ["mxd", "transcoder"])
def test_unit_output_is_the_decode_change(tiny_runs, kind):  # noqa: F811
    """Adding v to expert n's coefficient changes the layer's own decode by v · unit_output."""
    layer, model, _, site, ids = _setup(tiny_runs[kind])
    x = mlp_activations(model, ids, [site])[1][0][0]  # [s, d_in]
    codes = layer.encode(x)
    n = int(codes.indices[0, 0])
    pushed = SparseCodes(torch.cat([codes.indices, torch.full_like(codes.indices[:, :1], n)], 1),
                         torch.cat([codes.values, torch.full_like(codes.values[:, :1], 2.5)], 1))
    change = layer.decode(pushed, x) - layer.decode(codes, x)
    assert torch.allclose(change, 2.5 * unit_output(layer, x, n), atol=1e-5)


@pytest.mark.parametrize("kind", ["mxd", "transcoder"])
def test_steer_edits_the_mlp_output_and_restores_it(tiny_runs, kind):  # noqa: F811
    layer, model, _, site, ids = _setup(tiny_runs[kind])
    x, y = mlp_activations(model, ids, [site])[1]
    x, y = x[0], y[0]
    codes = layer.encode(x)
    n = int(codes.indices[3, 0])  # fires on token 3
    logits = model(ids).logits
    with steer(model, site, layer, n, 7.0):
        _, y_add = mlp_activations(model, ids, [site])[1]
        assert not torch.allclose(model(ids).logits, logits)
    assert torch.allclose(y_add[0], y + 7.0 * unit_output(layer, x, n), atol=1e-5)
    with steer(model, site, layer, n, 0.0, mode="clamp"):
        _, y_off = mlp_activations(model, ids, [site])[1]
    a_n = (codes.values * (codes.indices == n)).sum(-1, keepdim=True)  # [s, 1]
    assert a_n[3] > 0 and torch.allclose(y_off[0], y - a_n * unit_output(layer, x, n), atol=1e-5)
    with steer(model, site, layer, n, 0.0):  # adding 0 changes nothing
        assert torch.allclose(model(ids).logits, logits, atol=1e-6)
    assert torch.equal(model(ids).logits, logits)  # restored on exit


def test_compare_moves_the_generation(tiny_runs):  # noqa: F811
    cfg = SteerConfig(run=str(tiny_runs["mxd"]), expert=0, value=200.0, prompts=["The cat", "A dog"], max_new_tokens=12)
    result = compare(cfg)
    assert len(result["rows"]) == 2 and len(result["keywords"]) > 0
    assert any(r["steered"] != r["unsteered"] for r in result["rows"])
    m = result["means"]
    assert m["steered_keywords"] > m["unsteered_keywords"]  # the expert's promoted tokens appear more often
    text = format_comparison(result, 40)
    assert "unsteered" in text and " | " in text and "keyword score" in text and "perplexity" in text


def test_probe_score(tiny_runs, tmp_path):  # noqa: F811
    task = tmp_path / "letters.jsonl"
    task.write_text("".join(f'{{"text": "{t}", "label": "{label}"}}\n' for i in range(40)
                            for t, label in ((f"aeiou uoiea {i}", "vowels"), (f"{i} 31415 92653", "digits"))))
    cfg = SteerConfig(run=str(tiny_runs["mxd"]), expert=0, value=50.0, prompts=["aeiou"], max_new_tokens=6,
                      probe_task=str(task), probe_class="vowels")
    result = compare(cfg)
    assert result["probe"] == f"{task}=vowels"
    row = result["rows"][0]
    assert np.isfinite([row["unsteered_probe"], row["steered_probe"]]).all()
    assert f"probe log-odds of {task}=vowels" in format_comparison(result)
    with pytest.raises(ValueError, match="probe_class='nouns' is not a class of task"):
        compare(SteerConfig(run=str(tiny_runs["mxd"]), prompts=["a"], max_new_tokens=2, probe_task=str(task),
                            probe_class="nouns"))


def test_keyword_score(tiny_runs):  # noqa: F811
    _, _, tokenizer, _, _ = _setup(tiny_runs["mxd"])
    new = torch.tensor(tokenizer("abca", add_special_tokens=False).input_ids)
    assert keyword_score(tokenizer, new, {"a"}) == 0.5 and keyword_score(tokenizer, new, {"z"}) == 0.0


def test_bad_input(tiny_runs, capsys):  # noqa: F811
    layer, model, _, site, _ = _setup(tiny_runs["mxd"])
    with pytest.raises(ValueError, match=f"expert {layer.n_latents} is out of range"):
        with steer(model, site, layer, layer.n_latents, 1.0):
            pass
    with pytest.raises(ValueError, match="mode='scale' is invalid: valid values are add, clamp"):
        SteerConfig(mode="scale")
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", str(tiny_runs["mxd"]), "--expert", "-1"])
    assert exit_info.value.code == 2 and "expert -1 is out of range" in capsys.readouterr().err


def test_cli_prints_side_by_side(tiny_runs, capsys):  # noqa: F811
    main(["steer", str(tiny_runs["transcoder"]), "--expert", "3", "--value", "50", "--prompts", "Hello",
          "--max-new-tokens", "8", "--keywords", "e", "a", "--width", "30"])
    out = capsys.readouterr().out
    assert "expert 3 of" in out and "prompt: Hello" in out and "keyword score (share of continuation tokens in {'a', 'e'})" in out
