"""The one configuration object: built from YAML + `key=value` overrides, validated once."""

from corral.config.parse import CorralConfig, build_config, load_config

__all__ = ["CorralConfig", "build_config", "load_config"]
