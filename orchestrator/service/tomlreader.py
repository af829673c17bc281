"""Reading the config's TOML: typed access that fails naming the file, line and key."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from transport.checks import has_type

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """The config cannot be used; the message names the file, line and key."""

    def __init__(self, file: str, line: int | None, key: str, problem: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.file = file
        self.line = line
        self.key = key
        self.problem = problem


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p.strip("\"'") for p in parts)


class _KeyLines:
    """Line numbers of the tables and keys in a TOML text (1-based)."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: KeyPath = ()
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2:
                    in_string = None
                continue
            header = _HEADER.match(line)
            if header:
                name = _split_key(header.group(2))
                if header.group(1) == "[[":
                    index = counts.get(name, 0)
                    counts[name] = index + 1
                    table = (*name, index)
                else:
                    table = name
                self.lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key:
                self.lines.setdefault((*table, *_split_key(key.group(1))), number)
                rest = line[key.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2:
                        in_string = quote

    def line(self, path: KeyPath) -> int | None:
        """The line of ``path``, else of its nearest enclosing key or table."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


def dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class Reader:
    """Typed access to the parsed document that raises ConfigError at the right line."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.where = _KeyLines(text)

    def error(self, path: KeyPath, problem: str) -> ConfigError:
        return ConfigError(self.file, self.where.line(path), dotted(path), problem)

    def refuse_unknown(self, table: Mapping[str, Any], path: KeyPath, known: set[str]) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                choices = ", ".join(sorted(known))
                raise self.error((*path, key), f"unknown key{hint}; known keys: {choices}")

    def get(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in table:
            if default is ...:
                raise self.error(path, f"missing required key {key!r}")
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not has_type(value, kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(
                (*path, key), f"must be {names}, got {_TYPE_NAMES.get(type(value), '?')} {value!r}"
            )
        return value

    def positive(
        self, table: Mapping[str, Any], path: KeyPath, key: str, default: Any = ...
    ) -> Any:
        value = self.get(table, path, key, (int, float), default)
        if value is not None and value is not default and not value > 0:
            raise self.error((*path, key), f"must be > 0, got {value!r}")
        return value


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}
