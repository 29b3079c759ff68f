"""The compressed-model artifact: a directory written atomically and loaded back into a working model.

Layout (see docs/format.md)::

    rocket.json          manifest: format version, method, budget, per-layer choice, errors, bytes, provenance
    config.json          the model's transformers config (+ generation_config.json)
    tokenizer files      as saved by the tokenizer
    model.safetensors    every tensor that was not compressed (storage dtype), tied duplicates saved once
    factors.safetensors  per compressed layer: <name>.u, <name>.v_values, <name>.v_mask (when keep < rank), <name>.bias
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .quant_linear import QUANT_MODULES, QuantDenseLinear, QuantRocketLinear, quant_state_keys
from .rocket_linear import RocketLinear
from .sparse_format import FORMAT_VERSION, artifact_format_version
from .targets import set_module

MANIFEST = "rocket.json"
FACTORS = "factors.safetensors"
UNTOUCHED = "model.safetensors"
FORMAT_NAME = "rocket-deploy/artifact"


class ArtifactError(ValueError):
    """The artifact directory is missing, incomplete or of an unsupported format version."""


def _dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on failure it is removed."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(out_dir) + "-", dir=parent)
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def split_state(model: torch.nn.Module, storage_dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """(factor tensors, untouched tensors, tied aliases) from a model holding RocketLinear layers."""
    rocket_names = {n for n, m in model.named_modules() if isinstance(m, RocketLinear)}
    quant_names = {n for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}
    factors, untouched, tied, seen = {}, {}, {}, {}
    for key, t in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in quant_names:            # quantized codes and scales are stored exactly as they are
            factors[key] = t.contiguous().cpu()
            continue
        if owner in rocket_names:
            factors[key] = (t.to(storage_dtype) if t.is_floating_point() else t).contiguous().cpu()
            continue
        ident = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            tied[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        untouched[key] = (t.to(storage_dtype) if t.is_floating_point() else t).contiguous().cpu()
    # Dense-V layers need no mask on disk: it is all ones and regenerated on load.
    for n in rocket_names | quant_names:
        mod = model.get_submodule(n)
        if getattr(mod, "is_dense_v", False):
            factors.pop(f"{n}.v_mask", None)
    return factors, untouched, tied


def save_artifact(out_dir: str, model: torch.nn.Module, tokenizer, manifest: dict[str, Any],
                  overwrite: bool = False, extra_files: dict[str, str] | None = None) -> str:
    storage = _dtype(manifest.get("storage_dtype", "float16"))
    factors, untouched, tied = split_state(model, storage)
    version = artifact_format_version(any(isinstance(m, QUANT_MODULES) for m in model.modules()))
    compressed = {n for n, m in model.named_modules() if isinstance(m, (RocketLinear, *QUANT_MODULES))}
    kwargs = infer_architecture_kwargs(type(model), model.config, set(untouched) | set(tied), compressed)
    manifest = dict(manifest, format=FORMAT_NAME, format_version=version, tied=tied,
                    architecture=type(model).__name__, architecture_kwargs=kwargs or {})
    with atomic_directory(out_dir, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(factors, os.path.join(tmp, FACTORS), metadata={"format": FORMAT_NAME, "format_version": str(version)})
        save_file(untouched, os.path.join(tmp, UNTOUCHED), metadata={"format": FORMAT_NAME})
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out_dir)


def read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path!r} is not a directory; pass an artifact made by `rocket-deploy compress`")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path!r} has no {MANIFEST}; it is not a rocket-deploy artifact")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e.msg}); the artifact is damaged, compress again") from e
    if m.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath} is not a rocket-deploy manifest (format={m.get('format')!r})")
    if int(m.get("format_version", -1)) > FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {m.get('format_version')} is newer than this rocket-deploy "
                            f"supports ({FORMAT_VERSION}); upgrade rocket-deploy")
    return m


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
        return no_init_weights()
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
            return no_init_weights()
        except ImportError:
            return contextlib.nullcontext()


def _init_flags(cls) -> dict[str, bool]:
    """Boolean constructor arguments of a transformers model class besides ``config`` (``add_pooling_layer``...)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {n: p.default for n, p in sig.parameters.items()
            if n not in ("self", "config") and isinstance(p.default, bool)
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _plain_keys(cls, config, kwargs: dict[str, Any], compressed: set[str]) -> set[str] | None:
    """State keys of ``cls(config, **kwargs)`` outside the compressed layers; built on the meta device (no memory)."""
    try:
        with _no_init(), torch.device("meta"):
            model = cls(config, **kwargs)
    except Exception:  # noqa: BLE001 -- a combination the class rejects is simply not a candidate
        return None
    return {k for k in model.state_dict() if k.rpartition(".")[0] not in compressed}


def infer_architecture_kwargs(cls, config, keys: set[str], compressed: set[str],
                              max_flips: int = 2) -> dict[str, bool] | None:
    """The boolean constructor arguments that rebuild the module tree whose plain (uncompressed) state keys are
    ``keys``: ``{}`` when the defaults do, e.g. ``{"add_pooling_layer": False}`` for ``BertModel(config,
    add_pooling_layer=False)``, ``None`` when no combination of at most ``max_flips`` flipped flags matches."""
    flags = _init_flags(cls)
    for n in range(min(max_flips, len(flags)) + 1):
        for names in itertools.combinations(sorted(flags), n):
            kwargs = {k: not flags[k] for k in names}
            if _plain_keys(cls, config, kwargs, compressed) == keys:
                return kwargs
    return None


def _compressed_names(manifest: dict[str, Any]) -> set[str]:
    return {n for n, r in manifest["layers"].items() if r.get("quant") or r["kind"] == "rocket"}


def build_skeleton(path: str, manifest: dict[str, Any], dtype: torch.dtype = torch.float32,
                   saved_keys: set[str] | None = None) -> torch.nn.Module:
    """The model architecture with RocketLinear modules in place of the compressed layers (weights unset).

    The class is ``manifest["architecture"]``, built with ``manifest["architecture_kwargs"]`` (e.g.
    ``add_pooling_layer=False``). Manifests written before that field existed: when ``saved_keys`` (the plain
    tensor names in model.safetensors plus the tied aliases) are given and the defaults do not produce them, the
    boolean constructor arguments that do are inferred."""
    import transformers
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = getattr(transformers, manifest["architecture"], None)
    if cls is None:
        raise ArtifactError(f"transformers {transformers.__version__} has no class {manifest['architecture']}")
    kwargs = manifest.get("architecture_kwargs")
    if kwargs is None:
        kwargs = {}
        if saved_keys is not None:
            kwargs = infer_architecture_kwargs(cls, config, saved_keys, _compressed_names(manifest)) or {}
    unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise ArtifactError(f"{manifest['architecture']} in transformers {transformers.__version__} takes no "
                            f"argument {sorted(unknown)} recorded in {MANIFEST}")
    with _no_init():
        model = cls(config, **kwargs)
    model = model.to(dtype)
    for name, rec in manifest["layers"].items():
        q = rec.get("quant")
        if q:           # format version 2: quantized factors or quantized dense weight
            bias_dtype = _dtype(manifest.get("storage_dtype", "float16"))
            group = q.get("group_size") or 128
            new = (QuantRocketLinear(rec["d_in"], rec["d_out"], rec["rank"], rec["keep"], q["scheme"], group,
                                     bias=rec["has_bias"], bias_dtype=bias_dtype) if rec["kind"] == "rocket" else
                   QuantDenseLinear(rec["d_in"], rec["d_out"], q["scheme"], group, bias=rec["has_bias"],
                                    bias_dtype=bias_dtype))
            set_module(model, name, new)
        elif rec["kind"] == "rocket":
            set_module(model, name, RocketLinear(rec["d_in"], rec["d_out"], rec["rank"], rec["keep"],
                                                 bias=rec["has_bias"], dtype=dtype))
    return model


def load_artifact(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load an artifact: returns ``(model, tokenizer, manifest)``; the model computes in ``dtype``."""
    from transformers import AutoTokenizer
    manifest = read_manifest(path)
    for fname in (FACTORS, UNTOUCHED):
        if not os.path.isfile(os.path.join(path, fname)):
            raise ArtifactError(f"{path!r} is missing {fname}; the artifact is incomplete, compress again")
    state = load_file(os.path.join(path, UNTOUCHED))
    tied = manifest.get("tied", {})
    model = build_skeleton(path, manifest, dtype, saved_keys=set(state) | set(tied))
    factors = load_file(os.path.join(path, FACTORS))
    for name, mod in model.named_modules():
        if isinstance(mod, RocketLinear):
            mask = factors.pop(f"{name}.v_mask", None)
            mod.load_packed(factors.pop(f"{name}.u"), factors.pop(f"{name}.v_values"), mask,
                            factors.pop(f"{name}.bias", None))
        elif isinstance(mod, QUANT_MODULES):
            keys = [k for k in quant_state_keys(mod) if f"{name}.{k}" in factors]
            mod.load_quantized({k: factors.pop(f"{name}.{k}") for k in keys})
    if factors:
        raise ArtifactError(f"{FACTORS} has tensors for no compressed layer: {sorted(factors)[:4]}")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    rocket_keys = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, RocketLinear)
                   for b in ("u", "v_values", "v_mask", "bias")}
    rocket_keys |= {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)
                    for b in quant_state_keys(m)}
    missing = [k for k in missing if k not in rocket_keys and k not in tied]
    if missing or unexpected:
        raise ArtifactError(f"artifact does not match its architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for alias, target in tied.items():
        _tie(model, alias, target)
    model.eval().to(device)
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, manifest


def _tie(model: torch.nn.Module, alias: str, target: str) -> None:
    mod_name, _, attr = alias.rpartition(".")
    tmod_name, _, tattr = target.rpartition(".")
    src = getattr(model.get_submodule(tmod_name) if tmod_name else model, tattr)
    dst_mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(src, torch.nn.Parameter):
        setattr(dst_mod, attr, src)
    else:
        dst_mod.register_buffer(attr, src)


def load(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``rocket_deploy.load(path)``: the compressed model, ready for ``generate``."""
    return load_artifact(path, dtype, device)[0]
