"""Checkpoints and client-store entries: atomic writes, named errors for damaged files, a format
version, and a `--resume` that refuses a changed config unless told."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedsim.cli import main
from fedsim.config import ConfigError, load_config, save_config, to_dict
from fedsim.core.files import StateFileError, save_torch
from fedsim.core.store import ClientStore
from fedsim.simulation import load_checkpoint, resume_config, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class DiskFull:
    """Pickling it fails the way a full disk fails a write: after part of the file is out."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def run_dir_with_checkpoint(tmp_path, *overrides) -> Path:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path}", *overrides])
    run_dir = tmp_path / "tiny-run"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_checkpoint(run_dir, {"round": 0, "config": to_dict(cfg), "history": [{"round": 0, "auc": 0.6}]})
    return run_dir


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    run_dir = run_dir_with_checkpoint(tmp_path)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(run_dir, {"round": 1, "strategy": torch.zeros(10_000), "oops": DiskFull()})
    assert load_checkpoint(run_dir)["round"] == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.yaml"]  # no temporary file left


def test_a_truncated_checkpoint_is_a_named_error_with_what_to_do(tmp_path, capsys):
    run_dir = run_dir_with_checkpoint(tmp_path)
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StateFileError, match=rf"checkpoint {path} is truncated or corrupted .*; restore it from a "
                                             rf"copy of the run directory, or delete it"):
        load_checkpoint(run_dir)
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedsim: error: checkpoint {path} is truncated") and "\n" not in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "old format"])
def test_a_damaged_store_entry_names_the_client_and_the_file(tmp_path, damage):
    store = ClientStore(tmp_path / "client_state")
    store.save(3, 0, {"local": torch.arange(1000.0)})
    assert torch.equal(store.load(3, 1)["local"], torch.arange(1000.0))
    path = store.client_dir(3) / "r0.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
        message = rf"client 3's store entry {path} is truncated or corrupted .*; delete that file and resume"
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 20)
        message = rf"client 3's store entry {path} is truncated or corrupted"
    else:
        save_torch({"format": 1, "local": torch.zeros(3)}, path)
        message = rf"client 3's store entry {path} has format 1, this fedsim reads format 2"
    with pytest.raises(StateFileError, match=message):
        store.load(3, 1)


def test_resume_refuses_an_edited_config_or_set_naming_the_keys(tmp_path, capsys):
    run_dir = run_dir_with_checkpoint(tmp_path)
    assert main(["run", "--resume", str(run_dir), "--set", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedsim: error: --resume {run_dir}: the config differs from the one the run was trained with: "
                   f"train.lr (0.005 -> 0.1); undo the change, or add --force to continue with it")
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    data["train"]["rounds"], data["clients"]["per_round"] = 4, 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"clients\.per_round \(1\.0 -> 2\), train\.rounds \(2 -> 4\); undo"):
        resume_config(run_dir, [])
    # --force continues with the change and records it as the run's config.
    cfg = resume_config(run_dir, ["train.lr=0.1"], force=True)
    assert (cfg.train.rounds, cfg.train.lr) == (4, 0.1)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.1
    # The same config as the checkpoint's is no change at all.
    plain = run_dir_with_checkpoint(tmp_path / "b")
    assert resume_config(plain, ["train.lr=0.005"]).train.lr == 0.005


def test_a_store_entry_damaged_between_runs_stops_the_resumed_run_naming_it(ray_local, tiny_cfg):
    """Read inside an executor actor: the run stops with the named error (it does not drop the
    client round after round), and the CLI prints it as one line."""
    from fedsim.simulation import Simulation, run

    sim = Simulation(tiny_cfg("tracking.enabled=false", "executors.num=1"), log=lambda *a: None)
    sim.run(stop_after=1)
    entry = sim.run_dir / "client_state" / "client_00000" / "r0.pt"
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.raises(StateFileError, match=rf"client 0's store entry {entry} is truncated or corrupted .*; "
                                             rf"delete that file and resume"):
        run(run_dir=sim.run_dir, log=lambda *a: None)
    assert load_checkpoint(sim.run_dir)["round"] == 0  # the checkpoint is untouched
