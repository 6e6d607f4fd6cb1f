"""Configuration: the schema (model.py), units (units.py) and loading (loader.py)."""

from aggregator.config.loader import ConfigError, load, loads, parse
from aggregator.config.model import Config

__all__ = ["Config", "ConfigError", "load", "loads", "parse"]
