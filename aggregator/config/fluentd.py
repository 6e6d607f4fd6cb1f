"""Fluentd's ``fluent.conf``, read and turned into this service's configuration.

Two steps, each one place:

- :func:`parse` reads Fluentd's syntax (directives, parameters, quoting, ``@include``,
  ``"#{ENV['X']}"``) into a tree of :class:`Directive`, each with its file and line.
- :class:`Converter` maps the tree onto the same data a TOML file gives (validated by the same
  models afterwards). Each supported parameter has a rule; a parameter whose behaviour does not
  matter here is dropped with a warning that says why; anything else is an error with its file
  and line. Nothing is silently read differently. Every error of a file is reported in one run
  (a user fixes them all at once), not only the first.

Values keep their environment lookups as ``${VAR}``, so a converted file still takes its
settings from the environment at start, as Fluentd did.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config.errors import ConfigError

# --- the syntax --------------------------------------------------------------------------------


@dataclass
class Param:
    value: str
    where: str


@dataclass
class Directive:
    """``<name arg>`` ... ``</name>``: its parameters and the directives inside it."""

    name: str
    arg: str
    where: str
    params: dict[str, Param] = field(default_factory=dict)
    children: list[Directive] = field(default_factory=list)


_OPEN = re.compile(r"<\s*([A-Za-z_][\w]*)\s*(.*?)\s*>$")
_CLOSE = re.compile(r"</\s*([A-Za-z_][\w]*)\s*>$")
_KEY = re.compile(r"(@?[A-Za-z_][\w.]*)(?:\s+(.*))?$")
# The embedded Ruby that Fluentd configs use to read the environment, and the host name.
_ENV_INDEX = re.compile(r"""ENV\[\s*(['"])([A-Za-z_]\w*)\1\s*\]""")
_ENV_FETCH = re.compile(r"""ENV\.fetch\(\s*(['"])([A-Za-z_]\w*)\1\s*(?:,\s*(['"])(.*?)\3\s*)?\)""")
_ENV_OR = re.compile(
    r"""ENV\[\s*(['"])([A-Za-z_]\w*)\1\s*\]\s*\|\|\s*(?:(['"])(.*?)\3|(-?[\d.]+))"""
)
_HOSTNAME = re.compile(r"Socket\.gethostname")


def parse(path: str | Path, errors: list[str] | None = None) -> Directive:
    """The directives of ``path`` and of the files it includes, under one root. A value that
    cannot be read is added to ``errors`` and reading goes on (without ``errors``: raised at
    the end); a file whose structure cannot be read raises at once."""
    root = Directive("ROOT", "", f"{path}:1")
    found: list[str] = []
    _parse_file(Path(path), [root], 0, found)
    if errors is None and found:
        raise ConfigError("\n".join(found))
    if errors is not None:
        errors += found
    return root


def _parse_file(path: Path, stack: list[Directive], depth: int, errors: list[str]) -> None:
    if depth > 16:
        raise ConfigError(f"{path}: @include nested too deep (a loop?)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    base = len(stack)
    i = 0
    while i < len(lines):
        where = f"{path}:{i + 1}"
        line = _strip_comment(lines[i]).strip()
        i += 1
        if not line:
            continue
        if m := _CLOSE.match(line):
            if len(stack) <= base or stack[-1].name != m.group(1):
                expected = f"</{stack[-1].name}>" if len(stack) > base else "nothing to close"
                raise ConfigError(f"{where}: </{m.group(1)}> does not close ({expected})")
            stack.pop()
            continue
        if m := _OPEN.match(line):
            directive = Directive(m.group(1), m.group(2), where)
            stack[-1].children.append(directive)
            stack.append(directive)
            continue
        if line.startswith("@include"):
            pattern = line.removeprefix("@include").strip()
            if "://" in pattern:
                raise ConfigError(f"{where}: @include of a URL is not supported: {pattern}")
            full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
            matches = sorted(glob.glob(full))
            if not matches and not glob.has_magic(full):
                raise ConfigError(f"{where}: @include {pattern}: no such file")
            for included in matches:
                _parse_file(Path(included), stack, depth + 1, errors)
            continue
        m = _KEY.match(line)
        if m is None:
            errors.append(f"{where}: cannot read this line: {line[:80]}")
            continue
        key, raw = m.group(1), m.group(2) or ""
        # A JSON array or hash may go on over lines until its brackets close.
        while raw[:1] in "[{" and raw and not _balanced(raw) and i < len(lines):
            raw += "\n" + _strip_comment(lines[i]).strip()
            i += 1
        try:
            stack[-1].params[key] = Param(_value(raw.strip(), where), where)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(stack) > base:
        raise ConfigError(f"{stack[-1].where}: <{stack[-1].name}> is never closed")


def _strip_comment(line: str) -> str:
    """The line without its comment: ``#`` at the start or after a space, outside quotes, and
    not the ``#{`` of embedded Ruby."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == "\\" and quote == '"':
                continue
            if ch == quote and (i == 0 or line[i - 1] != "\\"):
                quote = ""
        elif ch in "\"'" and (i == 0 or line[i - 1].isspace()):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()) and line[i + 1 : i + 2] != "{":
            return line[:i]
    return line


def _balanced(text: str) -> bool:
    return text.count("[") + text.count("{") <= text.count("]") + text.count("}")


def _value(raw: str, where: str) -> str:
    """A parameter's value as Fluentd reads it; environment lookups become ``${VAR}``."""
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return _literal(raw[1:-1].replace("\\'", "'").replace("\\\\", "\\"))
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return _double_quoted(raw[1:-1], where)
    if "#{" in raw:
        raise ConfigError(f"{where}: embedded Ruby (#{{...}}) is only read in double quotes")
    return _literal(raw)


def _literal(text: str) -> str:
    return text.replace("${", "$${")  # a literal "${" must not become an environment lookup


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "#": "#", "0": "\0"}


def _double_quoted(body: str, where: str) -> str:
    out: list[str] = []
    text: list[str] = []  # literal text since the last embedded Ruby, escaped as a whole
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            text.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        elif body.startswith("#{", i):
            end = body.find("}", i + 2)
            if end < 0:
                raise ConfigError(f"{where}: unclosed #{{")
            # ENV.fetch('X') {...} style blocks contain a brace of their own: not supported
            out += [_literal("".join(text)), _ruby(body[i + 2 : end].strip(), where)]
            text.clear()
            i = end + 1
        elif ch == '"':
            # Fluentd's parser ends the value at the first unescaped quote and then expects
            # the end of the line, so it refuses the rest: say so rather than guess.
            raise ConfigError(f"{where}: a quote inside a double-quoted value ends it: write \\\" "
                              f"for a quote in the value (after {body[:i][-20:]!r})")
        else:
            text.append(ch)
            i += 1
    out.append(_literal("".join(text)))
    return "".join(out)


def _ruby(code: str, where: str) -> str:
    if m := _ENV_OR.fullmatch(code):  # ENV['X'] || 'default': the default when X is unset
        default = m.group(4) if m.group(4) is not None else m.group(5)
        return "${" + m.group(2) + ":-" + _literal(default) + "}"
    if m := _ENV_INDEX.fullmatch(code):
        return "${" + m.group(2) + ":-}"  # Ruby: nil when unset, which interpolates as ""
    if m := _ENV_FETCH.fullmatch(code):
        name, default = m.group(2), m.group(4)
        return "${" + name + ("}" if default is None else ":-" + _literal(default) + "}")
    if _HOSTNAME.fullmatch(code):
        return "${HOSTNAME:-localhost}"
    raise ConfigError(
        f"{where}: embedded Ruby #{{{code}}} is not supported: only ENV['X'], "
        "ENV['X'] || 'default', ENV.fetch('X', 'default') and Socket.gethostname are"
    )


# --- Fluentd's units -------------------------------------------------------------------------


def _is_env(value: str) -> bool:
    return "${" in value.replace("$${", "")


_SIZE_UNITS = (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40))
_TIME_UNITS = (("s", 1), ("m", 60), ("h", 3600), ("d", 86400))


def _number(value: str, where: str, kind: str, number: type[int] | type[float],
            units: tuple[tuple[str, int], ...] = (), flags: int = 0) -> Any:  # fmt: skip
    """A number as Fluentd's config types read it: the first digits followed by a unit
    anywhere in the value (so "2GB" is 2 GiB), else the whole value as a number."""
    if _is_env(value):
        return value
    for unit, factor in units:
        if m := re.search(r"([0-9]+)" + unit, value, flags):
            return number(int(m.group(1)) * factor)
    try:
        return number(value)
    except ValueError:
        raise ConfigError(f"{where}: invalid {kind} {value!r}") from None


def fluent_size(value: str, where: str) -> int | str:
    """Bytes, as Fluentd's ``size`` type: k, m, g, t are binary, in either case."""
    return _number(value, where, "size", int, _SIZE_UNITS, re.IGNORECASE)  # type: ignore[no-any-return]


def fluent_time(value: str, where: str) -> float | str:
    """Seconds, as Fluentd's ``time`` type: s, m, h, d suffixes, else a number."""
    return _number(value, where, "time", float, _TIME_UNITS)  # type: ignore[no-any-return]


def fluent_int(value: str, where: str) -> int | str:
    return _number(value, where, "integer", int)  # type: ignore[no-any-return]


def fluent_bool(value: str, where: str) -> bool | str:
    if _is_env(value):
        return value
    if value in ("true", "yes", ""):
        return True
    if value in ("false", "no"):
        return False
    raise ConfigError(f"{where}: invalid boolean {value!r} (true or false)")


def fluent_array(value: str, where: str) -> list[str]:
    """Fluentd's ``array``: a JSON array, or comma-separated values."""
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            raise ConfigError(f"{where}: invalid JSON array {value!r}") from None
        return [str(item) for item in items]
    return [item.strip() for item in value.split(",") if item.strip()]


def _text(value: str, where: str) -> str:
    """A string parameter, as written."""
    return value


_LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning",
               "error": "error", "fatal": "error"}  # fmt: skip


def _log_level(value: str, where: str) -> str:
    if value not in _LOG_LEVELS:
        raise ConfigError(f"{where}: unknown log level {value!r}")
    return _LOG_LEVELS[value]


def _tls_version(value: str, where: str) -> str:
    versions = {"TLSv1_2": "TLSv1.2", "TLS1_2": "TLSv1.2",
                "TLSv1_3": "TLSv1.3", "TLS1_3": "TLSv1.3"}  # fmt: skip
    if value not in versions:
        raise ConfigError(f"{where}: TLS version {value!r} is not supported (TLSv1_2, TLSv1_3)")
    return versions[value]


def _buffer_type(value: str, where: str) -> str:
    types = {"memory": "memory", "file": "file", "file_single": "file"}
    if value not in types:
        raise ConfigError(f"{where}: <buffer> @type {value} is not supported: memory or file")
    return types[value]


def _buffer_path(value: str, where: str) -> str:
    """buf_file's path: a directory, or a file pattern with ``*`` in a directory; ours is
    always a directory, and the files in it are our own."""
    return os.path.dirname(value) if "*" in value else value


# --- the mapping ------------------------------------------------------------------------------

FLUENTD_RETRY_TIMEOUT = 72 * 3600.0
"""Fluentd's default retry_timeout (seconds)."""

Rule = tuple[str, Callable[[str, str], Any]]
"""A supported parameter: our key, and how its value is read."""


@dataclass
class Section:
    """What a directive may hold: parameters with a rule, parameters dropped with a reason."""

    rules: dict[str, Rule]
    ignored: dict[str, str] = field(default_factory=dict)


_COMMON_IGNORED = {
    "@log_level": "per-plugin log levels are not supported: [server] log_level applies",
}

_LISTENER_RULES: dict[str, Rule] = {
    "port": ("port", fluent_int), "bind": ("bind", _text),
    "@id": ("name", _text), "@label": ("label", _text),
}  # fmt: skip
_LISTENER_IGNORED = {
    **_COMMON_IGNORED,
    "backlog": "the kernel's default listen backlog is used",
    "blocking_timeout": "not needed by this implementation",
}
_FORWARD = Section(
    rules={**_LISTENER_RULES, "chunk_size_limit": ("message_length_limit", fluent_size)},
    ignored={
        **_LISTENER_IGNORED,
        "chunk_size_warn_limit": "no warning size: messages over message_length_limit are refused",
        "skip_invalid_event": "an invalid event is always skipped and counted here",
        "linger_timeout": "connections are closed at a safe moment instead (see README)",
        "resolve_hostname": "peers are logged by address",
        "send_keepalive_packet": "TCP keepalive is always on (keepalive_idle)",
        "deny_keepalive": "connections stay open as clients keep them",
    },
)
_HTTP = Section(
    rules={
        **_LISTENER_RULES,
        "body_size_limit": ("body_size_limit", fluent_size),
        "keepalive_timeout": ("keepalive_timeout", fluent_time),
        "cors_allow_origins": ("cors_allow_origins", fluent_array),
    },
    ignored={**_LISTENER_IGNORED, "dump_error_log": "errors are logged (throttled) and counted"},
)
_SECURITY = Section(
    rules={
        "self_hostname": ("self_hostname", _text), "shared_key": ("shared_key", _text),
        "user_auth": ("user_auth", fluent_bool),
        "allow_anonymous_source": ("allow_anonymous_source", fluent_bool),
    },
)
_USER = Section(rules={"username": ("username", _text), "password": ("password", _text)})
_CLIENT = Section(
    rules={
        "host": ("host", _text), "network": ("network", _text),
        "shared_key": ("shared_key", _text), "users": ("users", fluent_array),
    },
)
_TLS = Section(
    rules={
        "cert_path": ("cert_path", _text), "private_key_path": ("private_key_path", _text),
        "min_version": ("min_version", _tls_version), "version": ("min_version", _tls_version),
        "ca_path": ("ca_path", _text), "client_cert_auth": ("client_cert_auth", fluent_bool),
    },
)
_BUFFER = Section(
    rules={
        "@type": ("type", _buffer_type),
        "type": ("type", _buffer_type),
        "path": ("path", _buffer_path),
        "chunk_limit_size": ("chunk_limit_size", fluent_size),
        "chunk_limit_records": ("chunk_limit_records", fluent_int),
        "total_limit_size": ("total_limit_size", fluent_size),
        "flush_interval": ("flush_interval", fluent_time),
        "flush_thread_count": ("flush_thread_count", fluent_int),
        "overflow_action": ("overflow_action", _text),
        "retry_wait": ("retry_wait", fluent_time),
        "retry_max_interval": ("retry_max_interval", fluent_time),
        "retry_timeout": ("retry_timeout", fluent_time),
        "retry_max_times": ("retry_max_times", fluent_int),
    },
    ignored={
        "path_suffix": "a file buffer names its own segment files",
        "chunk_format": "a file buffer has its own format (framed lines with checksums)",
        "file_permission": "",
        "dir_permission": "",
        "flush_mode": "chunks are flushed at flush_interval, or when full",
        "flush_thread_interval": "flushes are scheduled by timers, not polled",
        "flush_thread_burst_interval": "flushes are scheduled by timers, not polled",
        "flush_at_shutdown": "buffers are always flushed at stop",
        "retry_type": "retries use exponential backoff with full jitter",
        "retry_exponential_backoff_base": "retries use exponential backoff with full jitter",
        "retry_randomize": "retries are always randomized (full jitter)",
        "queued_chunks_limit_size": "total_limit_size bounds the queue",
        "chunk_full_threshold": "a chunk is flushed at chunk_limit_size",
        "compress": "chunks are kept uncompressed",
        "timekey": "chunks are not keyed by time here",
        "timekey_wait": "chunks are not keyed by time here",
    },
)
_FIREHOSE = Section(
    rules={
        "delivery_stream_name": ("delivery_stream", _text), "region": ("region", _text),
        "endpoint": ("endpoint_url", _text),
        "max_record_size": ("record_max_size", fluent_size),
        "data_key": ("data_key", _text), "compression": ("compression", _text),
        "chomp_record": ("chomp_record", fluent_bool), "http_proxy": ("http_proxy", _text),
    },
    ignored={
        **_COMMON_IGNORED,
        "batch_request_max_count": "batches follow Firehose's limits (500 records, 4 MiB)",
        "batch_request_max_size": "batches follow Firehose's limits (500 records, 4 MiB)",
        "retries_on_batch_request": "failed records go back to the buffer and follow its "
        "retry settings",
        "reset_backoff_if_success": "failed records go back to the buffer and follow its "
        "retry settings",
        "aws_iam_retries": "credentials come from the standard AWS chain, asked again on failure",
        "log_truncate_max_size": "refused records are logged in short",
        "debug": "use [server] log_level = \"debug\"",
    },
)
_OTHER_CREDENTIALS = ("web_identity_credentials", "instance_profile_credentials",
                      "shared_credentials", "process_credentials")  # fmt: skip
_FOUND_BY_FAILURE = "a server that fails is found by the failure itself and tried again after " \
    "recover_wait"
_FORWARD_OUTPUT = Section(
    rules={
        "require_ack_response": ("require_ack_response", fluent_bool),
        "ack_response_timeout": ("ack_response_timeout", fluent_time),
        "compress": ("compress", _text), "keepalive": ("keepalive", fluent_bool),
        "send_timeout": ("send_timeout", fluent_time),
        "connect_timeout": ("connect_timeout", fluent_time),
        "recover_wait": ("recover_wait", fluent_time),
        # read into tls by _forward_output
        "transport": ("transport", _text), "tls_version": ("min_version", _tls_version),
        "tls_ca_cert_path": ("ca_path", fluent_array), "tls_cert_path": ("ca_path", fluent_array),
        "tls_verify_hostname": ("verify_hostname", fluent_bool),
        "tls_insecure_mode": ("insecure", fluent_bool),
        "tls_client_cert_path": ("cert_path", _text),
        "tls_client_private_key_path": ("private_key_path", _text),
    },
    ignored={
        **_COMMON_IGNORED,
        "heartbeat_type": _FOUND_BY_FAILURE, "heartbeat_interval": _FOUND_BY_FAILURE,
        "phi_threshold": _FOUND_BY_FAILURE, "phi_failure_detector": _FOUND_BY_FAILURE,
        "hard_timeout": _FOUND_BY_FAILURE,
        "expire_dns_cache": "names are resolved at each connection",
        "dns_round_robin": "names are resolved at each connection, by the system's resolver",
        "ignore_network_errors_at_startup": "a server down at start is one down like any other",
        "verify_connection_at_startup": "a server down at start is one down like any other",
        "keepalive_timeout": "a kept-alive connection the server closed is not used again",
        "read_interval_msec": "acks are read as they come", "read_length": "",
        "tls_ciphers": "OpenSSL's default ciphers",
    },
)
_FORWARD_TLS = ("min_version", "ca_path", "verify_hostname", "insecure", "cert_path",
                "private_key_path")  # fmt: skip
_FORWARD_SERVER = Section(
    rules={
        "host": ("host", _text), "port": ("port", fluent_int), "name": ("name", _text),
        "shared_key": ("shared_key", _text), "username": ("username", _text),
        "password": ("password", _text), "standby": ("standby", fluent_bool),
        "weight": ("weight", fluent_int),
    },
)
_FORWARD_SECURITY = Section(
    rules={"self_hostname": ("self_hostname", _text), "shared_key": ("shared_key", _text)}
)
_ASSUME_ROLE = Section(
    rules={
        "role_arn": ("role_arn", _text), "role_session_name": ("role_session_name", _text),
        "external_id": ("external_id", _text), "policy": ("policy", _text),
        "duration_seconds": ("duration_seconds", fluent_int),
        "sts_endpoint_url": ("sts_endpoint_url", _text),
        "sts_http_proxy": ("sts_http_proxy", _text),
    },
)
_SIMPLE_OUTPUT = Section(rules={}, ignored=dict(_COMMON_IGNORED))
_FILTER_IGNORED = dict(_COMMON_IGNORED)
_RECORD_TRANSFORMER = Section(
    rules={
        "remove_keys": ("remove_keys", fluent_array), "keep_keys": ("keep_keys", fluent_array),
        "renew_record": ("renew_record", fluent_bool),
        "renew_time_key": ("renew_time_key", _text),
        "auto_typecast": ("auto_typecast", fluent_bool),
    },
    ignored=_FILTER_IGNORED,
)
_GREP_RULE = Section(rules={"key": ("key", _text), "pattern": ("pattern", _text)})
_PARSER_FILTER = Section(
    rules={
        "key_name": ("key_name", _text), "reserve_data": ("reserve_data", fluent_bool),
        "reserve_time": ("reserve_time", fluent_bool),
        "remove_key_name_field": ("remove_key_name_field", fluent_bool),
        "inject_key_prefix": ("inject_key_prefix", _text),
        "hash_value_field": ("hash_value_field", _text),
        "emit_invalid_record_to_error": ("emit_invalid_record_to_error", fluent_bool),
    },
    ignored={**_FILTER_IGNORED,
             "replace_invalid_sequence": "invalid UTF-8 is always replaced (U+FFFD)"},
)
_PARSE = Section(
    rules={
        "expression": ("expression", _text),
        "time_key": ("time_key", _text), "keep_time_key": ("keep_time_key", fluent_bool),
        "time_format": ("time_format", _text), "time_type": ("time_type", _text),
    },
    ignored={"estimate_current_event": "", "localtime": "", "utc": ""},
)
_CONCAT = Section(
    rules={
        "key": ("key", _text), "separator": ("separator", _text),
        "n_lines": ("n_lines", fluent_int),
        "multiline_start_regexp": ("multiline_start_regexp", _text),
        "multiline_end_regexp": ("multiline_end_regexp", _text),
        "continuous_line_regexp": ("continuous_line_regexp", _text),
        "stream_identity_key": ("stream_identity_key", _text),
        "flush_interval": ("flush_interval", fluent_time),
        "timeout_label": ("timeout_label", _text),
        "use_first_timestamp": ("use_first_timestamp", fluent_bool),
        "partial_key": ("partial_key", _text), "partial_value": ("partial_value", _text),
        "keep_partial_key": ("keep_partial_key", fluent_bool),
        "use_partial_metadata": ("use_partial_metadata", fluent_bool),
        "keep_partial_metadata": ("keep_partial_metadata", fluent_bool),
        "buffer_limit_size": ("buffer_limit_size", fluent_size),
        "buffer_overflow_method": ("buffer_overflow_method", _text),
    },
    ignored=_FILTER_IGNORED,
)
_INJECT = Section(
    rules={"tag_key": ("tag_key", _text), "time_key": ("time_key", _text)},
    ignored={"utc": "times are always written in UTC", "localtime": ""},
)
_SYSTEM = Section(
    rules={"workers": ("workers", fluent_int), "log_level": ("log_level", _log_level)},
    ignored={
        "root_dir": "a file buffer takes its directory from <buffer> path",
        "suppress_repeated_stacktrace": "warnings are throttled",
        "ignore_repeated_log_interval": "warnings are throttled",
        "ignore_same_log_interval": "warnings are throttled",
        "emit_error_log_interval": "warnings are throttled",
        "suppress_config_dump": "the config is not logged",
        "process_name": "the process is named aggregator",
        "without_source": "",
        "rpc_endpoint": "signals (SIGUSR1) and POST /api/flush control the service",
        "enable_get_dump": "",
        "log_event_verbose": "",
        "file_permission": "",
        "dir_permission": "",
    },
)


_MONITORS = ("monitor_agent", "prometheus", "prometheus_monitor", "prometheus_output_monitor",
             "prometheus_tail_monitor")  # fmt: skip
"""Sources that serve a service's own metrics: here the http source's /metrics does."""


class Converter:
    """A parsed ``fluent.conf`` as this service's configuration data, plus warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.data: dict[str, Any] = {"server": {}, "sources": [], "routes": [],
                                     "destinations": {}}  # fmt: skip

    def convert(self, root: Directive) -> dict[str, Any]:
        """The configuration data; ConfigError naming every problem found, each with its file
        and line."""
        for directive in root.children:
            self._each(self._top, directive)
        if self.errors:
            raise ConfigError("\n".join(self.errors))
        if not self.data["server"]:
            del self.data["server"]
        buffers = [dest.setdefault("buffer", {}) for dest in self.data["destinations"].values()]
        for buffer in buffers:
            # Fluentd gives a chunk up after 72 h of retries; keep that, ours is 1 h.
            buffer.setdefault("retry_timeout", FLUENTD_RETRY_TIMEOUT)
        if any("overflow_action" not in buffer for buffer in buffers):
            self._warn(root.where, "overflow_action: where a <buffer> does not set it, a full "
                       "buffer blocks (slows the senders down); Fluentd's default, "
                       "throw_exception, refuses and loses events")  # fmt: skip
        return self.data

    def _warn(self, where: str, text: str) -> None:
        self.warnings.append(f"{where}: {text}")

    def _each(self, convert: Callable[[Directive], Any], d: Directive) -> None:
        """Convert one directive; what is wrong with it is noted, and the next goes on."""
        try:
            convert(d)
        except ConfigError as exc:
            self.errors.append(str(exc))

    def _top(self, d: Directive) -> None:
        if d.name == "system":
            self.data["server"].update(self._params(d, _SYSTEM, "<system>"))
            for child in d.children:
                self._warn(child.where, f"<{child.name}> in <system> ignored: logs are JSON lines "
                           "on standard error, set by [server] log_level")  # fmt: skip
        elif d.name == "source":
            if (source := self._source(d)) is not None:
                self.data["sources"].append(source)
        elif d.name == "match":
            self._match(d, label=None)
        elif d.name == "label":
            self._label(d)
        elif d.name == "filter":
            self._filter(d, label=None)
        else:
            raise ConfigError(f"{d.where}: <{d.name}> is not supported here")

    def _label(self, d: Directive) -> None:
        if d.arg in ("@FLUENT_LOG", "@ERROR"):
            why = ("the service's own logs go to standard error" if d.arg == "@FLUENT_LOG" else
                   "events Fluentd would send there are dropped and counted in "
                   "aggregator_input_errors_total / aggregator_dropped_events_total")
            self._warn(d.where, f"<label {d.arg}> ignored: {why}")
            return
        if not d.arg.startswith("@"):
            raise ConfigError(f"{d.where}: a label's name starts with @, got {d.arg!r}")
        for child in d.children:
            self._each(lambda c: self._in_label(c, d.arg), child)

    def _in_label(self, d: Directive, label: str) -> None:
        if d.name == "match":
            self._match(d, label=label)
        elif d.name == "filter":
            self._filter(d, label=label)
        else:
            raise ConfigError(f"{d.where}: <{d.name}> is not supported in a <label>")

    # --- sources -------------------------------------------------------------------------

    def _source(self, d: Directive) -> dict[str, Any] | None:
        kind = self._type(d, "<source>")
        if kind in _MONITORS:
            self._warn(d.where, f"<source> @type {kind} ignored: the http source serves "
                       "GET /metrics (Prometheus) and GET /api/health")  # fmt: skip
            return None
        if kind == "forward":
            source = {"type": "forward", **self._params(d, _FORWARD, "<source> forward")}
            for child in d.children:
                if child.name == "security":
                    source["security"] = self._security(child)
                elif child.name == "transport" and child.arg in ("", "tcp"):
                    self._params(child, Section(rules={}), "<transport tcp>")
                elif child.name == "transport" and child.arg == "tls":
                    source["tls"] = self._params(child, _TLS, "<transport tls>")
                else:
                    raise ConfigError(f"{child.where}: <{child.name} {child.arg}> is not "
                                      "supported in a forward source")  # fmt: skip
            return source
        if kind == "http":
            source = {"type": "http", **self._params(d, _HTTP, "<source> http")}
            for child in d.children:
                raise ConfigError(f"{child.where}: <{child.name}> is not supported in an http "
                                  "source (bodies are JSON, msgpack or form, as in_http's default)")
            return source
        raise ConfigError(f"{d.where}: <source> @type {kind} is not supported: the aggregator's "
                          "inputs are forward and http")  # fmt: skip

    def _security(self, d: Directive) -> dict[str, Any]:
        security = self._params(d, _SECURITY, "<security>")
        for child in d.children:
            if child.name == "user":
                security.setdefault("users", []).append(self._params(child, _USER, "<user>"))
            elif child.name == "client":
                security.setdefault("clients", []).append(self._params(child, _CLIENT,
                                                                       "<client>"))  # fmt: skip
            else:
                raise ConfigError(f"{child.where}: <{child.name}> is not supported in <security>")
        return security

    # --- filters -------------------------------------------------------------------------

    def _filter(self, d: Directive, label: str | None) -> None:
        kind = self._type(d, "<filter>")
        convert = {"record_transformer": self._record_transformer, "grep": self._grep,
                   "parser": self._parser_filter, "concat": self._concat}.get(kind)  # fmt: skip
        if convert is None:
            raise ConfigError(f"{d.where}: <filter> @type {kind} is not supported: filters are "
                              "record_transformer, grep, parser and concat")  # fmt: skip
        settings: dict[str, Any] = {"type": kind, "match": d.arg or "**", **convert(d)}
        if label is not None:
            settings["label"] = label
        ident = d.params.get("@id")
        if ident is not None:
            settings["name"] = re.sub(r"[^\w-]", "_", ident.value)
        self.data.setdefault("filters", []).append(settings)

    def _record_transformer(self, d: Directive) -> dict[str, Any]:
        params = dict(d.params)
        ruby = params.pop("enable_ruby", None)
        if ruby is not None and fluent_bool(ruby.value, ruby.where) is True:
            raise ConfigError(f"{ruby.where}: record_transformer enable_ruby true is not "
                              "supported: Ruby expressions do not run here (the placeholders "
                              "${tag}, ${tag_parts[N]}, ${record[\"key\"]}... do)")  # fmt: skip
        out = self._params(Directive(d.name, d.arg, d.where, params), _RECORD_TRANSFORMER,
                           "<filter> record_transformer")  # fmt: skip
        for child in d.children:
            if child.name != "record":
                raise ConfigError(f"{child.where}: <{child.name}> is not supported in a "
                                  "record_transformer filter")  # fmt: skip
            out.setdefault("record", {}).update(
                {key: param.value for key, param in child.params.items()}
            )
        return out

    def _grep(self, d: Directive) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, param in d.params.items():
            m = re.fullmatch(r"(regexp|exclude)([1-9]\d?)", key)
            if key in ("@type", "type", "@id"):
                continue
            if m is None:
                self.errors.append(f"{param.where}: <filter> grep: {key} is not supported")
                continue
            field, _, pattern = param.value.partition(" ")
            if not pattern:
                self.errors.append(f"{param.where}: {key} needs a key and a pattern")
                continue
            out.setdefault(m.group(1), []).append({"key": field, "pattern": pattern})
        for child in d.children:
            if child.name in ("regexp", "exclude"):
                out.setdefault(child.name, []).append(self._grep_rule(child))
            elif child.name in ("and", "or"):
                group: dict[str, Any] = {}
                for rule in child.children:
                    if rule.name not in ("regexp", "exclude"):
                        raise ConfigError(f"{rule.where}: <{rule.name}> is not supported in "
                                          f"<{child.name}>")  # fmt: skip
                    group.setdefault(rule.name, []).append(self._grep_rule(rule))
                out.setdefault(child.name, []).append(group)
            else:
                raise ConfigError(f"{child.where}: <{child.name}> is not supported in a grep "
                                  "filter")  # fmt: skip
        return out

    def _grep_rule(self, d: Directive) -> dict[str, Any]:
        return self._params(d, _GREP_RULE, f"<{d.name}>")

    def _parser_filter(self, d: Directive) -> dict[str, Any]:
        params = dict(d.params)
        legacy = params.pop("format", None)  # Fluentd's compat parameters: format json|/re/
        out = self._params(Directive(d.name, d.arg, d.where, params), _PARSER_FILTER,
                           "<filter> parser")  # fmt: skip
        parse: dict[str, Any] = {}
        if legacy is not None:
            parse = {"type": "json"} if legacy.value == "json" else {
                "type": "regexp", "expression": legacy.value}  # fmt: skip
        for child in d.children:
            if child.name != "parse":
                raise ConfigError(f"{child.where}: <{child.name}> is not supported in a parser "
                                  "filter")  # fmt: skip
            kind = self._type(child, "<parse>")
            if kind not in ("json", "regexp"):
                raise ConfigError(f"{child.where}: <parse> @type {kind} is not supported: json "
                                  "or regexp")  # fmt: skip
            parse = {"type": kind, **self._params(child, _PARSE, f"<parse> {kind}")}
        if parse:
            out["parse"] = parse
        return out

    def _concat(self, d: Directive) -> dict[str, Any]:
        params = dict(d.params)
        fmt = params.pop("partial_metadata_format", None)
        if fmt is not None and fmt.value != "docker-fluentd":
            raise ConfigError(f"{fmt.where}: partial_metadata_format {fmt.value} is not "
                              "supported: docker-fluentd (Docker's fluentd log driver)")
        cri = params.pop("use_partial_cri_logtag", None)
        if cri is not None and fluent_bool(cri.value, cri.where) is True:
            raise ConfigError(f"{cri.where}: use_partial_cri_logtag is not supported")
        return self._params(Directive(d.name, d.arg, d.where, params), _CONCAT,
                            "<filter> concat")  # fmt: skip

    # --- outputs -------------------------------------------------------------------------

    def _match(self, d: Directive, label: str | None) -> None:
        if not d.arg:
            raise ConfigError(f"{d.where}: <match> needs a tag pattern")
        kind = self._type(d, "<match>")
        name = self._name(d, kind)
        if kind == "kinesis_firehose":
            dest = self._firehose(d, name)
        elif kind in ("null", "stdout"):
            dest = {"type": kind, **self._params(d, _SIMPLE_OUTPUT, f"<match> {kind}")}
            if kind == "stdout":
                self._warn(d.where, "stdout writes one JSON object per line, not Fluentd's "
                           "'time tag record' format")  # fmt: skip
            self._sections(d, dest, kind, ("buffer", "inject"))
        elif kind == "file":
            dest = self._file(d)
        elif kind == "forward":
            dest = self._forward_output(d, name)
        else:
            raise ConfigError(f"{d.where}: <match> @type {kind} is not supported: outputs are "
                              "kinesis_firehose, forward, file, stdout and null")  # fmt: skip
        self.data["destinations"][name] = dest
        route: dict[str, Any] = {"match": d.arg, "destination": name}
        if label is not None:
            route["label"] = label
        self.data["routes"].append(route)

    def _firehose(self, d: Directive, name: str) -> dict[str, Any]:
        params = dict(d.params)
        append = params.pop("append_new_line", None)
        if append is not None and fluent_bool(append.value, append.where) is not True:
            raise ConfigError(f"{append.where}: append_new_line false is not supported: every "
                              "record ends with a newline")  # fmt: skip
        for key in ("aws_key_id", "aws_sec_key", "aws_ses_token"):
            if key in params:
                raise ConfigError(f"{params[key].where}: {key} is not supported: credentials "
                                  "come from the standard AWS chain (the ECS task role, or "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")  # fmt: skip
        verify = params.pop("ssl_verify_peer", None)
        if verify is not None and fluent_bool(verify.value, verify.where) is not True:
            raise ConfigError(f"{verify.where}: ssl_verify_peer false is not supported: give "
                              "the endpoint's CA in AWS_CA_BUNDLE")  # fmt: skip
        dest = {"type": "firehose",
                **self._params(Directive(d.name, d.arg, d.where, params), _FIREHOSE,
                               "<match> kinesis_firehose")}  # fmt: skip
        if "delivery_stream" not in dest:
            raise ConfigError(f"{d.where}: kinesis_firehose needs delivery_stream_name")
        others = []
        for child in d.children:
            if child.name == "assume_role_credentials":
                dest["assume_role"] = self._params(child, _ASSUME_ROLE,
                                                   "<assume_role_credentials>")  # fmt: skip
            elif child.name in _OTHER_CREDENTIALS:
                raise ConfigError(f"{child.where}: <{child.name}> is not supported: credentials "
                                  "come from the standard AWS chain (the ECS task role, "
                                  "AWS_PROFILE, the web identity of EKS), or "
                                  "<assume_role_credentials>")  # fmt: skip
            else:
                others.append(child)
        self._sections(Directive(d.name, d.arg, d.where, d.params, others), dest,
                       "kinesis_firehose", ("buffer", "secondary", "inject", "format"), name)
        return dest

    def _forward_output(self, d: Directive, name: str) -> dict[str, Any]:
        for key in ("tls_allow_self_signed_cert", "tls_client_private_key_passphrase"):
            if key in d.params and d.params[key].value not in ("", "false"):
                raise ConfigError(f"{d.params[key].where}: {key} is not supported: give the "
                                  "server's certificate itself as tls_ca_cert_path, and a key "
                                  "without a passphrase")  # fmt: skip
        for key in ("host", "port"):
            if key in d.params:
                raise ConfigError(f"{d.params[key].where}: {key} is obsolete in out_forward: "
                                  "use a <server> section")  # fmt: skip
        dest = {"type": "forward", **self._params(d, _FORWARD_OUTPUT, "<match> forward")}
        tls = {key: dest.pop(key) for key in _FORWARD_TLS if key in dest}
        if "ca_path" in tls:
            if len(tls["ca_path"]) != 1:
                raise ConfigError(f"{d.params['tls_ca_cert_path'].where}: one CA file, please "
                                  "(a bundle may hold several certificates)")  # fmt: skip
            tls["ca_path"] = tls["ca_path"][0]
        if dest.pop("transport", "tcp") == "tls":
            dest["tls"] = tls
        elif tls:
            self._warn(d.where, "tls_* parameters ignored: transport is not tls")
        servers, others = [], []
        for child in d.children:
            if child.name == "server":
                servers.append(self._params(child, _FORWARD_SERVER, "<server>"))
            elif child.name == "security":
                dest["security"] = self._params(child, _FORWARD_SECURITY, "<security>")
            else:
                others.append(child)
        if not servers:
            raise ConfigError(f"{d.where}: a forward output needs a <server>")
        dest["servers"] = servers
        self._sections(Directive(d.name, d.arg, d.where, d.params, others), dest, "forward",
                       ("buffer", "secondary", "inject"), name)  # fmt: skip
        return dest

    def _file(self, d: Directive) -> dict[str, Any]:
        where = d.where
        params = dict(d.params)
        path = params.pop("path", None) or params.pop("directory", None)
        if path is None:
            raise ConfigError(f"{where}: a file output needs path")
        if any(mark in path.value for mark in ("%", "${tag", "${chunk_id")):
            raise ConfigError(f"{path.where}: placeholders in path are not supported: files are "
                              "named PREFIX.<start time>.<n>.ndjson in one directory")  # fmt: skip
        for key, why in (("append", "files are rotated by size"),
                         ("basename", "files are named PREFIX.<start time>.<n>.ndjson"),
                         ("compress", "files are written uncompressed"),
                         ("symlink_path", ""), ("add_path_suffix", ""), ("path_suffix", ""),
                         ("@log_level", _COMMON_IGNORED["@log_level"])):  # fmt: skip
            if key in params:
                self._warn(params.pop(key).where, f"{key} ignored" + (f": {why}" if why else ""))
        params.pop("@type", None)
        params.pop("@id", None)
        for key, param in params.items():
            raise ConfigError(f"{param.where}: {key} is not supported in a file output")
        directory, prefix = os.path.split(path.value.rstrip("/"))
        self._warn(where, f"file output: NDJSON files in {directory or '.'} named "
                   f"{prefix}.<start time>.<n>.ndjson (not Fluentd's file names or format)")
        dest: dict[str, Any] = {"type": "file", "path": directory or ".", "prefix": prefix}
        self._sections(d, dest, "file", ("buffer", "format", "inject"))
        return dest

    def _secondary(self, d: Directive, primary: str) -> str:
        kind = self._type(d, "<secondary>")
        if kind not in ("file", "secondary_file"):
            raise ConfigError(f"{d.where}: <secondary> @type {kind} is not supported: file or "
                              "secondary_file")  # fmt: skip
        name = f"{primary}_secondary"
        self.data["destinations"][name] = self._file(d)
        return name

    def _inject(self, d: Directive) -> dict[str, Any]:
        params = dict(d.params)
        time_type = params.pop("time_type", None)
        time_format = params.pop("time_format", None)
        inject = self._params(Directive(d.name, d.arg, d.where, params), _INJECT, "<inject>")
        kind = time_type.value if time_type else "float"
        if kind == "float":
            inject["time_format"] = "epoch"
        elif kind == "string" and (time_format is None or time_format.value.startswith(
                "%Y-%m-%dT%H:%M:%S")):  # fmt: skip
            inject["time_format"] = "iso8601"
            if time_format is not None and time_format.value not in ("%Y-%m-%dT%H:%M:%S.%LZ",
                                                                     "%Y-%m-%dT%H:%M:%S.%L%z"):
                self._warn(time_format.where, f"time_format {time_format.value!r} becomes "
                           "ISO 8601 with milliseconds in UTC (2024-01-31T12:00:00.123Z)")
        elif kind == "unixtime":
            inject["time_format"] = "epoch"
            self._warn(d.where, "time_type unixtime becomes epoch seconds with a fraction")
        else:
            where = time_type.where if time_type else d.where
            raise ConfigError(f"{where}: time_type {kind} with time_format "
                              f"{time_format.value if time_format else ''!r} is not supported: "
                              "float, unixtime or ISO 8601 strings")  # fmt: skip
        return inject

    def _sections(
        self, d: Directive, dest: dict[str, Any], kind: str, allowed: tuple[str, ...],
        name: str = "",
    ) -> None:  # fmt: skip
        """An output's sections, of those ``allowed`` for its kind, into ``dest``."""
        for child in d.children:
            self._each(lambda c: self._section(c, dest, kind, allowed, name), child)

    def _section(
        self, d: Directive, dest: dict[str, Any], kind: str, allowed: tuple[str, ...], name: str
    ) -> None:
        if d.name not in allowed:
            raise ConfigError(f"{d.where}: <{d.name}> is not supported in a {kind} output")
        if d.name == "buffer":
            if d.arg not in ("", "tag"):
                self._warn(d.where, f"<buffer {d.arg}>: chunk keys ignored; chunks are per "
                           "destination")  # fmt: skip
            dest["buffer"] = self._buffer(d)
        elif d.name == "secondary":
            dest["secondary"] = self._secondary(d, name)
        elif d.name == "inject":
            dest["inject"] = self._inject(d)
        else:  # format
            self._json_format(d)

    def _buffer(self, d: Directive) -> dict[str, Any]:
        buffer = self._params(d, _BUFFER, "<buffer>")
        if buffer.get("type") != "file":
            if buffer.pop("path", None) is not None:  # Fluentd too says it is not used
                self._warn(d.params["path"].where, "<buffer>: path ignored: the buffer is in "
                           "memory (@type file keeps it on disk)")  # fmt: skip
            return buffer
        if "path" not in buffer:
            raise ConfigError(f"{d.where}: <buffer> @type file needs path (a directory of its "
                              "own; <system> root_dir is not read)")  # fmt: skip
        if "total_limit_size" not in buffer:
            self._warn(d.where, "<buffer> @type file: total_limit_size not set: 256MiB of disk "
                       "here (Fluentd's file buffer default is 64GB)")  # fmt: skip
        return buffer

    def _json_format(self, d: Directive) -> None:
        kind = d.params.get("@type")
        if kind is not None and kind.value != "json":
            raise ConfigError(f"{kind.where}: <format> @type {kind.value} is not supported: "
                              "records are written as JSON")  # fmt: skip

    # --- shared ----------------------------------------------------------------------------

    def _type(self, d: Directive, what: str) -> str:
        kind = d.params.get("@type") or d.params.get("type")
        if kind is None:
            raise ConfigError(f"{d.where}: {what} needs @type")
        return kind.value

    def _name(self, d: Directive, kind: str) -> str:
        ident = d.params.get("@id")
        if ident is not None:
            return re.sub(r"[^\w-]", "_", ident.value)
        n = 1
        while f"{kind}_{n}" in self.data["destinations"]:
            n += 1
        return f"{kind}_{n}"

    def _params(self, d: Directive, section: Section, what: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, param in d.params.items():
            if key in ("@type", "type") and what != "<buffer>":
                continue  # read by _type
            if key == "@id" and d.name in ("match", "filter"):
                continue  # read by _name
            if key in section.rules:
                ours, read = section.rules[key]
                try:
                    out[ours] = read(param.value, param.where)
                except ConfigError as exc:
                    self.errors.append(str(exc))
            elif key in section.ignored:
                why = section.ignored[key]
                self._warn(param.where, f"{what}: {key} ignored" + (f": {why}" if why else ""))
            else:
                self.errors.append(f"{param.where}: {what}: {key} is not supported")
        return out


def convert_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """``path`` (a fluent.conf) as configuration data, and the warnings about what was
    dropped; ConfigError with the file and line of everything that cannot be converted."""
    converter = Converter()
    root = parse(path, converter.errors)
    return converter.convert(root), converter.warnings


def looks_like_fluentd(path: str | Path, text: str) -> bool:
    """Whether a config file is Fluentd's (by name, else by its first directive)."""
    suffix = Path(path).suffix
    if suffix == ".toml":
        return False
    if suffix == ".conf":
        return True
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line.startswith(("<", "@include"))
    return False
