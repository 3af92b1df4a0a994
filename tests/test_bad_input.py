"""Bad input tried as a new user would: each is one line on stderr naming the problem, exit code 2,
before Ray starts, leaving no run directory and no MLflow run behind."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim.simulation
from fedsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
DP = ["privacy.client_dp.enabled=true", "privacy.client_dp.epsilon=1"]


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


# (what the user tried, the arguments after `fedsim run` ({tmp}: the test's directory), the message)
TRIES = [
    ("malformed YAML", ["{tmp}/bad.yaml"], r"config file '.*bad\.yaml' is not valid YAML at line 2, column 1: "
                                           r"expected ',' or '\]', but got '<stream end>'"),
    ("a list at the top level", ["{tmp}/list.yaml"], r"config file '.*list\.yaml' must hold a mapping \(key: value "
                                                     r"lines\) at the top level, not a list"),
    ("an empty config file", ["{tmp}/empty.yaml"], r"config file '.*empty\.yaml' is empty; start from one in configs/"),
    ("a config file that does not exist", ["{tmp}/nope.yaml"], r"config file '.*nope\.yaml' does not exist"),
    ("negative rounds", [TINY, *sets("train.rounds=-1")], r"train\.rounds: -1 must be >= 1"),
    ("non-integer rounds", [TINY, *sets("train.rounds=2.5")], r"train\.rounds: expected an integer, got 2\.5"),
    ("lr 0", [TINY, *sets("train.lr=0")], r"train\.lr: 0(\.0)? must be > 0"),
    ("epsilon < 0", [TINY, *sets(DP[0], "privacy.client_dp.epsilon=-1")],
     r"privacy\.client_dp\.epsilon: -1(\.0)? must be > 0"),
    ("delta = 2", [TINY, *sets(*DP, "privacy.client_dp.delta=2")],
     r"privacy\.client_dp\.delta: 2(\.0)? must be in \(0, 1\)"),
    ("0 clients", [TINY, *sets("clients.num=0")], r"clients\.num: 0 must be >= 1"),
    ("unknown partition method", [TINY, *sets("partition.method=random")],
     r"partition\.method: 'random' is not one of 'iid', 'dirichlet', 'kmeans'"),
    ("unknown dataset", [TINY, *sets("data.dataset=netflix")], r"data\.dataset: 'netflix' is not one of"),
    ("per_round 1.5", [TINY, *sets("clients.per_round=1.5")],
     r"clients\.per_round: 1\.5 as a fraction must be in \(0, 1\]"),
    ("batch 0", [TINY, *sets("train.batch_size=0")], r"train\.batch_size: 0 must be >= 1"),
    ("a misspelt key", [TINY, *sets("train.batchsize=4")],
     r"unknown config key 'train\.batchsize' \(did you mean 'train\.batch_size'\?\)"),
    ("--set without =", [TINY, *sets("train.rounds")], r"--set 'train\.rounds': expected key=value"),
    ("--resume a directory that does not exist", ["--resume", "/no/such/dir"],
     r"--resume /no/such/dir: no such directory"),
    ("--resume a directory that is not a run", ["--resume", "{tmp}"], r"--resume .*: no config\.yaml there"),
    ("--resume with a CONFIG too", [TINY, "--resume", "{tmp}"], r"--resume continues a run with its saved config"),
    ("--force without --resume", [TINY, "--force"], r"--force goes with --resume"),
    ("a model path that does not exist", [TINY, *sets("model.name=/no/such/path")],
     r"model\.name: '/no/such/path' is a local path that does not exist"),
    # Needs the model's module names: found while preparing, still before any actor.
    ("a LoRA target the model does not have", [TINY, *sets("model.lora.target_modules=[nope_proj]")],
     r"model\.lora\.target_modules: \['nope_proj'\] not among the layers of model\.name 'tiny-random': "
     r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("an unreachable privacy target", [TINY, *sets(DP[0], "privacy.client_dp.epsilon=0.01")],
     r"privacy\.client_dp\.epsilon: 0\.01 cannot be reached with delta=1e-05"),
    ("more clients than users", [TINY, *sets("clients.num=500")],
     r"clients\.num=500 must be between 1 and the number of users \(60\)"),
]


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- train\n- rounds\n")
    (tmp_path / "empty.yaml").write_text("# nothing set yet\n")
    return tmp_path


@pytest.mark.parametrize("what, args, message", TRIES, ids=[t[0] for t in TRIES])
def test_bad_input_is_one_line_before_ray_and_leaves_nothing(what, args, message, user_files, capsys, monkeypatch):
    tmp = user_files
    started = []
    monkeypatch.setattr(fedsim.simulation, "init_ray", lambda *a, **k: started.append(1))
    monkeypatch.chdir(tmp)  # runs/ and mlflow.db would land here by default
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    extra = [] if "--resume" in args else sets(f"output_dir={tmp / 'runs'}")
    code = main(["run", *args, *extra, "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    # Progress lines of the preparation may come first (the LoRA-target check needs the model built).
    lines = [x for x in err.strip().splitlines() if x.startswith("fedsim: error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not started, "Ray was started"
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir()), "a run directory was left behind"
    assert not (tmp / "mlflow.db").exists(), "an MLflow store was written"


@pytest.mark.parametrize("args, message", [
    (["{tmp}/bad.yaml"], "is not valid YAML at line 2, column 1"),
    (["--resume", "/no/such/dir"], "--resume /no/such/dir: no such directory"),
])
def test_the_real_cli_prints_one_line_and_exits_2(args, message, user_files):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", *[a.replace("{tmp}", str(user_files)) for a in args]],
                       capture_output=True, text=True, env=env, cwd=user_files, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"fedsim: error: {p.stderr.strip()[len('fedsim: error: '):]}"]
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (user_files / "runs").exists() and not (user_files / "mlflow.db").exists()


def test_an_error_mid_run_keeps_its_traceback(monkeypatch, tmp_path):
    """Only configuration errors are one line: a ValueError from inside a round (a bug, a crash)
    reaches the user whole, not as 'fedsim: error: ...' without its traceback."""
    def crash(self, stop_after=None):
        raise ValueError("adapter vector has 10 entries, the model's LoRA has 12")

    monkeypatch.setattr(fedsim.simulation.Simulation, "run", crash)
    with pytest.raises(ValueError, match="adapter vector has 10 entries"):
        main(["run", TINY, *sets(f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false")])
