"""Writing output directories without losing anything: what ``--overwrite`` may replace, an atomic and
recoverable swap, and SIGTERM handled like Ctrl-C.

* :func:`check_output` -- before any work: ``--out`` may be replaced only when it is empty or recognisably ours
  (an artifact holds ``rocket.json``, an export ``export.json``, a Triton model folder ``.rocket-deploy-triton``),
  never when it is, or contains, the input model or the working directory; its parent must be writable.
* :func:`atomic_directory` -- the output is written into a ``.tmp-<name>-*`` sibling; the swap
  ``out -> .old-<name>-*``, ``tmp -> out`` is recorded in a journal ``.<name>.rocket-swap.json`` beside it, so a
  run killed in between is finished (or rolled back) by :func:`recover_swap` on the next write or load.
* :func:`sigterm_as_interrupt` -- SIGTERM raises KeyboardInterrupt, so the cleanup that runs on Ctrl-C (temporary
  output and profile directories removed) runs on SIGTERM too.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
import threading

# what marks a directory as written by rocket-deploy, per kind of output
MARKERS = {"artifact": "rocket.json", "export": "export.json", "triton": ".rocket-deploy-triton"}
TRITON_MARKER = MARKERS["triton"]


class OutputError(FileExistsError):
    """The output path cannot be written or replaced safely; the message names the path, its content and the fix."""


def _journal(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.rocket-swap.json")


def _describe(path: str, limit: int = 4) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"unreadable ({e.strerror})"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return f"it holds {shown}"


def _is_within(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or lies below it (both absolute, real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output(out: str, overwrite: bool = False, kind: str = "artifact", inputs=()) -> str:
    """Raise :class:`OutputError` unless ``out`` can be written (and, when it exists and ``overwrite``, replaced);
    returns the absolute path. ``kind`` is ``artifact``, ``export`` or ``triton``; ``inputs`` are paths the run
    reads (the source model), which ``out`` may never be nor contain. Call it before doing the work."""
    if kind not in MARKERS:
        raise ValueError(f"kind must be one of {sorted(MARKERS)}, got {kind!r}")
    absout = os.path.abspath(out)
    recover_swap(absout)
    real = os.path.realpath(absout)
    if os.path.lexists(absout):
        if not overwrite:
            raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
        guarded = [("the current directory", os.getcwd())] + [("the input", p) for p in inputs if p]
        for what, p in guarded:
            rp = os.path.realpath(p)
            if _is_within(rp, real):
                rel = "is" if rp == real else "contains"
                raise OutputError(f"refusing to overwrite {out}: it {rel} {what} ({rp}); choose another --out")
        if not os.path.isdir(real):
            raise OutputError(f"refusing to overwrite {out}: it is a file, not a rocket-deploy {kind}; "
                              f"choose another --out or remove it yourself")
        marker = MARKERS[kind]
        if os.listdir(real) and not os.path.isfile(os.path.join(real, marker)):
            raise OutputError(f"refusing to overwrite {out}: it is not a rocket-deploy {kind} (no {marker}; "
                              f"{_describe(real)}); choose another --out or remove it yourself")
    parent = _nearest_existing(os.path.dirname(real))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not a writable directory; choose another --out")
    return absout


def recover_swap(out: str) -> str | None:
    """Finish a swap into ``out`` that a killed run left half done (see the module docstring). Returns what was
    done (``"finished"``, ``"rolled back"``) or None when there was nothing to recover."""
    out = os.path.abspath(out)
    jpath = _journal(out)
    if not os.path.isfile(jpath):
        return None
    try:
        with open(jpath) as f:
            j = json.load(f)
        new, old = j["new"], j.get("old")
    except (OSError, ValueError, KeyError, TypeError):
        return None     # not ours to act on: leave it
    parent = os.path.dirname(out)
    new, old = os.path.join(parent, new), os.path.join(parent, old) if old else None
    action = "finished"
    if os.path.isdir(new):                  # the journal is written only once the new output is complete
        if os.path.lexists(out) and old and not os.path.lexists(old):
            os.replace(out, old)
        if not os.path.lexists(out):
            os.replace(new, out)
    elif not os.path.lexists(out) and old and os.path.isdir(old):
        os.replace(old, out)
        action = "rolled back"
    if old and os.path.isdir(old) and os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(new) and os.path.exists(out):
        shutil.rmtree(new, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(jpath)
    return action


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False, kind: str = "artifact", inputs=(),
                     marker: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on failure (any exception,
    Ctrl-C, SIGTERM under :func:`sigterm_as_interrupt`) it is removed. :func:`check_output` runs first.
    ``marker``: write the kind's marker file (Triton folders; artifacts and exports carry their own manifest)."""
    out_dir = check_output(out_dir, overwrite, kind, inputs)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        yield tmp
        if marker:
            with open(os.path.join(tmp, MARKERS[kind]), "w") as f:
                f.write(f"written by rocket-deploy ({kind}); `--overwrite` may replace this folder\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    jpath = _journal(out_dir)
    try:
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            os.rmdir(old)
        with open(jpath + ".tmp", "w") as f:
            json.dump({"out": name, "new": os.path.basename(tmp), "old": old and os.path.basename(old)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(jpath + ".tmp", jpath)
        _fsync_dir(parent)
        if old:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        recover_swap(out_dir)       # interrupted mid-swap in this process: finish it now
        raise
    finally:
        with contextlib.suppress(OSError):
            os.remove(jpath + ".tmp")
    with contextlib.suppress(OSError):
        os.remove(jpath)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def stray_temporaries(out_dir: str) -> list[str]:
    """``.tmp-<name>-*`` / ``.old-<name>-*`` siblings of ``out_dir`` (left only by a SIGKILL or power loss)."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out_dir), glob.escape(os.path.basename(out_dir))
    return sorted(glob.glob(os.path.join(glob.escape(parent), f".tmp-{name}-*"))
                  + glob.glob(os.path.join(glob.escape(parent), f".old-{name}-*")))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (so ``finally`` / ``except
    BaseException`` cleanups run, as on Ctrl-C). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
