"""The client side's implementations, in one explicit registry each (the interfaces: `base`).

Adapters (which parameters are shared / local / frozen; load, store, export, forward), chosen by
`storage.mode` and `strategy.lora_mode`; trainers (how a batch is formed and a step taken), chosen
by `privacy.sample_dp` for one client at a time and `Fused` for several at once.
"""
from __future__ import annotations

from fedsim.client.trainers.base import Adapter, LocalRun, Trainer, batch_stream, local_loop  # noqa: F401
from fedsim.client.trainers.fedsa import FedSA
from fedsim.client.trainers.ffa import FFA
from fedsim.client.trainers.fused import Fused
from fedsim.client.trainers.personal import Personal
from fedsim.client.trainers.plain import Plain
from fedsim.client.trainers.sample_dp import SampleDPTrainer
from fedsim.client.trainers.separate import Separate
from fedsim.client.trainers.split import Split
from fedsim.client.trainers.stack import Stack
from fedsim.core.registry import Registry

ADAPTERS = Registry("strategy.lora_mode", [Separate, FFA, FedSA, Stack])
STORAGE = Registry("storage.mode", [Split])  # storage modes that own the adapter's layout
TRAINERS = Registry("trainer", [Plain, SampleDPTrainer, Fused])


def adapter_class(cfg) -> type[Adapter]:
    # RecLoRA's bank owns the layout too; its factors take the LoRA mode's roles.
    return STORAGE.get(cfg.storage.mode) or (Personal if cfg.model.personal.bank else ADAPTERS[cfg.strategy.lora_mode])


def trainer_class(cfg) -> type[Trainer]:
    """The trainer for one client at a time (`train`); `train_many` always runs `Fused`."""
    return TRAINERS["sample_dp" if cfg.privacy.sample_dp.enabled else "plain"]
