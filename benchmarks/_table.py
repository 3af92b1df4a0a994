"""The benchmarks' fixed-width text tables (he_overhead.py, secagg_overhead.py): columns in groups,
a space between the columns of a group and " | " between groups, every cell right-aligned."""
from __future__ import annotations


class Table:
    """`Table([("clients", 7, "d"), ...], [...])`: each column is (title, width, format spec for a
    number). `header()` and `row(*values)` give the lines; a str value (e.g. "-" where a figure does
    not apply, or a cell formatted by the caller) is only aligned."""

    def __init__(self, *groups: list[tuple[str, int, str]]):
        self.groups = groups

    def header(self) -> str:
        return " | ".join(" ".join(f"{title:>{width}}" for title, width, _ in g) for g in self.groups)

    def row(self, *values) -> str:
        if len(values) != sum(len(g) for g in self.groups):
            raise ValueError(f"{len(values)} values for {sum(len(g) for g in self.groups)} columns")
        cells = iter(values)
        return " | ".join(" ".join(_cell(next(cells), width, spec) for _, width, spec in g) for g in self.groups)


def _cell(value, width: int, spec: str) -> str:
    return f"{value:>{width}}" if isinstance(value, str) else f"{value:>{width}{spec}}"
