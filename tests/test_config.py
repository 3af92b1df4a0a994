import pytest

from fedsim.cli import main
from fedsim.config import ConfigError, flatten, load_config, to_dict


def test_defaults_and_quickstart_load():
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.model.name == "smollm2-135m" and cfg.clients.num == 4
    assert load_config("configs/tiny.yaml").model.name == "tiny-random"
    flat = flatten(to_dict(cfg))
    assert flat["train.lr"] == 0.002 and flat["model.lora.r"] == 8 and flat["data.protocol"] == "tallrec"
    assert flat["train.schedule"] == "cosine" and flat["data.max_eval_rows"] >= 500


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_config("configs/tiny.yaml", ["train.lrr=0.1"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", r"train\.lr: expected a number, got 'fast'"),
    ("train.rounds=0", r"train\.rounds: 0 must be >= 1"),
    ("clients.per_round=9", r"clients\.per_round: 9 as a count must be in \[1, clients\.num=3\]"),
    ("clients.per_round=1.5", r"clients\.per_round: 1\.5 as a fraction must be in \(0, 1\]"),
    ("partition.method=random", r"partition\.method: 'random' is not one of 'iid', 'dirichlet', 'kmeans'"),
    ("data.split=[0.5,0.5,0.5]", r"data\.split: .* summing to 1"),
    ("model.lora.dropout=1.0", r"model\.lora\.dropout: 1\.0 must be in \[0, 1\)"),
    ("faults.quorum=0", r"faults\.quorum: 0\.0 must be in \(0, 1\]"),
    ("executors.num_gpus=2", r"executors\.num_gpus"),
    ("train.local_epochs=1", r"set exactly one of train\.local_steps and train\.local_epochs"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_overrides_parse_yaml_values():
    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-3", "clients.per_round=2",
                                            "model.lora.target_modules=[q_proj,k_proj]", "tracking.enabled=false"])
    assert cfg.train.lr == 0.001 and cfg.clients.per_round == 2
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"] and cfg.tracking.enabled is False


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["run", "configs/tiny.yaml", "--set", "train.batchsize=4"]) == 2
    assert "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert main(["run", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
