"""The experiment config: typed, validated, loaded from YAML plus `--set` overrides.

The schema and the checks of each value on its own are `fedsim.schema` (re-exported here). This
module adds the one check that needs the components themselves: whether the enabled ones can run
together, from what each declares it needs and breaks (`fedsim.core.capabilities`). It sits above
the client and server packages, so only the driver side (simulation, tuning, CLI) imports it.
"""
from __future__ import annotations

from pathlib import Path

from fedsim.client.compiled import Compiled
from fedsim.client.trainers import ADAPTERS, STORAGE, TRAINERS, Personal
from fedsim.client.trainers.personal import SharedRouter
from fedsim.core.capabilities import conflicts
from fedsim.privacy.client_dp import ClientDP
from fedsim.privacy.dp_lora import DPLoRA
from fedsim.privacy.he import HEAggregation
from fedsim.privacy.secagg import SecAgg
from fedsim.schema import (AuditConfig, ClientDPConfig, ClientsConfig, Config, ConfigError, DataConfig,  # noqa: F401
                           DPLoraConfig, EvalConfig, ExecutorsConfig, FaultsConfig, HEConfig, LoraConfig, ModelConfig,
                           PartitionConfig, PPLRConfig, PrivacyConfig, SampleDPConfig, SecAggConfig, StorageConfig,
                           StrategyConfig, SyntheticConfig, TrackingConfig, TrainConfig, _build, _check,
                           apply_overrides, clients_per_round, count_of, flatten, parse_override, read_yaml_mapping,
                           save_config, set_key, to_dict, validate)
from fedsim.schema import config_from_dict as _checked_values
from fedsim.server.strategy import STRATEGIES

PRIVACY = (("sample_dp", TRAINERS["sample_dp"]), ("client_dp", ClientDP), ("dp_lora", DPLoRA), ("secagg", SecAgg),
           ("he", HEAggregation))


def components(cfg: Config) -> list[tuple[str, object, type]]:
    """(config key, value, class) of every component the config enables."""
    out = [("strategy.lora_mode", cfg.strategy.lora_mode, ADAPTERS[cfg.strategy.lora_mode]),
           ("strategy.name", cfg.strategy.name, STRATEGIES[cfg.strategy.name])]
    if cfg.model.personal.bank:
        out.append(("model.personal.bank", cfg.model.personal.bank, Personal))
        if cfg.model.personal.share_router:
            out.append(("model.personal.share_router", True, SharedRouter))
    if cfg.storage.mode in STORAGE:
        out.append(("storage.mode", cfg.storage.mode, STORAGE[cfg.storage.mode]))
    if cfg.executors.fused:
        out.append(("executors.fused", True, TRAINERS["fused"]))
    if cfg.executors.compile:
        out.append(("executors.compile", True, Compiled))
    for name, cls in PRIVACY:
        if getattr(cfg.privacy, name).enabled:
            out.append((f"privacy.{name}.enabled", True, cls))
    return out


def check_compatible(cfg: Config) -> Config:
    found = conflicts(components(cfg))
    if found:
        raise ConfigError(found[0])
    return cfg


def config_from_dict(data: dict) -> Config:
    return check_compatible(_checked_values(data))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))
