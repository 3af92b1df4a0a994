"""Sweep files (`tuning/*.yaml`): parsed, validated and expanded into trial configs before Ray starts.

A sweep names a base config and the keys to vary (dotted config keys, as for `--set`):

    name: privacy_clients
    base: configs/tiny.yaml          # relative to the working directory, like `fedsim run CONFIG`
    set: {train.rounds: 2}           # fixed for every trial
    grid:                            # every combination
      privacy.client_dp.epsilon: [1, 4, inf]
      clients.num: [2, 4, 8]
      # keys that move together: one comma-separated entry, each value one list (here: the same
      # rows trained per round whatever the client count)
      clients.num, train.local_steps: [[1, 32], [4, 8], [16, 2]]
    random:                          # optional: num_samples draws, each run at every grid point
      num_samples: 2
      seed: 0
      params: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}
    seeds: [0, 1]                    # train.seed: every point once per seed
    metric: auc
    mode: max
    scheduler: none                  # or asha, or {name: asha, grace_period: 1, reduction_factor: 2}
    max_concurrent: 2
    trial_cpus: 0.5                  # bundle 0: the trial's driver loop
    max_failures: 0
    against: privacy.client_dp.epsilon=inf   # optional: each trial paired with its no-DP trial of the
                                             # same settings and seed (`fedsim compare SWEEP --against`)

`privacy.client_dp.epsilon` and `privacy.sample_dp.epsilon` in a sweep also switch their mechanism:
a number turns it on with that target, `inf` (or `.inf`, or null) turns it off (epsilon infinity =
no DP). Random values are drawn here, not by Tune, so every trial's config is known and validated
before the sweep starts (and a resumed sweep runs exactly the same trials).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from fedsim.config import (Config, ConfigError, _build, apply_overrides, config_from_dict, read_yaml_mapping,
                           set_key)

# The sweep metric must be one the simulation reports after an evaluated round.
METRICS = ("auc", "logloss", "accuracy", "auc_mean", "auc_std", "auc_min", "auc_max", "auc_gap", "auc_q25", "auc_q75",
           "train_loss")
# An epsilon target in a sweep also decides whether its mechanism is on: inf / null = off.
EPSILON_KEYS = {"privacy.client_dp.epsilon": "privacy.client_dp.enabled",
                "privacy.sample_dp.epsilon": "privacy.sample_dp.enabled"}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass
class RandomSpec:
    num_samples: int = 1
    seed: int = 0
    # dotted key -> {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi)} | {choice: [values]}
    params: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@dataclass
class SchedulerSpec:
    name: Literal["none", "asha"] = "none"
    grace_period: int = 1  # rounds every trial gets before ASHA may stop it
    reduction_factor: int = 2


@dataclass
class Sweep:
    name: str
    base: str
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: Optional[RandomSpec] = None
    seeds: list[int] = field(default_factory=list)
    metric: str = "auc"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent: Optional[int] = None
    trial_cpus: float = 0.5
    max_failures: int = 0
    against: Optional[str] = None  # KEY=VALUE[,KEY=VALUE]: the reference trial of `fedsim compare SWEEP --against`


@dataclass
class Trial:
    index: int
    params: dict[str, Any]  # the varied keys (dotted) -> value; epsilon inf = mechanism off
    cfg: Config


def is_off(value: Any) -> bool:
    """An epsilon value meaning 'no DP': inf, .inf, 'inf', 'infinity' or null."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("inf", ".inf", "+inf", "infinity")
    return isinstance(value, float) and math.isinf(value) and value > 0


def _fail(path: str | Path, msg: str) -> ConfigError:
    return ConfigError(f"sweep file {str(path)!r}: {msg}")


def check_key(key: str, where: str) -> None:
    """`key` must be a dotted path to a config leaf; the error names it and the closest valid key."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{where}: '{key}' is a section; name one of its keys")


def _set(data: dict, key: str, value: Any, where: str) -> None:
    if key in EPSILON_KEYS:
        set_key(data, EPSILON_KEYS[key].split("."), not is_off(value), where)
        value = None if is_off(value) else value
    set_key(data, key.split("."), value, where)


def parse_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file")
    if isinstance(data.get("scheduler"), str):  # shorthand: `scheduler: asha`
        data["scheduler"] = {"name": data["scheduler"]}
    for k in ("name", "base"):
        if k not in data:
            raise _fail(p, f"missing required key '{k}'")
    try:
        sweep = _build(Sweep, data)
    except ConfigError as e:
        raise _fail(p, str(e).replace("config key", "sweep key")) from e
    _validate(sweep, p)
    return sweep


def grid_keys(entry: str) -> list[str]:
    """A grid entry's keys: `a` or, for keys that move together, `a, b`."""
    return [k.strip() for k in entry.split(",")]


def _grid_values(entry: str, value) -> dict[str, Any]:
    return dict(zip(grid_keys(entry), value if "," in entry else [value]))


