"""The pinned install (constraints.txt) that the README's commands and .ci/run use."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+", name) and re.fullmatch(r"[\w.]+", version), line
            out[name.lower().replace("_", "-")] = version
    return out


def test_every_package_is_pinned_and_torch_has_no_local_tag():
    p = pins()
    assert p["torch"] == "2.13.0"  # the README installs torch==2.13.0 from the package index
    for name in ("ray", "transformers", "peft", "mlflow", "opacus", "pyarrow", "pandas", "numpy", "pytest"):
        assert name in p, name
    # The clusters' Ray is the pinned one (they install ray[default,tune]==<version> on the nodes).
    setup = " ".join(yaml.safe_load((ROOT / "clusters" / "cluster.yaml").read_text())["setup_commands"])
    assert f"ray[default,tune]=={p['ray']}" in setup


def test_readme_and_ci_install_with_the_constraints_into_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv --clear .venv" in ci and '-e ".[test]" -c constraints.txt' in ci
    readme = (ROOT / "README.md").read_text()
    assert readme.count("pip install torch==2.13.0 -e \".[all]\" -c constraints.txt") == 1
    assert readme.count("pip install torch==2.13.0 -e \".[test]\" -c constraints.txt") == 1
