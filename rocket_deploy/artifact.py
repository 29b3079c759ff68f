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
import warnings
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .manifest import (FORMAT_NAME, MANIFEST, ArtifactError, check_factor_shapes, file_records,  # noqa: F401
                       read_json_manifest, tensor_shapes, verify_files)
from .quant_linear import QUANT_MODULES, compressed_layer, quant_state_keys
from .rocket_linear import RocketLinear
from .safe_io import atomic_directory, recover_swap  # noqa: F401 -- atomic_directory: importable from here too
from .sparse_format import FORMAT_VERSION, artifact_format_version
from .targets import set_module

FACTORS = "factors.safetensors"
UNTOUCHED = "model.safetensors"


class ArtifactWarning(UserWarning):
    """Something in an artifact is missing or unreadable but not needed for what is being done (the tokenizer)."""


def _dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


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
    source_dir = (manifest.get("source") or {}).get("directory")
    if source_dir:          # lets `eval` find the dense model again when artifact and model move together
        manifest["source"] = dict(manifest["source"], directory_from_artifact=os.path.relpath(
            os.path.abspath(source_dir), os.path.abspath(out_dir)))
    with atomic_directory(out_dir, overwrite, kind="artifact", inputs=[source_dir] if source_dir else []) as tmp:
        model.config.save_pretrained(tmp)
        from .hf_quantizer import mark_config  # config.json: quant_method "rocket" for transformers (docs/format.md)
        mark_config(tmp, manifest)
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
        # every file is final here: record sizes and SHA-256 (checked by load_artifact) -- keep this step last
        manifest["files"] = file_records(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out_dir)


def read_manifest(path: str) -> dict[str, Any]:
    """The validated manifest of the artifact at ``path`` (schema: :mod:`rocket_deploy.manifest`). A replacement
    of ``path`` that a killed run left half done is finished first (:func:`rocket_deploy.safe_io.recover_swap`)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        with contextlib.suppress(OSError):
            recover_swap(path)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path!r} is not a directory; pass an artifact made by `rocket-deploy compress`")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path!r} has no {MANIFEST}; it is not a rocket-deploy artifact")
    return read_json_manifest(mpath, FORMAT_VERSION)


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


def _architecture_class(config, name: str, path: str, trust_remote_code: bool):
    """The transformers class ``name``; a class from the artifact's own code (``auto_map``) only when
    ``trust_remote_code`` (that runs the Python files shipped in the artifact)."""
    import transformers
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    refs = [r[0] if isinstance(r, (list, tuple)) else r for r in (getattr(config, "auto_map", None) or {}).values()]
    refs = [r for r in refs if r and r.rsplit(".", 1)[-1] == name]
    if refs and not trust_remote_code:
        raise ArtifactError(f"{name} is defined by Python code inside {path!r} (auto_map in config.json); it is not "
                            f"run unless you pass --trust-remote-code (trust_remote_code=True), which executes it")
    if refs:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return get_class_from_dynamic_module(refs[0], path, local_files_only=True)
    raise ArtifactError(f"transformers {transformers.__version__} has no class {name}")


def _check_layer(model: torch.nn.Module, name: str, rec: dict[str, Any], path: str) -> None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    where = f"{os.path.join(path, MANIFEST)}: layers[{name!r}]"
    if not isinstance(mod, torch.nn.Linear):
        raise ArtifactError(f"{where}: {type(model).__name__} has no linear layer of that name; the artifact is "
                            f"damaged or was edited, compress again")
    if (mod.in_features, mod.out_features) != (rec["d_in"], rec["d_out"]):
        raise ArtifactError(f"{where}: d_in x d_out {rec['d_in']}x{rec['d_out']} but the model's layer is "
                            f"{mod.in_features}x{mod.out_features}; the artifact is damaged, compress again")


def build_skeleton(path: str, manifest: dict[str, Any], dtype: torch.dtype = torch.float32,
                   saved_keys: set[str] | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model architecture with RocketLinear modules in place of the compressed layers (weights unset).

    The class is ``manifest["architecture"]``, built with ``manifest["architecture_kwargs"]`` (e.g.
    ``add_pooling_layer=False``). Manifests written before that field existed: when ``saved_keys`` (the plain
    tensor names in model.safetensors plus the tied aliases) are given and the defaults do not produce them, the
    boolean constructor arguments that do are inferred."""
    import transformers
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"cannot read {os.path.join(path, 'config.json')} ({str(e).splitlines()[0]}); the "
                            f"artifact is damaged, or needs --trust-remote-code if its config is custom code") from None
    cls = _architecture_class(config, manifest["architecture"], path, trust_remote_code)
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
        _check_layer(model, name, rec, path)
        if rec.get("quant") or rec["kind"] == "rocket":   # quantized (format 2) or factorized; else left dense
            try:
                layer = compressed_layer(rec, dtype, _dtype(manifest.get("storage_dtype", "float16")))
            except (ValueError, KeyError) as e:         # a record no layer can be built from (scheme, formats, keep)
                raise ArtifactError(f"{os.path.join(path, MANIFEST)}: layers[{name!r}]: {e}; the artifact is "
                                    f"damaged or was edited, compress again") from None
            set_module(model, name, layer)
    return model


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for every kind of damage
        raise ArtifactError(f"{path} is not a readable safetensors file ({type(e).__name__}); the artifact is "
                            f"damaged, compress again") from None


