"""Pretext objectives by name."""

from avssl.registry import Registry

OBJECTIVES: Registry = Registry("objective")
