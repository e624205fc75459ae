import pytest
import torch

from mxd import MxD, MxDConfig, SkipTranscoder, Transcoder, TranscoderConfig

# One small instance of every layer kind, by name (d_in=12, d_out=10).
LAYER_KINDS = {
    "mxd_glu": lambda: MxD(MxDConfig(12, 10, d_hidden=16, n_experts=40, k=5, activation="silu", glu=True)),
    "mxd_mlp": lambda: MxD(MxDConfig(12, 10, d_hidden=16, n_experts=40, k=5, activation="gelu", glu=False)),
    "mxd_unit_norm": lambda: MxD(MxDConfig(12, 10, 16, 40, 5, unit_norm_modulators=True, bias=False)),
    "transcoder": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=6)),
    "transcoder_l1": lambda: Transcoder(TranscoderConfig(12, 10, width=48, k=1, sparsity="l1")),
    "skip_transcoder": lambda: SkipTranscoder(TranscoderConfig(12, 10, width=48, k=6)),
}


@pytest.fixture(params=sorted(LAYER_KINDS))
def layer(request):
    """A freshly initialised layer of each kind, with every parameter randomised (no zero inits)."""
    torch.manual_seed(0)
    layer = LAYER_KINDS[request.param]()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer.normalize_weights_()
    return layer
