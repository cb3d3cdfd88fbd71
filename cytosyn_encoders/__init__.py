"""Frozen encoders for the whole toolkit: one registry, weights from local files only.

Both ``cytosyn_data`` and ``cytosyn_model`` build every frozen network through
:func:`build_encoder` (see :mod:`.registry`); weights are read by :mod:`.weights`.
"""

from .registry import REGISTRY, Encoder, EncoderSpec, build_encoder, build_network
from .weights import RandomWeights, file_digest, parse_weights, weights_identity

__all__ = ["REGISTRY", "Encoder", "EncoderSpec", "RandomWeights", "build_encoder", "build_network", "file_digest",
           "parse_weights", "weights_identity"]
