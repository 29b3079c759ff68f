"""``TrtEngine``: a serialized TensorRT plan behind the backend-neutral :class:`~rocket_deploy.runtime.engine.Engine`,
with its KV cache (:class:`TrtKVCache`) kept on the GPU between calls.

Inputs and outputs are torch CUDA tensors bound by address (``set_tensor_address``), shapes with
``set_input_shape``; the engine runs with ``execute_async_v3`` on torch's current stream. ``position_ids`` come from
the attention mask, so left padding works; the ``present.*`` outputs become the next call's ``past_key_values.*``
(names and patterns from :mod:`rocket_deploy.onnx_contract`). The plan's sidecar gives the maximum context to enforce
and the TensorRT version to explain a failed deserialization.

Decode steps run under CUDA graphs (``cuda_graphs``, default on; :mod:`rocket_deploy.runtime.cuda_graphs`). A graph
replays fixed shapes on fixed addresses, but the exported graph's past grows by one token a step; so after the
prefill the KV cache moves into a *static* past of ``L`` positions (:class:`TrtStaticKV`: a power of two, doubled
when full, at most what the profile allows) whose unwritten positions the attention mask hides. Each decode step
then has the same shapes -- ``past [b, h, L, d]``, ``attention_mask [b, L + 1]`` with the new token last, its
``position_ids`` from the mask -- and its own execution context with every tensor bound once; the captured step is
``execute_async_v3`` plus copying the new token's key / value (``present[..., L, :]``) into the past at its position.
A new ``L`` or batch is a new shape: warmed up once, captured again. Engines without ``position_ids`` or
``attention_mask`` inputs, and sliding-window models, decode as before (every step eager, the past concatenated).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rocket_deploy.onnx_contract import (ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, PAST_RE, PLUGIN_NAME,
                                         POSITION_IDS, PRESENT_RE, TOKEN_TYPE_IDS, past_for_present)

from ..cuda_graphs import SlotPool, StepGraphs, TorchGraphs
from ..engine import Engine
from .importing import clear_errors, get_logger, import_tensorrt, recent_errors
from .plan_file import read_plan_metadata
from .plugins import PLUGIN_BUILD_COMMAND, PLUGIN_ENV, find_plugin_library, load_plugins
from .profiles import ProfileShape, Shape, check_profile_shapes


def position_ids_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last ``seq`` tokens from a left- or right-padded mask ``[batch, past + seq]``
    (padding positions get 1, as transformers does)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, mask.shape[1] - seq:], dtype=np.int64)


_TRT_TO_TORCH_NAMES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn",
}


def trt_dtype_to_torch(dtype):
    """A TensorRT ``DataType`` (or its name) as a torch dtype."""
    import torch  # noqa: PLC0415
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    name = str(name).split(".")[-1].upper()
    tname = _TRT_TO_TORCH_NAMES.get(name)
    if tname is None or not hasattr(torch, tname):
        raise TypeError(f"TensorRT data type {name} has no torch equivalent here")
    return getattr(torch, tname)


@dataclasses.dataclass
class TensorInfo:
    name: str
    is_input: bool
    dtype: Any                     # torch dtype
    shape: Shape                   # from the engine; -1 for dynamic dims
    profile: ProfileShape | None   # inputs only


log = logging.getLogger("rocket_deploy.runtime.trt.engine")
MIN_STATIC_PAST = 256      # the first static past length (doubled from here)
MAX_STATIC_SLOTS = 4       # generations at once on static pasts (each with its own execution context)


@dataclasses.dataclass
class TrtKVCache:
    """The ``present`` state of :class:`TrtEngine`: device tensors keyed by the *past* input names."""
    tensors: dict
    length: int
    batch: int


class TrtStaticKV:
    """One static-past slot: an execution context with every tensor bound once at ``past`` = ``length`` for
    ``batch`` rows, its input / output buffers, and its CUDA graph (see the module doc)."""

    def __init__(self, engine: "TrtEngine", batch: int, length: int):
        torch = engine._torch
        self.batch, self.length, self.filled = batch, length, 0
        self.graph = self.graph_key = None
        self.warm = False
        dev = engine.device
        with engine._device_scope():
            self.context = engine._engine.create_execution_context()
            if self.context is None:
                raise RuntimeError(f"TensorRT could not create an execution context{recent_errors(engine._logger)}")
            self.inputs: dict = {}
            for name in engine.input_names:
                info = engine.tensors[name]
                if PAST_RE.match(name):
                    _, heads, _, head_dim = _static_kv_dims(info)
                    shape = (batch, heads, length, head_dim)
                elif name == ATTENTION_MASK:
                    shape = (batch, length + 1)
                else:
                    shape = (batch, 1)
                self.inputs[name] = torch.zeros(shape, dtype=info.dtype, device=dev)
            for name, t in self.inputs.items():
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT rejected shape {tuple(t.shape)} for {name}"
                                     f"{recent_errors(engine._logger)}")
                self.context.set_tensor_address(name, t.data_ptr())
            unresolved = self.context.infer_shapes()
            if unresolved:
                raise RuntimeError(f"TensorRT could not infer the shapes of {', '.join(unresolved)}")
            self.outputs: dict = {}
            for name in engine.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=engine.tensors[name].dtype, device=dev)
                self.outputs[name] = out
                self.context.set_tensor_address(name, out.data_ptr() if out.numel() else engine._dummy.data_ptr())
            self.col = torch.zeros(1, dtype=torch.long, device=dev)       # where the new token's key / value go
        # (past name, past buffer, present buffer) per layer and kind
        self.kv = [(past_for_present(n), self.inputs[past_for_present(n)], t) for n, t in self.outputs.items()
                   if PRESENT_RE.match(n)]
        for _, _, present in self.kv:
            if tuple(present.shape[2:3]) != (length + 1,):
                raise RuntimeError(f"present has {present.shape[2]} positions for a past of {length}: the engine "
                                   f"does not append the new token to the past")
        self.logits = self.outputs[LOGITS if LOGITS in self.outputs else engine.output_names[0]]
        self._engine = engine

    def step(self) -> None:
        """The captured step: run the engine on the bound buffers, then put the new token's key / value in place."""
        if not self.context.execute_async_v3(self._engine._stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed{recent_errors(self._engine._logger)}")
        n = self.length
        for _, past, present in self.kv:
            past.index_copy_(2, self.col, present[:, :, n:n + 1])

    def load(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """The step's inputs into the bound buffers: the mask's past at its positions, the new token last."""
        torch = self._engine._torch
        p, n = self.filled, self.length
        row = np.zeros((self.batch, n + 1), dtype=np.int64)
        row[:, :p] = mask[:, :p]
        row[:, n] = mask[:, p]
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: row, POSITION_IDS: position_ids_from_mask(mask, 1)}
        for name, value in feeds.items():
            if name in self.inputs:
                self.inputs[name].copy_(torch.from_numpy(value))
        self.col.fill_(p)

    def write_prefix(self, tensors: dict, length: int) -> None:
        """Copy a past of ``length`` positions (``{past name: [b, h, length, d]}``) into the static buffers."""
        for name, t in tensors.items():
            self.inputs[name][:, :, :length].copy_(t[:, :, :length])
        self.filled = length

    def prefix(self, copy: bool = True) -> dict:
        """The cache as the eager path takes it: ``{past name: [b, h, filled, d]}`` (contiguous copies)."""
        return {name: (past[:, :, :self.filled].contiguous() if copy else past) for name, past, _ in self.kv}

    def reset(self) -> None:
        for _, past, _ in self.kv:
            past.zero_()
        self.filled = 0

    def close(self) -> None:
        self.graph = None
        self.context = None


@dataclasses.dataclass(eq=False)
class TrtStaticState:
    """The ``present`` of a generation on a static past (:class:`TrtStaticKV`)."""
    slot: TrtStaticKV

    @property
    def length(self) -> int:
        return self.slot.filled

    @property
    def batch(self) -> int:
        return self.slot.batch

    @property
    def tensors(self) -> dict:
        """The cache as :class:`TrtKVCache` holds it: ``{past name: [b, h, length, d]}`` (copies)."""
        return self.slot.prefix()


class TrtEngine(Engine):
    """A serialized TensorRT plan behind :class:`Engine` (KV cache stays on the GPU between calls)."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str | None = None,
                 plugin_library: str | os.PathLike | None = None, tokenizer=None, verbose: bool = False,
                 cuda_graphs: bool | None = None, max_static_slots: int = MAX_STATIC_SLOTS):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no TensorRT plan at {str(self.path)!r}")
        trt = import_tensorrt()
        import torch  # noqa: PLC0415
        self._torch = torch
        self.device = self._resolve_device(device)
        self.meta = read_plan_metadata(self.path)
        self._logger = get_logger(trt, verbose)
        clear_errors(self._logger)

        self.plugin_library: Path | None = None
        plugin_error: Exception | None = None
        try:
            if plugin_library is not None or self.meta.get("uses_plugin") or find_plugin_library() is not None:
                self.plugin_library = load_plugins(trt, self._logger, plugin_library)
        except Exception as e:  # noqa: BLE001 -- only fatal if the plan needs it (reported below)
            plugin_error = e
            if self.meta.get("uses_plugin"):
                raise

        with self._device_scope():
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise RuntimeError(self._deserialize_failure(trt, plugin_error))
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} (out of GPU "
                               f"memory?){recent_errors(self._logger)}")

        self.tensors: dict[str, TensorInfo] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            prof = None
            if is_input:
                lo, op, hi = self._engine.get_tensor_profile_shape(name, 0)
                prof = ProfileShape(tuple(lo), tuple(op), tuple(hi))
            self.tensors[name] = TensorInfo(name, is_input, trt_dtype_to_torch(self._engine.get_tensor_dtype(name)),
                                            tuple(self._engine.get_tensor_shape(name)), prof)
        self.input_names = [n for n, t in self.tensors.items() if t.is_input]
        self.output_names = [n for n, t in self.tensors.items() if not t.is_input]
        self.profile = {n: self.tensors[n].profile for n in self.input_names}
        self.past_names = sorted((n for n in self.input_names if PAST_RE.match(n)), key=_layer_key)
        self.is_decoder = bool(self.past_names) or LOGITS in self.output_names
        self.max_context = self.meta.get("max_context") if self.is_decoder else None
        self._dummy = torch.empty(1, dtype=torch.uint8, device=self.device)  # address for zero-size tensors
        self.tokenizer = tokenizer if tokenizer is not None else self._find_tokenizer()
        on_cuda = self.device.type == "cuda"      # always, but for the tests' fake TensorRT on the CPU
        want = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self._static_off = self._static_problem() if want else "off"
        self.cuda_graphs = self._static_off is None
        self._slots = SlotPool(max_static_slots)
        backend = TorchGraphs(self.device) if self.cuda_graphs and on_cuda else None
        self._graphs = StepGraphs(backend, backend is not None)

    @property
    def graph_stats(self) -> dict:
        """Decode steps captured / replayed / run eagerly, and why CUDA graphs are off (None: on)."""
        return {**self._graphs.stats, "cuda_graphs": self._graphs.off_reason if self._static_off is None
                else self._static_off}

    def _static_problem(self) -> str | None:
        """Why decode cannot run on a static past with this plan (None: it can)."""
        if not self.is_decoder or not self.past_names:
            return "not a decoder with a KV cache"
        missing = [n for n in (ATTENTION_MASK, POSITION_IDS) if n not in self.input_names]
        if missing:
            return f"the engine has no {' / '.join(missing)} input (a static past needs both)"
        dirs = [self.path.parent] + ([Path(self.meta["onnx"]).parent] if self.meta.get("onnx") else [])
        for d in dirs:
            cfg = d / "config.json"
            if cfg.is_file():
                try:
                    c = json.loads(cfg.read_text())
                except (OSError, ValueError):
                    continue
                sliding = c.get("sliding_window") if c.get("use_sliding_window", True) else None
                if sliding or "sliding_attention" in (c.get("layer_types") or ()):
                    return "a sliding-window model (the static past would move the window)"
        return None

    # ---- construction helpers ---------------------------------------------------------------------------------
    def _resolve_device(self, device):
        torch = self._torch
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU visible to torch "
                               "(torch.cuda.is_available() is False); run `rocket-deploy doctor`")
        dev = torch.device(device or "cuda")
        if dev.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, got {dev}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _device_scope(self):
        return self._torch.cuda.device(self.device)

    def _stream(self):
        return self._torch.cuda.current_stream(self.device)

    def _deserialize_failure(self, trt, plugin_error) -> str:
        msg = f"TensorRT could not deserialize {self.path}."
        built = self.meta.get("tensorrt_version")
        here = str(getattr(trt, "__version__", "?"))
        if built and built != here:
            msg += (f" It was built with TensorRT {built} and this is TensorRT {here}: plans are tied to the "
                    f"TensorRT version and GPU that built them; rebuild it here with `rocket-deploy build`.")
        else:
            msg += (" Plans only load with the TensorRT version and GPU model that built them; rebuild it here with "
                    "`rocket-deploy build`.")
        if self.plugin_library is None:
            msg += (f" No plugin library was loaded: if the plan uses {PLUGIN_NAME}, build it "
                    f"({PLUGIN_BUILD_COMMAND}) or set ${PLUGIN_ENV}.")
            if plugin_error is not None:
                msg += f" (plugin load error: {plugin_error})"
        return msg + recent_errors(self._logger)

    def _find_tokenizer(self):
        dirs = [self.path.parent]
        if self.meta.get("onnx"):
            dirs.append(Path(self.meta["onnx"]).parent)
        for d in dirs:
            if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
                try:
                    from transformers import AutoTokenizer  # noqa: PLC0415
                    return AutoTokenizer.from_pretrained(str(d))
                except Exception:  # noqa: BLE001 -- generation then needs token ids
                    return None
        return None

    # ---- execution ---------------------------------------------------------------------------------------------
    def _execute(self, feeds: dict) -> dict:
        """Run the engine on device tensors ``{input name: tensor}``; returns ``{output name: tensor}``."""
        torch = self._torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing engine inputs: {', '.join(missing)} (the engine takes "
                             f"{', '.join(self.input_names)})")
        extra = [n for n in feeds if n not in self.tensors or not self.tensors[n].is_input]
        if extra:
            raise ValueError(f"unknown inputs {', '.join(extra)}; the engine takes {', '.join(self.input_names)}")
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        check_profile_shapes(shapes, self.profile, self.max_context, self.is_decoder)
        ctx = self._context
        keep = []
        with self._device_scope():
            for name in self.input_names:
                t = feeds[name].to(device=self.device, dtype=self.tensors[name].dtype).contiguous()
                keep.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT rejected shape {tuple(t.shape)} for {name}"
                                     f"{recent_errors(self._logger)}")
                ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            unresolved = ctx.infer_shapes()
            if unresolved:
                raise RuntimeError(f"TensorRT could not infer the shapes of {', '.join(unresolved)} from the inputs")
            outputs = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name} has an unresolved shape {shape} (data-dependent shapes are not "
                                       f"supported by this backend)")
                out = torch.empty(shape, dtype=self.tensors[name].dtype, device=self.device)
                outputs[name] = out
                ctx.set_tensor_address(name, out.data_ptr() if out.numel() else self._dummy.data_ptr())
            stream = self._stream()
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed{recent_errors(self._logger)}")
            stream.synchronize()
        del keep
        return outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        dev = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feeds.items()}
        outs = self._execute(dev)
        return {n: _to_numpy(t) for n, t in outs.items()}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None):
        torch = self._torch
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or mask.ndim != 2 or mask.shape[0] != ids.shape[0]:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be [batch, ...] 2-D "
                             f"arrays with the same batch")
        batch, seq = ids.shape
        # fail early, with the option to change, before anything is allocated on the GPU
        check_profile_shapes({n: s for n, s in ((INPUT_IDS, ids.shape), (ATTENTION_MASK, mask.shape))
                              if n in self.profile}, self.profile, self.max_context, self.is_decoder)
        feeds = {INPUT_IDS: torch.from_numpy(np.ascontiguousarray(ids))}
        if not self.is_decoder:
            if ATTENTION_MASK in self.input_names:
                feeds[ATTENTION_MASK] = torch.from_numpy(np.ascontiguousarray(mask))
            if TOKEN_TYPE_IDS in self.input_names:
                feeds[TOKEN_TYPE_IDS] = torch.zeros_like(feeds[INPUT_IDS])
            outs = self._execute(feeds)
            key = LAST_HIDDEN_STATE if LAST_HIDDEN_STATE in outs else self.output_names[0]
            return _to_numpy(outs[key]).astype(np.float32, copy=False), None

        past_len = mask.shape[1] - seq
        if past_len < 0:
            raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, fewer than the {seq} new ones")
        if isinstance(past, TrtStaticState):
            if past.length != past_len or past.batch != batch:
                raise ValueError(f"past holds {past.length} tokens for batch {past.batch}, the mask implies "
                                 f"{past_len} past tokens for batch {batch}")
            if seq == 1:
                out = self._static_decode(ids, mask, past)
                if out is not None:
                    return out
            past = TrtKVCache(past.slot.prefix(), past_len, batch)   # eager from here on (this generation)
        if past is None:
            if past_len:
                raise ValueError(f"attention_mask covers {past_len} past tokens but no past state was given")
            for name in self.past_names:
                info = self.tensors[name]
                _, heads, _, head_dim = _static_kv_dims(info)
                feeds[name] = torch.empty((batch, heads, 0, head_dim), dtype=info.dtype, device=self.device)
        else:
            if not isinstance(past, TrtKVCache):
                raise TypeError(f"past must be the state a previous TrtEngine.forward returned, got "
                                f"{type(past).__name__}")
            if past.length != past_len or past.batch != batch:
                raise ValueError(f"past holds {past.length} tokens for batch {past.batch}, the mask implies "
                                 f"{past_len} past tokens for batch {batch}")
            feeds.update(past.tensors)
        if ATTENTION_MASK in self.input_names:
            feeds[ATTENTION_MASK] = torch.from_numpy(np.ascontiguousarray(mask))
        if POSITION_IDS in self.input_names:
            feeds[POSITION_IDS] = torch.from_numpy(position_ids_from_mask(mask, seq))
        outs = self._execute({k: v for k, v in feeds.items() if k in self.tensors})
        present = {past_for_present(name): t for name, t in outs.items() if PRESENT_RE.match(name)}
        key = LOGITS if LOGITS in outs else self.output_names[0]
        logits = outs[key].float().cpu().numpy()
        if past is None and self._static_off is None:
            state = self._to_static(present, seq, batch)
            if state is not None:
                return logits, state
        return logits, TrtKVCache(present, past_len + seq, batch)

    # ---- decode on a static past under CUDA graphs -------------------------------------------------------------
    def _static_cap(self) -> int:
        """The longest static past the profile (and the plan's max context) allows."""
        cap = min(self.profile[n].max[2] for n in self.past_names)
        cap = min(cap, self.profile[ATTENTION_MASK].max[1] - 1)
        if self.max_context:
            cap = min(cap, int(self.max_context) - 1)
        return cap

    def _static_slot(self, batch: int, need: int, owner) -> TrtStaticKV | None:
        """A slot of at least ``need`` positions (None when the profile cannot take it or all slots are busy)."""
        cap = self._static_cap()
        length = MIN_STATIC_PAST
        while length < need:
            length *= 2
        length = min(length, cap)
        if length < need:
            return None
        shapes = {INPUT_IDS: (batch, 1), ATTENTION_MASK: (batch, length + 1), POSITION_IDS: (batch, 1)}
        for n in self.past_names:
            _, heads, _, head_dim = _static_kv_dims(self.tensors[n])
            shapes[n] = (batch, heads, length, head_dim)
        try:
            check_profile_shapes(shapes, self.profile, self.max_context, True)
        except ValueError:
            return None
        return self._slots.acquire(batch, owner, lambda: TrtStaticKV(self, batch, length),
                                   fits=lambda s: s.length >= need, size=lambda s: s.length)

    def _to_static(self, present: dict, length: int, batch: int) -> TrtStaticState | None:
        state = TrtStaticState(None)
        try:
            slot = self._static_slot(batch, length + 1, state)
        except Exception as e:  # noqa: BLE001 -- a plan the static past does not fit: decode as before, said once
            self._static_off = f"{type(e).__name__}: {e}"
            self._slots.clear()
            log.warning("decoding %s on a static past failed (%s); running without CUDA graphs", self.path,
                        self._static_off)
            return None
        if slot is None:
            return None
        slot.reset()
        slot.write_prefix(present, length)
        state.slot = slot
        return state

    def _static_decode(self, ids: np.ndarray, mask: np.ndarray, state: TrtStaticState):
        slot = state.slot
        if slot.filled >= slot.length:                  # full: move to a slot twice as long
            grown = self._static_slot(slot.batch, slot.filled + 1, state)
            if grown is None:
                return None
            grown.reset()
            with self._device_scope():
                grown.write_prefix(slot.prefix(copy=False), slot.filled)
            self._slots.release(slot)
            state.slot = slot = grown
        with self._device_scope():
            slot.load(ids, mask)
            self._graphs.step(slot, (slot.batch, slot.length), slot.step)
            slot.filled += 1
            logits = _host_copy(slot.logits)
        return logits, state

    def model_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if hasattr(self, "_slots"):
            self._slots.clear()
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)


def _layer_key(name: str):
    m = PAST_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (1 << 30, name)


def _static_kv_dims(info: TensorInfo) -> Shape:
    shape = tuple(info.shape)
    if len(shape) != 4:
        raise RuntimeError(f"{info.name} has rank {len(shape)}; expected [batch, kv_heads, past, head_dim]")
    if shape[1] < 0 or shape[3] < 0:  # dynamic head dims: take them from the profile (min = max there)
        shape = tuple(info.profile.max) if info.profile is not None else shape
    return shape


def _host_copy(t) -> np.ndarray:
    """``t`` as a float32 numpy array that does not share memory with ``t`` (a static buffer, overwritten by the
    next step)."""
    out = t.float().cpu()
    return (out.clone() if out.data_ptr() == t.data_ptr() else out).numpy()


def _to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
        t = t.float()
    return t.detach().cpu().numpy()