def _check_tied(manifest: dict[str, Any], model: torch.nn.Module, saved: set[str], path: str) -> None:
    keys = set(model.state_dict())
    for alias, target in manifest.get("tied", {}).items():
        where = f"{os.path.join(path, MANIFEST)}: tied[{alias!r}]"
        if alias not in keys:
            raise ArtifactError(f"{where}: {type(model).__name__} has no tensor {alias!r}; the artifact is damaged "
                                f"or was edited, compress again")
        if target not in saved:
            raise ArtifactError(f"{where}: the target {target!r} is not in {UNTOUCHED}; the artifact is damaged "
                                f"or was edited, compress again")


def load_tokenizer(path: str, required: bool = False, trust_remote_code: bool = False):
    """The artifact's tokenizer; when it is missing or unreadable: ArtifactError if ``required`` (text is
    needed), else an :class:`ArtifactWarning` and None."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for missing / broken tokenizers
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"the artifact {path!r} has no usable tokenizer ({type(e).__name__}: {why[:200]})"
        if required:
            raise ArtifactError(f"{msg}; text input needs one: copy the source model's tokenizer files into it") from None
        warnings.warn(msg + "; loading the model without one", ArtifactWarning, stacklevel=3)
        return None


def load_artifact(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                  verify: bool = True, trust_remote_code: bool = False, need_tokenizer: bool = False):
    """Load an artifact: returns ``(model, tokenizer, manifest)``; the model computes in ``dtype``.

    ``verify``: check every file against the SHA-256 recorded in ``rocket.json`` (False skips it: faster for
    very large artifacts). ``trust_remote_code``: allow Python code shipped in the artifact (``auto_map``) to
    run -- only for artifacts you trust. ``need_tokenizer``: a missing / broken tokenizer is an error (else a
    warning and ``tokenizer=None``)."""
    manifest = read_manifest(path)
    for fname in (FACTORS, UNTOUCHED):
        if not os.path.isfile(os.path.join(path, fname)):
            raise ArtifactError(f"{path!r} is missing {fname}; the artifact is incomplete, compress again")
    if verify:
        verify_files(path, manifest.get("files"))
    fpath, upath = os.path.join(path, FACTORS), os.path.join(path, UNTOUCHED)
    check_factor_shapes(manifest, tensor_shapes(fpath), fpath)
    saved = set(tensor_shapes(upath))
    tied = manifest.get("tied", {})
    model = build_skeleton(path, manifest, dtype, saved_keys=saved | set(tied), trust_remote_code=trust_remote_code)
    _check_tied(manifest, model, saved, path)
    state = _load_tensors(upath)
    factors = _load_tensors(fpath)
    for name, mod in model.named_modules():
        if isinstance(mod, RocketLinear):
            mask = factors.pop(f"{name}.v_mask", None)
            mod.load_packed(factors.pop(f"{name}.u"), factors.pop(f"{name}.v_values"), mask,
                            factors.pop(f"{name}.bias", None))
        elif isinstance(mod, QUANT_MODULES):
            keys = [k for k in quant_state_keys(mod) if f"{name}.{k}" in factors]
            try:
                mod.load_quantized({k: factors.pop(f"{name}.{k}") for k in keys})
            except (RuntimeError, ValueError, KeyError) as e:
                raise ArtifactError(f"{fpath}: the quantized tensors of layers[{name!r}] do not match {MANIFEST} "
                                    f"({str(e).splitlines()[0][:200]}); the artifact is damaged") from None
    if factors:
        raise ArtifactError(f"{FACTORS} has tensors for no compressed layer: {sorted(factors)[:4]}")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:       # a tensor of the wrong shape
        raise ArtifactError(f"{upath} does not match the architecture in config.json "
                            f"({str(e).splitlines()[-1].strip()[:200]}); the artifact is damaged") from None
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
    from .hf_quantizer import guard_save  # model.save_pretrained keeps transformers' refusal guard in config.json
    guard_save(model)
    tokenizer = load_tokenizer(path, need_tokenizer, trust_remote_code)
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


def load(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, verify: bool = True,
         trust_remote_code: bool = False) -> torch.nn.Module:
    """``rocket_deploy.load(path)``: the compressed model, ready for ``generate`` (options: :func:`load_artifact`)."""
    return load_artifact(path, dtype, device, verify=verify, trust_remote_code=trust_remote_code)[0]
