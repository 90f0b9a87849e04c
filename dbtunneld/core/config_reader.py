"""Typed, problem-collecting access to one TOML table of the config (``r.number(...)``, ``r.port(...)``).

A ``TableReader`` never raises on bad input: each wrong type, range or unknown key becomes a
``Problem`` with its key path and the fix, so a whole file's problems are reported at once.
"""

from __future__ import annotations

import difflib
from typing import Any

from .errors import Problem


class TableReader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, table: Any, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        self.valid = isinstance(table, dict)
        if not self.valid:
            self.problem("", f"must be a table, not {kind_of(table)}", f"write it as [{path}]")
            table = {}
        self.table = table

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str, fix: str = "") -> None:
        where = self.key(name) if name else self.path
        self.problems.append(Problem(where, message, fix))

    def get(self, name: str, kind: type | tuple[type, ...], default: Any, *, required: bool = False, fix: str = "") -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required and self.valid:
                self.problem(name, "is required", fix)
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problem(name, f"must be {want}, not {kind_of(value)} {value!r}", f"write {want}")
            return default
        return value

    def text(self, name: str, default: str = "", **kw: Any) -> str:
        value: str = self.get(name, str, default, **kw).strip()
        if kw.get("required") and not value and isinstance(self.table.get(name), str):
            self.problem(name, "is empty", kw.get("fix", ""))
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value: float = self.get(name, float, default)
        if not lo <= value <= hi:
            self.problem(name, f"{value:g} is out of range", f"use a value from {lo:g} to {hi:g}")
            return default
        return value

    def port(self, name: str, default: int | None, *, required: bool = False) -> int | None:
        value: int | None = self.get(name, int, default, required=required, fix="give a TCP port from 1 to 65535")
        if value is not None and not 1 <= value <= 65535:
            self.problem(name, f"port {value} is out of range", "use a port from 1 to 65535")
            return default
        return value

    def string_table(self, name: str) -> dict[str, str]:
        value = self.get(name, dict, {})
        out = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.problem(f"{name}.{k}", f"must be a string, not {kind_of(v)}", 'write it in quotes, e.g. "bastion"')
            else:
                out[k] = v
        return out

    def finish(self) -> None:
        for name in self.table:
            if name not in self.seen:
                close = difflib.get_close_matches(name, sorted(self.seen), n=1)
                fix = f'did you mean "{close[0]}"?' if close else "remove it"
                self.problem(name, "unknown key", fix)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table", list: "a list"}


def kind_of(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            dict: "a table", list: "a list"}.get(type(value), type(value).__name__)


def section_reader(doc: dict[str, Any], name: str, problems: list[Problem]) -> TableReader:
    return TableReader(doc.get(name, {}), name, problems)

