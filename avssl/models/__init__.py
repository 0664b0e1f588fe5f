"""Model parts, discoverable by name; `build_pretrain_model` assembles what an objective needs."""

from avssl.models.registry import ATTRIBUTE_HEADS, AUDIO_ENCODERS, FRAME_DECODERS, IDENTITY_ENCODERS

# Importing registers the built-in parts.
from avssl.models import audio_encoder, face, heads  # noqa: E402,F401
from avssl.models.pretrain import AVSSLModel, build_audio_encoder, load_encoder, recalibrate_batchnorm, save_encoder  # noqa: E402

__all__ = [
    "ATTRIBUTE_HEADS",
    "AUDIO_ENCODERS",
    "AVSSLModel",
    "FRAME_DECODERS",
    "IDENTITY_ENCODERS",
    "build_audio_encoder",
    "load_encoder",
    "recalibrate_batchnorm",
    "save_encoder",
]
