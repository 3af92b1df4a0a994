"""Explicit registries and capabilities.

A registry maps a config value (a strategy name, a client-side mode) to the class that implements
it, filled in one place by a literal list of classes: no module registers itself by being imported.

Each component declares what it `provides` and what it `needs` (capability tags, e.g. the server
seeing each client's own update, or per-sample gradients); `fedsim.config.validate` checks that
every need of an enabled component is met by the run's other components, instead of listing
every pair of features that cannot run together.
"""
from __future__ import annotations


class Registry:
    def __init__(self, key: str, classes: list):
        """`key`: the config key whose values name the classes (for error messages)."""
        self.key = key
        self.classes = {cls.name: cls for cls in classes}
        if len(self.classes) != len(classes):
            raise ValueError(f"{key}: two classes share a name")

    def __getitem__(self, name: str):
        if name not in self.classes:
            raise KeyError(f"{self.key}: {name!r} is not one of {', '.join(map(repr, self.classes))}")
        return self.classes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.classes

    def __iter__(self):
        return iter(self.classes)

    def get(self, name: str, default=None):
        return self.classes.get(name, default)

    def items(self):
        return self.classes.items()
