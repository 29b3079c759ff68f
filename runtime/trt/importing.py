"""``import tensorrt`` for the whole project (build, engine, plugins, ``doctor``), and the process's TensorRT logger.

:func:`import_tensorrt` is the only place that imports the module. It raises :class:`TensorRTUnavailable` -- an
``ImportError`` with a one-line message naming the problem and the fix -- when the package is missing, broken (its
CUDA libraries do not load) or older than :data:`MIN_TENSORRT` (the ``tensorrt`` extra pins ``>= 10.3``; the code
uses the TensorRT 10 API only).
"""
from __future__ import annotations

import os
import sys
import threading

MIN_TENSORRT = (10, 3)
INSTALL_FIX = ("pip install 'rocket-deploy[tensorrt]' (tensorrt>=10.3,<12; x86-64 Linux / Windows); on Jetson, "
               "JetPack 6 ships TensorRT 10.3: sudo apt install python3-libnvinfer and create the venv with "
               "--system-site-packages")
UPGRADE_FIX = "pip install -U 'tensorrt>=10.3,<12' (Jetson: JetPack 6)"


class TensorRTUnavailable(ImportError):
    """TensorRT cannot be used here: ``reason`` says why, ``fix`` what to run; ``str()`` is one line with both."""

    def __init__(self, reason: str, fix: str):
        self.reason, self.fix = reason, fix
        super().__init__(f"{reason}; {fix}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0, 43)``; the numeric prefix of each part (``"10.3.0a"`` -> ``(10, 3, 0)``)."""
    out = []
    for part in str(version).split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` (missing, broken, or older than 10.3)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 -- lazy on purpose: nothing else needs it
    except ImportError as e:  # includes a None entry in sys.modules
        raise TensorRTUnavailable(f"TensorRT is not installed (import tensorrt: {_one_line(e)})", INSTALL_FIX) from e
    except Exception as e:  # noqa: BLE001 -- a broken install raises OSError (missing libnvinfer / CUDA) and others
        raise TensorRTUnavailable(f"TensorRT is installed but does not import ({type(e).__name__}: {_one_line(e)})",
                                  f"reinstall it matching this machine's CUDA: {INSTALL_FIX}") from e
    version = str(getattr(trt, "__version__", ""))
    if version_tuple(version)[:2] < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        raise TensorRTUnavailable(f"TensorRT {version or '(unknown version)'} is too old: rocket-deploy needs "
                                  f">= {need}", UPGRADE_FIX)
    return trt


# ---- the logger ---------------------------------------------------------------------------------------------------
_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def get_logger(trt, verbose: bool = False):
    """One TensorRT logger per process (TensorRT warns when builders / runtimes get different ones). It forwards
    messages at WARNING and above (INFO and above when ``verbose``; VERBOSE too with ``$ROCKET_TRT_VERBOSE``) to
    stderr and keeps the recent errors so that a failed build or deserialization can quote them."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            class _RecordingLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.verbose = False
                    self.errors: list[str] = []

                def log(self, severity, msg):
                    sev = getattr(severity, "name", str(severity)).split(".")[-1]
                    if sev in ("INTERNAL_ERROR", "ERROR"):
                        self.errors.append(str(msg))
                        del self.errors[:-20]
                    if sev in ("INTERNAL_ERROR", "ERROR", "WARNING") or (self.verbose and sev == "INFO") \
                            or (self.verbose and os.environ.get("ROCKET_TRT_VERBOSE") and sev == "VERBOSE"):
                        print(f"[TensorRT {sev}] {msg}", file=sys.stderr, flush=True)

            _LOGGER = _RecordingLogger()
        _LOGGER.verbose = bool(verbose)
        return _LOGGER


def recent_errors(logger) -> str:
    """The last errors the logger recorded, as a block to append to an error message ("" when none)."""
    errs = list(getattr(logger, "errors", []))
    return ("\nTensorRT said:\n  " + "\n  ".join(errs[-8:])) if errs else ""


def clear_errors(logger) -> None:
    if hasattr(logger, "errors"):
        logger.errors.clear()
