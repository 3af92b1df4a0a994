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


def checked_blocks() -> list[tuple[str, str]]:
    """(file, script) of every ```bash block in README.md and docs/*.md whose opening fence follows a
    `<!-- check -->` line."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() == "<!-- check -->":
                assert lines[i + 1].strip() == "```bash", f"{path.name}:{i + 2}: <!-- check --> must sit right above a ```bash fence"
                end = lines.index("```", i + 2)
                out.append((f"{path.name}:{i + 3}", "\n".join(lines[i + 2:end])))
    return out


def test_marked_shell_blocks_in_the_docs_run(tmp_path):
    import os
    import subprocess
    import sys

    blocks = checked_blocks()
    assert {where.split(":")[0] for where, _ in blocks} >= {"README.md", "usage.md"}
    # `fedsim` as the installed console script would be, running this checkout's code.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fedsim").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedsim.cli "$@"\n')
    (bin_dir / "fedsim").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "FEDSIM_HOME": os.environ.get("FEDSIM_HOME", str(Path.home() / ".cache/fedsim"))}
    for where, script in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{where}: the marked block failed:\n{script}\n{done.stderr[-2000:]}"
        assert done.stdout.strip(), f"{where}: the marked block printed nothing"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_docs_point_at_files_and_headings():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, frag = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to {target!r}: {path} does not exist"
            if frag and path.suffix == ".md":
                heads = {anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
                assert frag in heads, f"{page.name}: link to {target!r}: no such heading in {path.name}"
