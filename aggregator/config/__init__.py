"""Configuration: the schema (model.py), units (units.py), loading (loader.py), Fluentd's
fluent.conf (fluentd.py) and TOML output (writer.py)."""

from aggregator.config.loader import ConfigError, load, loads, parse, read
from aggregator.config.model import Config

__all__ = ["Config", "ConfigError", "load", "loads", "parse", "read"]
