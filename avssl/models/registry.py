"""Registries of model parts, looked up by the names in the config."""

from avssl.registry import Registry

AUDIO_ENCODERS: Registry = Registry("audio encoder")
IDENTITY_ENCODERS: Registry = Registry("identity encoder")
FRAME_DECODERS: Registry = Registry("frame decoder")
ATTRIBUTE_HEADS: Registry = Registry("attribute head")
