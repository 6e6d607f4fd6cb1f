"""What Fluentd's filters take from Ruby, in Python: regular expressions, record accessors
(``$.a.b``) and how a value reads as a string (``to_s``).

Ruby's regular expressions differ from Python's in a few places that matter in Fluentd configs:
``^`` and ``$`` always match at line ends, ``/m`` means what Python calls DOTALL, named groups
are ``(?<name>...)``, ``\\z`` ends the string, ``\\h`` is a hex digit, POSIX bracket classes
exist. Those are translated; what has no Python equivalent is an error that names the pattern.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any


class RubyRegexError(ValueError):
    pass


_POSIX = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\r\n\v\f", "xdigit": "0-9a-fA-F", "word": r"\w", "blank": r" \t",
    "punct": r"!-/:-@\[-`{-~", "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e",
    "graph": r"\x21-\x7e",
}  # fmt: skip
_ESCAPES = {"z": r"\Z", "Z": r"(?=\n?\Z)", "h": "[0-9a-fA-F]", "H": "[^0-9a-fA-F]",
            "R": r"(?:\r\n|[\n\v\f\r\x85\u2028\u2029])"}  # fmt: skip
_IN_CLASS = {"h": "0-9a-fA-F"}
_UNSUPPORTED = {"G": r"\G", "K": r"\K", "X": r"\X", "p": r"\p{...}", "P": r"\P{...}",
                "g": r"\g<...>"}  # fmt: skip


class RubyRegex:
    """A Ruby regexp, compiled: ``search(text)`` is Ruby's ``=~``.

    Ruby's ``^`` and ``$`` match at every line end, which is Python's MULTILINE; but a search
    with MULTILINE tries a ``^`` at every position of the text (a 300-byte log line: six times
    the time). A text without a newline has one line, where both read alike: it is searched
    without MULTILINE."""

    __slots__ = ("pattern", "search")

    def __init__(self, source: str, flags: int) -> None:
        self.pattern = re.compile(source, flags | re.MULTILINE)
        self.search: Callable[[str], re.Match[str] | None] = self.pattern.search
        if "^" in source or "$" in source:  # else MULTILINE changes nothing
            lines, line = self.pattern.search, re.compile(source, flags).search
            self.search = lambda text: (lines if "\n" in text else line)(text)

    @property
    def groupindex(self) -> Mapping[str, int]:
        return self.pattern.groupindex


def compile_ruby(text: str) -> RubyRegex:
    """A Fluentd ``regexp`` parameter: ``/pattern/flags`` (i, m, x) or a bare pattern, compiled
    as Ruby reads it."""
    source, flags = text, 0
    if text.startswith("/"):
        end = text.rfind("/")
        if end <= 0 or end < len(text) - 3:
            raise RubyRegexError(f"invalid regexp: missing right slash: {text}")
        options = text[end + 1 :]
        source = text[1:end]
        if "i" in options:
            flags |= re.IGNORECASE
        if "m" in options:
            flags |= re.DOTALL  # Ruby's /m: the dot matches a newline
        if "x" in options:
            flags |= re.VERBOSE
    try:
        return RubyRegex(translate(source), flags)
    except re.error as exc:
        raise RubyRegexError(f"regexp {text}: {exc}") from None


def compile_slashed(text: str) -> RubyRegex:
    """fluent-plugin-concat's regexps: ``/.../`` strings whose slashes it drops without reading
    flags."""
    return compile_ruby(text[1:-1] if text.startswith("/") and len(text) > 1 else text)


def translate(source: str) -> str:
    """Ruby regular expression syntax to Python's."""
    out: list[str] = []
    i, n = 0, len(source)
    in_class = 0
    while i < n:
        ch = source[i]
        if ch == "\\" and i + 1 < n:
            nxt = source[i + 1]
            if nxt in _UNSUPPORTED:
                raise RubyRegexError(f"regexp /{source}/: {_UNSUPPORTED[nxt]} has no Python "
                                     "equivalent")  # fmt: skip
            if nxt == "k" and source.startswith("<", i + 2):  # \k<name>: a back reference
                end = source.index(">", i + 3)
                out.append(f"(?P={source[i + 3 : end]})")
                i = end + 1
                continue
            if in_class and nxt in _IN_CLASS:
                out.append(_IN_CLASS[nxt])
            elif not in_class and nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
            else:
                out.append(source[i : i + 2])
            i += 2
            continue
        if in_class:
            if source.startswith("[:", i):
                end = source.find(":]", i + 2)
                name = source[i + 2 : end] if end > 0 else ""
                negate = name.startswith("^")
                if negate or name not in _POSIX:
                    raise RubyRegexError(f"regexp /{source}/: [:{name}:] is not supported")
                out.append(_POSIX[name])
                i = end + 2
                continue
            if source.startswith("&&", i):
                raise RubyRegexError(f"regexp /{source}/: class intersection (&&) is not "
                                     "supported")  # fmt: skip
            if ch == "[":
                in_class += 1
            elif ch == "]":
                in_class -= 1
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = 1
            out.append(ch)
            if source.startswith("^", i + 1):
                out.append("^")
                i += 1
            if source.startswith("]", i + 1):  # a ] first in a class is a literal
                out.append(r"\]")
                i += 1
            i += 1
            continue
        if source.startswith("(?<", i) and not source.startswith(("(?<=", "(?<!"), i):
            out.append("(?P<")
            i += 3
            continue
        if source.startswith("(?", i):
            m = re.match(r"\(\?([imx]*)(?:-([imx]*))?([:)])", source[i:])
            if m:  # inline options: Ruby's m is Python's s
                on = m.group(1).replace("m", "s")
                off = (m.group(2) or "").replace("m", "s")
                out.append("(?" + on + ("-" + off if off else "") + m.group(3))
                i += m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def accessor(key: str) -> Callable[[Any], Any]:
    """Fluentd's record accessor: ``$.a.b`` and ``$['a']['b']`` reach into nested maps (and
    ``[0]`` into arrays); any other key is one top-level key. The value, or None."""
    path = parse_accessor(key)
    if len(path) == 1 and isinstance(path[0], str):
        only = path[0]
        return lambda record: record.get(only) if isinstance(record, dict) else None
    return _dig(path)


