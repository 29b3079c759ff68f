"""rocket-deploy artifacts in transformers: a quantization config + quantizer under ``quant_method: "rocket"``.

The artifact's config.json carries (written at save, :func:`mark_config`)::

    "quantization_config": {"quant_method": "rocket", "format": ..., "storage_dtype": ..., "layers": {name: {kind,
                            d_in, d_out, rank, keep, has_bias, quant}}, "requires": "..."},
    "transformers_weights": GUARD

After ``import rocket_deploy`` (registration: :mod:`rocket_deploy.hf_register`), ``from_pretrained`` builds the
``RocketLinear`` / ``QuantRocketLinear`` / ``QuantDenseLinear`` modules from ``layers`` on the meta device, and
transformers' own loader fills them from model.safetensors + factors.safetensors (the quantizer adds that file to
the checkpoint list); dense-V bitmasks, not stored, are regenerated. Without the registration transformers only
warns about an unknown quantization method and would randomly initialise the compressed projections -- so
``transformers_weights`` is set to a sentence that is not a file name: transformers rejects it ("neither a
safetensors file ...: <GUARD>") before reading any weight, and the registered quantizer clears it first.
``save_pretrained`` writes every tensor to model.safetensors (transformers' layout), the same config, and the guard
again (config.save_pretrained drops ``transformers_weights``, so the model's ``save_pretrained`` is wrapped).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant_linear import QUANT_MODULES, compressed_layer
from .rocket_linear import RocketLinear
from .sparse_format import full_mask

QUANT_METHOD = "rocket"
FACTORS = "factors.safetensors"
REQUIRES = "rocket-deploy: pip install rocket-deploy, then `import rocket_deploy` before from_pretrained / pipeline"
GUARD = (f"this is a rocket-deploy artifact (quant_method 'rocket'); its compressed layers load only through "
         f"{REQUIRES}")
_LAYER_FIELDS = ("kind", "d_in", "d_out", "rank", "keep", "has_bias", "quant")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantization_config_dict(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for an artifact ``manifest`` (pure: dict in, dict out)."""
    layers = {n: {k: r.get(k) for k in _LAYER_FIELDS} for n, r in manifest["layers"].items()
              if r.get("quant") or r.get("kind") == "rocket"}
    for r in layers.values():
        if r["quant"]:
            q = r["quant"]
            r["quant"] = {"scheme": q["scheme"], "group_size": q.get("group_size"),
                          **({"v": q["v"]} if q.get("v") else {})}       # V's value format (int4s: 4-bit)
    return {"quant_method": QUANT_METHOD, "format": manifest.get("format", "rocket-deploy/artifact"),
            "format_version": manifest.get("format_version"), "storage_dtype": manifest.get("storage_dtype", "float16"),
            "layers": layers, "requires": REQUIRES}


def _write_guard(directory: str, qconfig: dict[str, Any] | None = None) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    if qconfig is not None:
        cfg["quantization_config"] = qconfig
    if (cfg.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        cfg["transformers_weights"] = GUARD
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def mark_config(directory: str, manifest: dict[str, Any]) -> None:
    """Add the rocket ``quantization_config`` and the refusal guard to ``directory``/config.json."""
    _write_guard(directory, quantization_config_dict(manifest))


def _save_pretrained(model, save_directory, *args, **kwargs):
    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if os.path.isfile(os.path.join(save_directory, "config.json")):
        _write_guard(os.fspath(save_directory))
    return out


def guard_save(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.save_pretrained`` write the refusal guard too (transformers drops it from the config)."""
    model.save_pretrained = functools.partial(_save_pretrained, model)
    return model


@register_quantization_config(QUANT_METHOD) if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING else (lambda c: c)
class RocketQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a rocket-deploy artifact: which layers are factorized / quantized, and how."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, storage_dtype: str = "float16",
                 format: str = "rocket-deploy/artifact", format_version: int | None = None,
                 requires: str = REQUIRES, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format, self.format_version, self.requires = format, format_version, requires
        if storage_dtype not in _DTYPES:
            raise ValueError(f"quantization_config.storage_dtype {storage_dtype!r} is not one of {sorted(_DTYPES)}; "
                             f"the artifact's config.json is damaged")
        self.storage_dtype = storage_dtype
        self.layers = dict(layers or {})
        for name, rec in self.layers.items():
            missing = [k for k in _LAYER_FIELDS if k not in rec]
            if missing or rec["kind"] not in ("rocket", "dense") or (rec["kind"] == "dense" and not rec["quant"]):
                raise ValueError(f"quantization_config.layers[{name!r}] is malformed (missing {missing}, kind "
                                 f"{rec.get('kind')!r}); the artifact's config.json is damaged, compress again")


def _resolve(model: torch.nn.Module, name: str) -> str | None:
    """``name`` in ``model``: as saved, without or with the base-model prefix (AutoModel vs a head class)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = dict(model.named_modules())
    for cand in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                 f"{prefix}.{name}" if prefix else None):
        if cand and cand in names:
            return cand
    return None


def _compressed(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (RocketLinear, *QUANT_MODULES))]


