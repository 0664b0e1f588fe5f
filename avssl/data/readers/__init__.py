"""Readers for real corpora in their published layouts; each is one file + one registry entry."""

from avssl.data.readers.base import READERS, Reader

# Importing registers each reader.
from avssl.data.readers import crema_d, iemocap, lrw, ravdess, sewa, speech_commands  # noqa: E402,F401

__all__ = ["READERS", "Reader"]
