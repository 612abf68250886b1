"""The one config model (`postwarden.toml`) and its loader."""

from postwarden.config.loading import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    config_path,
    load_config,
    parse_config,
)
from postwarden.config.model import Config

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "ConfigError",
    "config_path",
    "load_config",
    "parse_config",
]
