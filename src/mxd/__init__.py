"""mxd: Mixture of Decoders and the sparse baselines they are measured against."""

from mxd.exchange import load
from mxd.layers import (
    MxD,
    MxDConfig,
    SkipTranscoder,
    SparseCodes,
    SparseLayer,
    Transcoder,
    TranscoderConfig,
    match_n_experts,
)

__version__ = "0.1.0"

__all__ = [
    "MxD",
    "MxDConfig",
    "SkipTranscoder",
    "SparseCodes",
    "SparseLayer",
    "Transcoder",
    "TranscoderConfig",
    "load",
    "match_n_experts",
]
