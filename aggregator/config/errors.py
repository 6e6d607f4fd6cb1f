"""The one error a configuration raises."""


class ConfigError(Exception):
    """A config that cannot be used; the message names the offending key path (or the file and
    line of a fluent.conf)."""