def deleter(key: str) -> Callable[[Any], None]:
    """Remove what ``accessor(key)`` reaches, if it is there."""
    path = parse_accessor(key)
    parent, last = _dig(path[:-1]), path[-1]

    def delete(record: Any) -> None:
        target = parent(record)
        if isinstance(target, dict) and isinstance(last, str):
            target.pop(last, None)
        elif isinstance(target, list) and isinstance(last, int) and -len(target) <= last < len(
            target
        ):
            del target[last]

    return delete


def _dig(path: list[str | int]) -> Callable[[Any], Any]:
    def dig(record: Any) -> Any:
        for step in path:
            if isinstance(record, dict) and isinstance(step, str):
                record = record.get(step)
            elif isinstance(record, list) and isinstance(step, int):
                record = record[step] if -len(record) <= step < len(record) else None
            else:
                return None
        return record

    return dig


_BRACKET = re.compile(r"""\[\s*(?:'([^']*)'|"([^"]*)"|(-?\d+))\s*\]""")


def parse_accessor(key: str) -> list[str | int]:
    """The steps of a record accessor (see :func:`accessor`)."""
    path: list[str | int] = []
    if key.startswith("$."):
        for part in key[2:].split("."):
            name, bracket, rest = part.partition("[")
            if name:
                path.append(name)
            if bracket:
                path += [int(i) for i in re.findall(r"(-?\d+)\]", rest)]
    elif key.startswith("$["):
        for single, double, index in _BRACKET.findall(key[1:]):
            path.append(int(index) if index else (single or double))
    else:
        return [key]
    if not path:
        raise ValueError(f"empty keys in record accessor {key!r}")
    return path


def to_s(value: Any) -> str:
    """A value as Ruby's ``to_s`` writes it (what grep matches against)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_to_s(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return inspect(value)


def float_to_s(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = repr(value)
    if "e" in text:  # Ruby: 1.0e+16, Python: 1e+16 (both switch at the same exponents)
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{exponent}"
    return text


def inspect(value: Any) -> str:
    """Ruby's ``inspect`` of maps and arrays (Ruby 3.1: ``{"a"=>1}``)."""
    if value is None:
        return "nil"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{inspect(k)}=>{inspect(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(inspect(v) for v in value) + "]"
    return to_s(value)
