"""Coders saved by EleutherAI's sparsify, read into our layer classes: outputs equal sparsify's own
forward; what the files do not say comes from options; bad folders fail in one line."""

import json

import pytest
import torch

import mxd
from mxd import SkipTranscoder, Transcoder
from mxd.cli import main
from mxd.exchange import layer_from_hookpoint, read_sparsify
from mxd.runs import SiteOptions, read_run

sparsify = pytest.importorskip("sparsify")  # the optional "peer" dependency group


def _saved_coder(tmp_path, transcode=True, skip=False, d=12, hookpoint="layers.1.mlp"):
    """A sparsify SparseCoder with every parameter randomised, saved by sparsify itself."""
    torch.manual_seed(0)
    cfg = sparsify.SparseCoderConfig(num_latents=48, k=5, transcode=transcode, skip_connection=skip)
    coder = sparsify.SparseCoder(d, cfg)
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "run" / hookpoint)
    return coder, tmp_path / "run" / hookpoint


@pytest.mark.parametrize("transcode, skip, cls", [(True, False, Transcoder), (True, True, SkipTranscoder),
                                                  (False, False, Transcoder)])
def test_outputs_equal_sparsify_forward(tmp_path, transcode, skip, cls):
    coder, folder = _saved_coder(tmp_path, transcode, skip)
    layer = read_sparsify(folder)
    assert type(layer) is cls and layer.n_latents == 48 and layer.config.k == 5
    x = torch.randn(64, 12)
    expected = coder(x, x if not transcode else torch.randn(64, 12))
    y_hat, codes = layer(x)
    torch.testing.assert_close(y_hat, expected.sae_out, atol=1e-5, rtol=1e-5)
    order = codes.indices.argsort(-1)
    expected_order = expected.latent_indices.argsort(-1)
    torch.testing.assert_close(codes.indices.gather(-1, order), expected.latent_indices.gather(-1, expected_order))
    torch.testing.assert_close(codes.values.gather(-1, order), expected.latent_acts.gather(-1, expected_order))


def test_mxd_load_reads_a_hookpoint_or_its_run_folder(tmp_path):
    _, folder = _saved_coder(tmp_path)
    for path in (folder, folder.parent):
        assert isinstance(mxd.load(path), Transcoder)
    _saved_coder(tmp_path, hookpoint="layers.2.mlp")
    with pytest.raises(ValueError, match="several hookpoints.*layers.1.mlp, layers.2.mlp"):
        mxd.load(folder.parent)


def test_run_info_takes_what_the_files_do_not_say_from_options(tmp_path):
    _, folder = _saved_coder(tmp_path)
    with pytest.raises(ValueError, match="does not name its model: give --model"):
        read_run(folder)
    run = read_run(folder, site=SiteOptions(model="some/model"))
    assert (run.model, run.layer_index, run.config["sparse"]["kind"]) == ("some/model", 1, "sparsify_transcoder")
    assert read_run(folder, site=SiteOptions(model="m", layer=7)).layer_index == 7
    assert layer_from_hookpoint("h.3.mlp") == 3 and layer_from_hookpoint("model.layers.12.mlp") == 12
    assert layer_from_hookpoint("embed_out") is None


def test_formats_we_cannot_represent_fail_in_one_line(tmp_path, capsys):
    _, folder = _saved_coder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"activation": "groupmax"}))
    with pytest.raises(ValueError, match="activation='groupmax' cannot be represented; supported: 'topk'"):
        read_sparsify(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not a sparsify coder config"):
        read_sparsify(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(empty), "--model", "smollm2-135m"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "holds none" in err


@pytest.mark.parametrize("skip", [False, True])
def test_export_to_sparsify_loads_in_sparsify_with_the_same_outputs(tmp_path, skip):
    from mxd.exchange import write_sparsify

    torch.manual_seed(0)
    layer = (SkipTranscoder if skip else Transcoder)(mxd.TranscoderConfig(12, 12, 48, 5))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    write_sparsify(layer, tmp_path / "layers.1.mlp")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.1.mlp")
    assert (coder.cfg.transcode, coder.cfg.skip_connection, coder.num_latents, coder.cfg.k) == (True, skip, 48, 5)
    x = torch.randn(64, 12)
    torch.testing.assert_close(coder(x, torch.randn(64, 12)).sae_out, layer(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(read_sparsify(tmp_path / "layers.1.mlp")(x)[0], layer(x)[0])


def test_mxd_export_sparsify_names_the_hookpoint(tmp_path, capsys):
    _, folder = _saved_coder(tmp_path, skip=True, hookpoint="layers.2.mlp")
    main(["export", str(folder), "--format", "sparsify", "--out", str(tmp_path / "out"), "--model", "m"])
    assert (tmp_path / "out" / "layers.2.mlp" / "sae.safetensors").is_file()
    x = torch.randn(8, 12)
    torch.testing.assert_close(mxd.load(tmp_path / "out")(x)[0], mxd.load(folder)(x)[0])
