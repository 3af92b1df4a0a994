"""What a component supports, declared on the component.

Each component class (a client-side adapter or trainer, a strategy, a privacy mechanism) says what
it `provides` and what it `needs`, as capability tags. A run's components are compatible when every
need of every enabled component is provided by another one (`missing`); `fedsim.config.validate`
asks that, instead of holding a table of feature pairs that cannot run together.
"""
from __future__ import annotations


class Capable:
    provides: frozenset = frozenset()
    needs: frozenset = frozenset()
    # Tags this component takes away from the run (e.g. secure aggregation hides each update).
    removes: frozenset = frozenset()


def missing(components: list) -> list[tuple[object, str]]:
    """(component, tag) for each need no other component provides (or that one removes)."""
    removed = set().union(*(c.removes for c in components)) if components else set()
    out = []
    for c in components:
        offered = set().union(*(o.provides for o in components if o is not c)) - removed
        out += [(c, tag) for tag in sorted(c.needs) if tag not in offered]
    return out
