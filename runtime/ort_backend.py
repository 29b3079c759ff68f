"""ONNX Runtime backend: runs an exported ``model.onnx`` (decoder with KV cache, or encoder) behind :class:`Engine`.

Providers are chosen automatically (CUDA when ``onnxruntime-gpu`` offers it, then CPU) unless given. The KV cache is
numpy: each call's ``present.*`` outputs become the next call's ``past_key_values.*`` inputs.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np

from rocket_deploy import onnx_contract as C
from rocket_deploy.onnx_contract import PAST_RE as _PAST_RE
from rocket_deploy.onnx_contract import onnx_file_bytes

from .engine import Engine, context_from_config

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def default_providers() -> list[str]:
    import onnxruntime as ort
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or list(avail)


def onnx_model_bytes(path: str) -> int:
    """The .onnx file plus its external data files."""
    return onnx_file_bytes(path)


class OrtEngine(Engine):
    backend = "ort"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
                 tokenizer=None, optimization: str = "all", load_tokenizer: bool = True):
        import onnxruntime as ort
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no ONNX model at {self.path!r}; export one with `rocket-deploy export`")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.providers = list(providers) if providers else default_providers()
        from .ort_custom_ops import OrtOpsUnavailable, graph_uses_op, register
        if graph_uses_op(self.path):                # trt / ort-packed graph: the custom-op CPU library
            try:
                register(so)
            except OrtOpsUnavailable as e:
                raise RuntimeError(str(e)) from None
        self.session = ort.InferenceSession(self.path, so, providers=self.providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = sorted((n for n in self.inputs if _PAST_RE.match(n)),
                                 key=lambda n: (int(_PAST_RE.match(n).group(1)), _PAST_RE.match(n).group(2) != "key"))
        self.is_decoder = C.LOGITS in self.output_names
        if self.is_decoder:
            self.present_names = [C.present_for_past(n) for n in self.past_names]
            missing = [n for n in self.present_names if n not in self.output_names]
            if missing:
                raise ValueError(f"{self.path}: outputs {missing[:2]} are missing; is this a rocket-deploy export?")
            first = self.inputs[self.past_names[0]] if self.past_names else None
            self.kv_dtype = _ORT_TYPES.get(first.type, np.float32) if first else np.float32
            self.kv_shape = tuple(first.shape) if first else ()
        elif C.LAST_HIDDEN_STATE not in self.output_names:
            raise ValueError(f"{self.path}: neither 'logits' nor 'last_hidden_state' is an output")
        folder = os.path.dirname(os.path.abspath(self.path))
        self.max_context = _config_context(folder) if self.is_decoder else None
        self.tokenizer = tokenizer
        if tokenizer is None and load_tokenizer:
            self.tokenizer = _load_tokenizer(os.path.dirname(os.path.abspath(self.path)))

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        _, heads, _, hd = self.kv_shape
        return {n: np.zeros((batch, heads, 0, hd), dtype=self.kv_dtype) for n in self.past_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None):
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if not self.is_decoder:
            feeds = {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask}
            if C.TOKEN_TYPE_IDS in self.inputs:
                feeds[C.TOKEN_TYPE_IDS] = np.zeros_like(ids)
            return self.session.run([C.LAST_HIDDEN_STATE], feeds)[0].astype(np.float32, copy=False), None
        feeds = {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask}
        if C.POSITION_IDS in self.inputs:
            pos = np.cumsum(mask, axis=1) - 1
            pos = np.where(mask == 0, 1, pos)[:, -ids.shape[1]:]
            feeds[C.POSITION_IDS] = np.ascontiguousarray(pos, dtype=np.int64)
        feeds.update(self._empty_past(ids.shape[0]) if past is None else dict(zip(self.past_names, past)))
        outs = self.session.run([C.LOGITS, *self.present_names], feeds)
        return outs[0].astype(np.float32, copy=False), outs[1:]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def model_bytes(self) -> int:
        return onnx_model_bytes(self.path)

    def close(self) -> None:
        self.session = None


def _config_context(directory: str) -> int | None:
    """The model's maximum positions from the ``config.json`` export writes next to the graph (None without)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return context_from_config(json.load(f))
    except (OSError, ValueError):
        return None


def _load_tokenizer(directory: str):
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception:  # noqa: BLE001 -- a missing / unreadable tokenizer only disables text prompts
        return None
