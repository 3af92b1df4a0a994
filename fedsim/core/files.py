"""Files a run cannot afford to lose: written atomically, read with a named error.

A checkpoint or a client's store entry is written to a temporary file in the same directory,
flushed to the disk (fsync) and renamed over the old one, so a write that fails half-way (a full
disk, a read-only `output_dir`, the process killed) leaves the previous version whole and loadable.
A file that is truncated or corrupted anyway (a copy cut short, a bad disk) is a `StateFileError`
naming the file and what to do, not a traceback from deep inside torch's unpickler.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class StateFileError(RuntimeError):
    """A checkpoint or store file that cannot be read; the message names it and what to do."""


def fsync_dir(path: Path) -> None:
    # The rename itself lives in the directory: sync it too, or a power cut can undo it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(file object)` into a temporary file next to `path`, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_parquet(df, path: Path) -> Path:
    """A DataFrame (a run's predictions, audit, shard assignment) written atomically."""
    atomic_write(path, lambda f: df.to_parquet(f, index=False))
    return Path(path)


def load_torch(path: Path, what: str, fix: str):
    """torch.load of a file we wrote; a truncated or corrupted one is a StateFileError that names
    `what` (e.g. "checkpoint"), the file and `fix` (what the user can do about it)."""
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, UnpicklingError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateFileError(f"{what} {path} is truncated or corrupted ({reason}); {fix}") from None