def _validate(s: Sweep, p: Path) -> None:
    if not s.name or "/" in s.name:
        raise _fail(p, f"name: {s.name!r} must be a non-empty name without '/'")
    for entry, values in s.grid.items():
        keys = grid_keys(entry)
        for key in keys:
            check_key(key, f"sweep file {str(p)!r}: grid")
        if not values:
            raise _fail(p, f"grid.{entry}: needs at least one value")
        for v in values if len(keys) > 1 else []:
            if not isinstance(v, list) or len(v) != len(keys):
                raise _fail(p, f"grid.{entry}: {v!r} must be a list of {len(keys)} values, one for each of "
                               f"{', '.join(keys)}")
    for key in s.set:
        check_key(key, f"sweep file {str(p)!r}: set")
    r = s.random
    if r is not None:
        if r.num_samples < 1:
            raise _fail(p, f"random.num_samples: {r.num_samples} must be >= 1")
        for key, dist in r.params.items():
            check_key(key, f"sweep file {str(p)!r}: random.params")
            where = f"random.params.{key}"
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise _fail(p, f"{where}: {dist!r} must be one of {{{': [...]}, {'.join(DISTRIBUTIONS)}: [...]}}")
            kind, args = next(iter(dist.items()))
            if kind == "choice":
                if not args:
                    raise _fail(p, f"{where}.choice: needs at least one value")
                continue
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise _fail(p, f"{where}.{kind}: {args!r} must be [low, high] with low < high")
            if kind == "loguniform" and args[0] <= 0:
                raise _fail(p, f"{where}.loguniform: {args!r} needs low > 0")
    varied = [k for e in s.grid for k in grid_keys(e)] + [*(r.params if r else {})] + (["train.seed"] if s.seeds else [])
    for key in set(varied) | set(s.set):
        n = varied.count(key) + (key in s.set)
        if n > 1:
            raise _fail(p, f"'{key}' is given {n} times (set, grid, random.params, seeds); give it once")
    for pair in s.against.split(",") if s.against else []:
        key, sep, _ = pair.strip().partition("=")
        if not sep or key not in varied:
            raise _fail(p, f"against: {s.against!r} must be KEY=VALUE[,KEY=VALUE] with each KEY a key the sweep "
                           f"varies ({', '.join(sorted(set(varied))) or 'none'})")
    if s.metric not in METRICS:
        raise _fail(p, f"metric: {s.metric!r} is not one of {', '.join(METRICS)}")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        raise _fail(p, f"max_concurrent: {s.max_concurrent} must be >= 1 or null")
    # Bundle 0 must hold something: an empty head bundle makes Tune shift the executor bundles.
    if not s.trial_cpus > 0:
        raise _fail(p, f"trial_cpus: {s.trial_cpus} must be > 0")
    if s.max_failures < 0:
        raise _fail(p, f"max_failures: {s.max_failures} must be >= 0")
    if s.scheduler.grace_period < 1 or s.scheduler.reduction_factor < 2:
        raise _fail(p, "scheduler: grace_period must be >= 1 and reduction_factor >= 2")


def _draw(dist: dict, rng: np.random.Generator) -> Any:
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if kind == "randint":
        return int(rng.integers(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    return float(rng.uniform(args[0], args[1]))


def points(s: Sweep) -> list[dict[str, Any]]:
    """Every trial's varied values: random draws x grid combinations x seeds (seeds innermost)."""
    rng = np.random.default_rng(s.random.seed if s.random else 0)
    draws = [{k: _draw(d, rng) for k, d in s.random.params.items()} for _ in range(s.random.num_samples)] \
        if s.random else [{}]
    combos = list(itertools.product(*s.grid.values()))
    out = []
    for draw in draws:
        for combo in combos:
            for seed in s.seeds or [None]:
                point = {k: v for e, value in zip(s.grid, combo) for k, v in _grid_values(e, value).items()}
                point.update(draw)
                if seed is not None:
                    point["train.seed"] = seed
                out.append({k: math.inf if k in EPSILON_KEYS and is_off(v) else v for k, v in point.items()})
    return out


def load_base(s: Sweep, sweep_path: str | Path, overrides: list[str] | None) -> dict:
    """The base config as a dict, with the sweep's `set` and the command line's `--set` applied."""
    base = Path(s.base)
    if not base.exists():
        raise _fail(sweep_path, f"base: config file {s.base!r} does not exist (paths are relative to the "
                                f"working directory, {Path.cwd()})")
    data = read_yaml_mapping(base, "config file")
    for key, value in s.set.items():
        _set(data, key, value, f"sweep file {str(sweep_path)!r}: set.{key}")
    return apply_overrides(data, overrides or [])


def expand(s: Sweep, sweep_path: str | Path, overrides: list[str] | None = None,
           tracking_uri: str | None = None) -> list[Trial]:
    """Build and validate every trial's config (and its derived privacy settings) before any trial
    starts; an error names the trial, its values and the bad key."""
    from fedsim.postprocessors import describe

    base = load_base(s, sweep_path, overrides)
    trials = []
    for i, point in enumerate(points(s)):
        data = copy.deepcopy(base)
        for key, value in point.items():
            _set(data, key, value, f"grid/random value {key}")
        data["name"] = f"{s.name}-t{i:03d}"
        if tracking_uri:
            data.setdefault("tracking", {})["uri"] = tracking_uri
        try:
            cfg = config_from_dict(data)
            describe(cfg)  # e.g. an epsilon target no noise can reach
        except ValueError as e:
            raise _fail(sweep_path, f"trial {i} ({describe_point(point)}): {e}") from e
        if s.scheduler.name == "asha" and cfg.eval.every != 1:
            raise _fail(sweep_path, f"scheduler asha compares trials every round: eval.every must be 1, "
                                    f"trial {i} has eval.every={cfg.eval.every}")
        trials.append(Trial(i, point, cfg))
    return trials


def describe_point(point: dict) -> str:
    return ", ".join(f"{k}={'inf' if v == math.inf else v}" for k, v in point.items()) or "base config"

