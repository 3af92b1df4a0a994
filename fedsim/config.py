"""The experiment config: typed, validated in one place, loaded from YAML plus `--set` overrides.

Every section is a dataclass; `load_config` walks the YAML against the annotations so that an
unknown key or a value of the wrong type is an error that names the key (`train.lr`), never a
silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass
class SyntheticConfig:
    num_users: int = 200
    num_items: int = 300
    ratings_per_user: int = 40
    num_clusters: int = 4
    taste_strength: float = 2.0


@dataclass
class DataConfig:
    dataset: Literal["movielens-100k", "synthetic"] = "movielens-100k"
    history_len: int = 10
    like_threshold: float = 3.0
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # A fixed random subset of the valid and test splits, drawn before users are split into clients,
    # so runs with different client counts are scored on the same rows. None keeps every row.
    max_eval_rows: Optional[int] = None
    # Per-client caps on rows of each split; None keeps all rows.
    max_train_per_client: Optional[int] = None
    max_valid_per_client: Optional[int] = None
    max_test_per_client: Optional[int] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PartitionConfig:
    method: Literal["iid", "dirichlet", "kmeans"] = "iid"
    alpha: float = 0.5


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    # `smollm2-135m` (embedded real default), `tiny-random`, or any HF causal LM name / local path.
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = 256
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ClientsConfig:
    num: int = 4
    # Clients sampled per round: an int count, or a fraction of `num` when <= 1.0 and a float.
    per_round: Union[int, float] = 1.0


@dataclass
class ExecutorsConfig:
    # 0 = one actor per client; k > 0 = a pool of k actors serving the clients as virtual clients.
    num: int = 0
    num_cpus: float = 1.0
    # "auto": 1/(actors per GPU) when the cluster has GPUs, else 0.
    num_gpus: Union[float, Literal["auto"]] = "auto"
    max_restarts: int = 3


@dataclass
class TrainConfig:
    rounds: int = 3
    # Local work per client per round: `local_steps` optimizer steps, or `local_epochs` over the
    # client's train rows when local_steps is None.
    local_steps: Optional[int] = 8
    local_epochs: Optional[float] = None
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class StrategyConfig:
    name: Literal["fedavg"] = "fedavg"


@dataclass
class EvalConfig:
    split: Literal["test", "valid"] = "test"
    every: int = 1
    batch_size: int = 16


@dataclass
class FaultsConfig:
    # The round fails when fewer than this fraction of the sampled clients report.
    quorum: float = 0.5
    # Chaos testing: kill the executor process serving `client` when it starts round `round`
    # (once per run), to rehearse dropout and actor restarts. Entries: {round: r, client: c}.
    crash: list[dict[str, int]] = field(default_factory=list)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "fedsim"


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    executors: ExecutorsConfig = field(default_factory=ExecutorsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------
# Parsing against the annotations


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


def validate(cfg: Config) -> Config:
    """Range checks that the types alone cannot express."""
    d, t = cfg.data, cfg.train
    _check(d.history_len >= 1, "data.history_len", d.history_len, "must be >= 1")
    _check(len(d.split) == 3 and all(x > 0 for x in d.split) and abs(sum(d.split) - 1) < 1e-6,
           "data.split", d.split, "must be three positive fractions (train, valid, test) summing to 1")
    for k in ("max_eval_rows", "max_train_per_client", "max_valid_per_client", "max_test_per_client"):
        v = getattr(d, k)
        _check(v is None or v >= 1, f"data.{k}", v, "must be >= 1 or null")
    s = d.synthetic
    for k in ("num_users", "num_items", "ratings_per_user", "num_clusters"):
        _check(getattr(s, k) >= 1, f"data.synthetic.{k}", getattr(s, k), "must be >= 1")
    _check(cfg.partition.alpha > 0, "partition.alpha", cfg.partition.alpha, "must be > 0")
    m = cfg.model
    _check(m.max_length >= 16, "model.max_length", m.max_length, "must be >= 16")
    _check(m.lora.r >= 1, "model.lora.r", m.lora.r, "must be >= 1")
    _check(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "must be in [0, 1)")
    _check(len(m.lora.target_modules) > 0, "model.lora.target_modules", m.lora.target_modules, "must name at least one module")
    c = cfg.clients
    _check(c.num >= 1, "clients.num", c.num, "must be >= 1")
    if isinstance(c.per_round, float):
        _check(0 < c.per_round <= 1, "clients.per_round", c.per_round, "as a fraction must be in (0, 1]")
    else:
        _check(1 <= c.per_round <= c.num, "clients.per_round", c.per_round, f"as a count must be in [1, clients.num={c.num}]")
    e = cfg.executors
    _check(e.num >= 0, "executors.num", e.num, "must be >= 0 (0 = one actor per client)")
    _check(e.num_cpus > 0, "executors.num_cpus", e.num_cpus, "must be > 0")
    _check(e.num_gpus == "auto" or 0 <= e.num_gpus <= 1, "executors.num_gpus", e.num_gpus, "must be 'auto' or in [0, 1]")
    _check(e.max_restarts >= 0, "executors.max_restarts", e.max_restarts, "must be >= 0")
    _check(t.rounds >= 1, "train.rounds", t.rounds, "must be >= 1")
    _check((t.local_steps is None) != (t.local_epochs is None), "train.local_steps", t.local_steps,
           "set exactly one of train.local_steps and train.local_epochs")
    _check(t.local_steps is None or t.local_steps >= 1, "train.local_steps", t.local_steps, "must be >= 1")
    _check(t.local_epochs is None or t.local_epochs > 0, "train.local_epochs", t.local_epochs, "must be > 0")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(cfg.eval.every >= 1, "eval.every", cfg.eval.every, "must be >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    _check(0 < cfg.faults.quorum <= 1, "faults.quorum", cfg.faults.quorum, "must be in (0, 1]")
    for i, crash in enumerate(cfg.faults.crash):
        _check(set(crash) == {"round", "client"}, f"faults.crash[{i}]", crash, "needs exactly the keys round and client")
        _check(0 <= crash["client"] < c.num, f"faults.crash[{i}].client", crash["client"], f"must be in [0, {c.num})")
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading, overrides, flattening


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (['train', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.rounds=5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-3 as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data or {}))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides or []))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
