"""SAELens folders (cfg.json + sae_weights.safetensors) read into our layer classes and written back.

The tests marked `saelens` compare with the real sae-lens package (the optional "saelens" dependency
group, `make test-peers`); the others check the files against SAELens's documented format and our
own reader, and run everywhere."""

import json

import pytest
import torch

import mxd
from mxd import SkipTranscoder, Transcoder, TranscoderConfig
from mxd.cli import main
from mxd.exchange import read_saelens, write_saelens
from mxd.runs import SiteOptions, read_run


def _randomised(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


TOPK = lambda: _randomised(Transcoder(TranscoderConfig(12, 12, 48, 5)))  # noqa: E731
RELU = lambda: _randomised(Transcoder(TranscoderConfig(12, 10, 48, 1, "l1")))  # noqa: E731
RELU_SKIP = lambda: _randomised(SkipTranscoder(TranscoderConfig(12, 10, 48, 1, "l1")))  # noqa: E731


@pytest.mark.parametrize("make, arch", [(TOPK, "topk"), (RELU, "transcoder"), (RELU_SKIP, "skip_transcoder")])
def test_written_files_follow_the_format_and_read_back_exactly(tmp_path, make, arch):
    layer = make()
    write_saelens(layer, tmp_path / "sae", model="org/model", layer_index=3, module_path="model.layers.3.mlp")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"]) == (12, 48)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["metadata"] == {"model_name": "org/model", "hook_name": "blocks.3.ln2.hook_normalized",
                               "hook_name_out": "blocks.3.hook_mlp_out", "hf_hook_name": "model.layers.3.mlp.input",
                               "hf_hook_name_out": "model.layers.3.mlp.output"}
    back = mxd.load(tmp_path / "sae")
    assert type(back) is type(layer) and back.config == layer.config
    x = torch.randn(20, 12)
    torch.testing.assert_close(back(x)[0], layer(x)[0])
    run = read_run(tmp_path / "sae")  # model and layer from the metadata
    kind = "saelens_skip_transcoder" if arch == "skip_transcoder" else "saelens_transcoder"
    assert (run.model, run.layer_index, run.config["sparse"]["kind"]) == ("org/model", 3, kind)


def test_a_topk_sae_that_subtracts_b_dec_is_folded(tmp_path):
    """An SAE with apply_b_dec_to_input encodes x − b_dec: the same function as a transcoder from x to x."""
    torch.manual_seed(1)
    w_enc, b_enc, w_dec, b_dec = torch.randn(8, 32), torch.randn(32), torch.randn(32, 8), torch.randn(8)
    folder = tmp_path / "sae"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4,
                                                "apply_b_dec_to_input": True, "metadata": {}}))
    x = torch.randn(16, 8)
    pre = (x - b_dec) @ w_enc + b_enc
    top = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ w_dec + b_dec
    torch.testing.assert_close(read_saelens(folder)(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"architecture": "jumprelu"}, "architecture='jumprelu' cannot be represented; supported: topk, standard, "
                                   "transcoder, skip_transcoder"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in' cannot"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm=True cannot be represented"),
    ({"d_sae": 40}, "tensor 'W_enc' has shape (12, 48), but d_in=12, d_sae=40, d_out=12 imply (12, 40)"),
    ({"d_in": "12"}, "is not a SAELens config: it needs integer d_in and d_sae"),
])
def test_folders_we_cannot_represent_fail_in_one_line(tmp_path, change, message, capsys):
    write_saelens(TOPK(), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg | change))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "sae"), "--model", "smollm2-135m", "--layer", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_sae_without_model_or_layer_asks_for_them(tmp_path):
    write_saelens(TOPK(), tmp_path / "sae")
    with pytest.raises(ValueError, match="does not name its model: give --model"):
        read_run(tmp_path / "sae")
    with pytest.raises(ValueError, match="names no layer: give --layer"):
        read_run(tmp_path / "sae", site=SiteOptions(model="m"))
    assert read_run(tmp_path / "sae", site=SiteOptions(model="m", layer=2)).layer_index == 2


def test_what_saelens_cannot_hold_is_refused_before_writing(tmp_path):
    topk_skip = SkipTranscoder(TranscoderConfig(12, 12, 48, 5))
    with pytest.raises(ValueError, match="a TopK skip transcoder has no saelens form"):
        write_saelens(topk_skip, tmp_path / "a")
    with pytest.raises(ValueError, match="a MxD has no saelens form"):
        write_saelens(mxd.MxD(mxd.MxDConfig(12, 12, 16, 40, 5)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- against the real package -------------------------------------------------------------------

@pytest.mark.saelens
@pytest.mark.parametrize("make", [TOPK, RELU, RELU_SKIP])
def test_our_files_load_in_saelens_with_the_same_outputs(tmp_path, make):
    sae_lens = pytest.importorskip("sae_lens")
    layer = make()
    write_saelens(layer, tmp_path / "sae", model="org/model", layer_index=3)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(20, 12)
    torch.testing.assert_close(sae(x), layer(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.saelens
@pytest.mark.parametrize("arch, extra", [("topk", {"k": 5}), ("standard", {}), ("transcoder", {"d_out": 10}),
                                         ("skip_transcoder", {"d_out": 10})])
def test_saelens_files_read_with_the_same_outputs(tmp_path, arch, extra):
    sae_lens = pytest.importorskip("sae_lens")
    cfg = {"architecture": arch, "d_in": 12, "d_sae": 48, "apply_b_dec_to_input": arch in ("topk", "standard"),
           "metadata": {"model_name": "org/model", "hook_name": "blocks.4.ln2.hook_normalized"}} | extra
    sae = sae_lens.SAE.from_dict(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.save_model(str(tmp_path / "sae"))
    x = torch.randn(20, 12)
    torch.testing.assert_close(read_saelens(tmp_path / "sae")(x)[0], sae(x), atol=1e-5, rtol=1e-5)
    assert read_run(tmp_path / "sae").layer_index == 4


def test_a_layer_whose_width_does_not_fit_the_mlp_is_refused(tmp_path, tiny_model_dir, capsys):
    write_saelens(TOPK(), tmp_path / "sae")  # d_in = 12; the tiny Llama's MLP maps 32 -> 32
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "sae"), "--model", str(tiny_model_dir), "--layer", "1", "--eval-tokens", "64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "maps d_in=12 to d_out=12, but the MLP of layer 1" in err and "maps 32 to 32" in err, err


def test_a_folder_in_no_format_is_refused(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cfg.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "x"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a training run" in err and "SAELens" in err, err