@register_quantizer(QUANT_METHOD) if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING else (lambda c: c)
class RocketHfQuantizer(HfQuantizer):
    """Loads rocket-deploy artifacts (and what their ``save_pretrained`` wrote) bit-exact with ``rocket_deploy.load``."""

    requires_calibration = True         # compression happens in `rocket-deploy compress`, never at load time

    def update_attn_implementation(self, config):
        # runs before transformers resolves the weight files: the registered quantizer lifts the refusal guard
        if getattr(config, "transformers_weights", None) == GUARD:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        from .targets import set_module
        dtype = dtype or torch.get_default_dtype()
        storage = _DTYPES[self.quantization_config.storage_dtype]
        ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        for saved_name, rec in self.quantization_config.layers.items():
            name = _resolve(model, saved_name)
            mod = model.get_submodule(name) if name else None
            if not isinstance(mod, torch.nn.Linear) or (mod.in_features, mod.out_features) != (rec["d_in"], rec["d_out"]):
                raise ValueError(f"quantization_config.layers[{saved_name!r}] ({rec['d_in']}x{rec['d_out']}) matches no "
                                 f"linear layer of {type(model).__name__}; load the artifact with the class it was "
                                 f"compressed from (rocket.json: architecture)")
            set_module(model, name, compressed_layer(rec, dtype, storage))
            if rec["kind"] == "rocket" and rec["keep"] == rec["rank"]:
                ignore.add(re.escape(f"{name}.v_mask") + "$")      # all ones, not stored: rebuilt after loading
        model._keys_to_ignore_on_load_missing = sorted(ignore)
        if checkpoint_files:                    # factors.safetensors sits next to model.safetensors in an artifact
            factors = os.path.join(os.path.dirname(checkpoint_files[0]), FACTORS)
            if not os.path.isfile(factors):     # a Hub repo: fetched like model.safetensors (None when absent)
                from transformers.utils import cached_file
                factors = cached_file(model.config.name_or_path, FACTORS,
                                      _raise_exceptions_for_missing_entries=False) or factors
            if os.path.isfile(factors) and factors not in checkpoint_files:
                checkpoint_files.append(factors)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, mod in _compressed(model):
            dense_v = getattr(mod, "is_dense_v", False)
            # transformers flags every tensor it loaded; one it did not is uninitialised memory: refuse it
            unloaded = [k for k, t in mod.named_buffers(recurse=False)
                        if not getattr(t, "_is_hf_initialized", False) and not (k == "v_mask" and dense_v)]
            if unloaded:
                raise ValueError(f"{name}: {unloaded} are in neither model.safetensors nor {FACTORS} of "
                                 f"{model.config.name_or_path!r}; the artifact is incomplete, copy or compress it again")
            if dense_v:
                mod.v_mask = full_mask(mod.rank, mod.out_features).to(mod.v_values.device)
            if isinstance(mod, RocketLinear):
                mod._dense_v = None
            else:
                mod._cache = {}
        return guard_save(model)

    def get_state_dict_and_metadata(self, model):
        drop = {f"{n}.v_mask" for n, m in _compressed(model) if getattr(m, "is_dense_v", False)}
        return {k: v for k, v in model.state_dict().items() if k not in drop}, {"rocket_format": "transformers"}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False
