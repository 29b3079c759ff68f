"""A plan on disk: the serialized engine and its JSON sidecar (``model.plan.json``: the ranges it was built for, the
profile, the TensorRT version, whether it needs the plugin), both written atomically so that an interrupted build
never leaves a truncated file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

METADATA_SUFFIX = ".json"
METADATA_FORMAT = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def plan_metadata_path(plan_path: str | os.PathLike) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return Path(str(plan_path) + METADATA_SUFFIX)


def read_plan_metadata(plan_path: str | os.PathLike) -> dict:
    """The sidecar of a plan as a dict ({} when it is missing or unreadable: the engine then works without it)."""
    p = plan_metadata_path(plan_path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
