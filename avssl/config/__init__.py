"""Config tree, presets and dotted overrides."""

from avssl.config.loader import apply_overrides, config_from_dict, dump_yaml, flatten, load_config, preset_names
from avssl.config.schema import EMOTIONS, Config

__all__ = [
    "Config",
    "EMOTIONS",
    "apply_overrides",
    "config_from_dict",
    "dump_yaml",
    "flatten",
    "load_config",
    "preset_names",
]
