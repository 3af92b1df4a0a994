"""What a component needs and what it breaks, declared on the component.

Each component class (a client-side adapter or trainer, a strategy, a privacy mechanism) lists
the guarantees it `needs` from the rest of the run and the ones it `breaks`, as tags with the
reason in words (e.g. DP-FedAvg needs a mean of updates, which PPLR's per-client mixing and FLoRA's
stacked products break; secure aggregation breaks the server seeing each client's own update). A
run's components can run together when no component breaks what another needs (`conflicts`);
`fedsim.config` asks that, instead of holding a table of feature pairs. A new component declares
its own tags; no other component, and no table, changes.

Messages: the breaker's reason when it gives one for the tag, else the needer's; `{key}` and
`{value!r}` in it are the *other* component's config key and value.
"""
from __future__ import annotations


class Capable:
    needs: dict[str, str] = {}  # tag -> why it is needed (said when the breaker gives no reason)
    breaks: dict[str, str | None] = {}  # tag -> why it breaks it (None: the needer's reason is said)


def conflicts(components: list[tuple[str, object, type]]) -> list[str]:
    """Messages for every need one component has that another breaks; `components`: (config key,
    value, class) of each enabled component. Each message starts with the key it names."""
    out = []
    for n_key, n_value, needer in components:
        for tag, n_why in needer.needs.items():
            for b_key, b_value, breaker in components:
                if breaker is needer or tag not in breaker.breaks:
                    continue
                b_why = breaker.breaks[tag]
                if b_why:
                    out.append(f"{b_key}: {b_value!r} " + b_why.format(key=n_key, value=n_value))
                else:
                    out.append(f"{n_key}: {n_value!r} " + n_why.format(key=b_key, value=b_value))
    return out
