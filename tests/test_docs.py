"""The docs cannot drift from the code: the generated config reference, and the commands shown in
README.md and docs/ (the shell blocks marked `<!-- check -->` are run)."""
from pathlib import Path

import yaml

from fedsim.cli import main
from fedsim.reference import REGENERATE, missing_help, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_has_help():
    missing = missing_help()
    assert not missing, (f"config keys without a help comment in fedsim/schema.py: {', '.join(missing)}; "
                         f"add a `# ...` line above each field, then run `{REGENERATE}`")


def test_configuration_reference_is_current():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference_markdown(), f"docs/configuration.md is out of date: run `{REGENERATE}`"


def test_reference_lists_every_key_with_default_and_help():
    from fedsim.config import flatten, to_dict
    from fedsim.schema import Config

    text = reference_markdown()
    for key in flatten(to_dict(Config())):
        assert f"| `{key}` |" in text, key
    assert "| `train.lr` | `float` | `0.001` | Local learning rate (AdamW). |" in text
    assert "| `data.split` | `list[float]` | `[0.8, 0.1, 0.1]` |" in text


def test_config_show_prints_resolved_config_with_defaults(capsys, tmp_path):
    assert main(["config", "show", "configs/tiny.yaml", "--set", "train.lr=0.01"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.01 and shown["train"]["rounds"] == 2  # --set, then the file
    assert shown["train"]["schedule"] == "constant" and shown["privacy"]["secagg"]["bits"] == 48  # defaults
    assert main(["config", "show", "configs/tiny.yaml", "--set", "train.lrr=0.01"]) == 2
    assert "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in capsys.readouterr().err
    out = tmp_path / "ref.md"
    assert main(["config", "reference", "--output", str(out)]) == 0
    assert out.read_text() == reference_markdown()
