"""Where named built-in checkpoints live, created on first use (`--model tiny`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BUILTIN = ("tiny", "small")


def cache_root() -> Path:
    return Path(os.environ.get("ZAYASERVE_HOME", Path.home() / ".cache" / "zayaserve"))


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A folder path as given, or a built-in preset name written (once) under the cache root."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if name in BUILTIN:
        target = cache_root() / "checkpoints" / name
        if not (target / "config.json").is_file():
            from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint

            # Write aside and rename, so concurrent first uses never see half a checkpoint.
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            init_checkpoint(tmp, preset=name, seed=0)
            try:
                tmp.rename(target)
            except OSError:  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    raise FileNotFoundError(f"model: {name!r} is neither a checkpoint folder nor one of the "
                            f"built-in models {list(BUILTIN)}")
