"""Small compatibility shims for the transformers versions we support (standard library only: importing this
module stays light, see tests/test_lean_import.py)."""
from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The keyword (and output field) under which ``model.forward`` takes and returns its KV cache.

    transformers >= 5.x names it ``cache``; ``past_key_values`` is deprecated there (a FutureWarning on the argument,
    a logged warning on the output field) but is the only name in 4.x. Only the torch-side keyword: the ONNX graph
    names (``past_key_values.{i}.key`` ...) are a separate, fixed contract.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
