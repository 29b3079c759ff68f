"""The compression pipeline: calibration text -> profile -> allocation -> factors -> model / artifact.

    data = prepare_calibration(tokenizer, CalibrationConfig())
    prof = profile(model, tokenizer, RocketConfig(), data=data)        # once
    for b in (0.2, 0.3):                                                # many budgets
        res = compress(model, tokenizer, RocketConfig(budget=b), data=data, profile=prof, out=f"m-{b}")
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from rocket_deploy import __version__
from rocket_deploy.artifact import save_artifact
from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.corpus import CorpusError, TokenSplit, chunk_tokens, fingerprint, load_source, split_documents
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import FORMAT_VERSION, factor_bytes, factor_params
from rocket_deploy.targets import select_targets, set_module

from .allocate import Allocation, allocate
from .baselines import uniform_choice
from .factorize import balance_factors, factorize
from .profile import LayerOption, Profile, profile_model, weight_in_out


@dataclasses.dataclass
class CalibrationData:
    calib: TokenSplit
    heldout: TokenSplit
    info: dict[str, Any]


def prepare_calibration(tokenizer, cal: CalibrationConfig = CalibrationConfig()) -> CalibrationData:
    """Read the sources, split documents into disjoint calibration / held-out sets, cut token chunks."""
    calib_docs, held_docs = [], []
    counts = {}
    for src in cal.sources:
        docs = load_source(src)
        if not docs:
            raise CorpusError(f"calibration source {src!r} gave no text; pass --calib FILE with your own text")
        c, h = split_documents(docs, cal.heldout_fraction, cal.seed)
        calib_docs += c
        held_docs += h
        counts[src] = len(docs)
    # Interleave sources so every chunk window mixes domains in proportion.
    import random
    random.Random(cal.seed).shuffle(calib_docs)
    random.Random(cal.seed + 1).shuffle(held_docs)
    if not calib_docs:
        raise CorpusError("the calibration text is empty; pass --calib FILE with at least a few documents")
    calib = chunk_tokens(tokenizer, calib_docs, cal.seq_len, cal.samples, "calibration")
    if not held_docs:
        raise CorpusError("too little text to hold any document out for evaluation; add more documents")
    held = chunk_tokens(tokenizer, held_docs, cal.seq_len, cal.eval_samples, "heldout")
    info = {"config": cal.to_dict(), "documents": counts, "calib_samples": int(calib.ids.shape[0]),
            "calib_tokens": calib.n_tokens, "calib_sha256_16": fingerprint(calib.ids),
            "heldout_samples": int(held.ids.shape[0]), "heldout_tokens": held.n_tokens,
            "heldout_sha256_16": fingerprint(held.ids)}
    return CalibrationData(calib, held, info)


def _progress_cb(enabled: bool, total: int):
    bar = tqdm(total=total, desc="profile", unit="layer", disable=not enabled, leave=False)

    def cb(block, n_blocks, layer, n_candidates):
        bar.set_postfix_str(f"block {block + 1}/{n_blocks} {layer.rsplit('.', 1)[-1]} x{n_candidates}")
        bar.update(1)
    return cb, bar


def run_profile(model: torch.nn.Module, tokenizer, config: RocketConfig = RocketConfig(),
            calibration: CalibrationConfig = CalibrationConfig(), data: CalibrationData | None = None,
            cache_dir: str | None = None, progress: bool = True, device: str = "cpu") -> Profile:
    """Calibrate and profile every target layer over the (rank, keep) grid. Reuse the result for many budgets."""
    targets = select_targets(model, config.targets, config.exclude)
    data = data or prepare_calibration(tokenizer, calibration)
    owned = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="rocket-profile-")
    cb, bar = _progress_cb(progress, len(targets))
    try:
        prof = profile_model(model, targets, data.calib.ids, config, cache_dir,
                             batch_size=calibration.batch_size, device=device, progress=cb,
                             calibration_info=data.info)
    except BaseException:
        if owned:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
    prof.owned = owned
    return prof


profile = run_profile  # public name: rocket_deploy.profile


@dataclasses.dataclass
class CompressionResult:
    model: torch.nn.Module
    manifest: dict[str, Any]
    profile: Profile
    path: str | None = None


def choose_layers(profile: Profile, targets, config: RocketConfig) -> tuple[dict[str, LayerOption | None], dict]:
    """Per-layer option for ``config.method`` at ``config.budget`` (None keeps a layer dense)."""
    if config.method == "rocket":
        alloc: Allocation = allocate(profile, config)
        return alloc.choice, {"allocator": "knapsack", "objective": config.objective, "cap_alpha": alloc.cap_alpha,
                              "predicted_error": alloc.predicted_error}
    choice = uniform_choice(profile, targets, config, config.budget, config.method)
    return choice, {"allocator": "uniform", "objective": config.objective}


def materialize(model: torch.nn.Module, profile: Profile, choice: dict[str, LayerOption | None],
                config: RocketConfig, inplace: bool = False, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Replace chosen layers by RocketLinear (factors rounded to the storage dtype, as deployed).

    Untouched floating-point tensors are rounded to the storage dtype too, so the returned model computes
    exactly what the saved artifact loads back to."""
    storage = getattr(torch, config.storage_dtype)
    if not inplace:
        model = copy.deepcopy(model)
    targets = select_targets(model, config.targets, config.exclude)
    records = {}
    for name in tqdm(list(profile.layers), desc="factorize", unit="layer", disable=not progress, leave=False):
        lp = profile.layers[name]
        lin = targets[name]
        opt = choice.get(name)
        rec = {"d_in": lp.d_in, "d_out": lp.d_out, "has_bias": lp.has_bias, "dense_bytes": lp.dense_bytes,
               "dense_params": lp.dense_params, "group": lp.group, "jitter": lp.jitter}
        if opt is None:
            rec.update(kind="dense", rank=None, keep=None, bytes=lp.dense_bytes, params=lp.dense_params,
                       rel_original=0.0, rel_whitened=0.0, whitened_sq=0.0)
            with torch.no_grad():
                lin.weight.copy_(lin.weight.to(storage).to(lin.weight.dtype))
        else:
            eb = profile.eigenbasis(name, weight_in_out(lin).cpu())
            f = factorize(eb, opt.rank, opt.keep, config.importance_lambda, config.oversparsify, config.ridge_rel,
                          refit=config.method != "svd-llm")
            u, v = balance_factors(f.u, f.v)
            u = u.to(storage).to(lin.weight.dtype)
            v = v.to(storage).to(lin.weight.dtype)
            bias = lin.bias.detach().to(storage).to(lin.weight.dtype) if lin.bias is not None else None
            new = RocketLinear.from_factors(u, v, f.keep_mask, bias, dtype=lin.weight.dtype)
            set_module(model, name, new.to(lin.weight.device))
            w = weight_in_out(lin).double().cpu()
            dw = w - (u.double() @ v.double())
            s = eb.s
            rec.update(kind="rocket", rank=f.rank, keep=f.keep,
                       bytes=factor_bytes(lp.d_in, lp.d_out, f.rank, f.keep),
                       params=factor_params(lp.d_in, lp.d_out, f.rank, f.keep),
                       rel_original=float(torch.linalg.matrix_norm(dw) / torch.linalg.matrix_norm(w)),
                       rel_whitened=float(torch.linalg.matrix_norm(s @ dw) / max(eb.z_norm, 1e-30)),
                       whitened_sq=float((s @ dw).pow(2).sum()))
        records[name] = rec
    with torch.no_grad():
        rocket_names = {n for n, m in model.named_modules() if isinstance(m, RocketLinear)}
        for key, t in model.state_dict(keep_vars=True).items():   # persistent tensors only, as saved
            if t.is_floating_point() and key.rpartition(".")[0] not in rocket_names:
                t.data.copy_(t.data.to(storage).to(t.dtype))
    return model, records


def summarize(records: dict[str, dict]) -> dict[str, Any]:
    dense_b = sum(r["dense_bytes"] for r in records.values())
    comp_b = sum(r["bytes"] for r in records.values())
    dense_p = sum(r["dense_params"] for r in records.values())
    comp_p = sum(r["params"] for r in records.values())
    return {"dense_bytes": dense_b, "compressed_bytes": comp_b, "bytes_ratio": comp_b / dense_b,
            "removed_bytes_fraction": 1 - comp_b / dense_b, "dense_params": dense_p, "compressed_params": comp_p,
            "params_ratio": comp_p / dense_p,
            "layers_compressed": sum(r["kind"] == "rocket" for r in records.values()),
            "layers_dense": sum(r["kind"] == "dense" for r in records.values())}


def compress(model: torch.nn.Module, tokenizer, config: RocketConfig = RocketConfig(),
             calibration: CalibrationConfig = CalibrationConfig(), *, out: str | None = None, overwrite: bool = False,
             profile: Profile | None = None, data: CalibrationData | None = None, inplace: bool = False,
             progress: bool = True, source: dict | None = None, device: str = "cpu") -> CompressionResult:
    """Compress ``model`` at ``config.budget`` (fraction of targeted bytes removed); save to ``out`` if given."""
    t0 = time.perf_counter()
    if out is not None and os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    prof = profile or run_profile(model, tokenizer, config, calibration, data=data, progress=progress, device=device)
    try:
        t1 = time.perf_counter()
        targets = select_targets(model, config.targets, config.exclude)
        choice, alloc_info = choose_layers(prof, targets, config)
        t2 = time.perf_counter()
        new_model, records = materialize(model, prof, choice, config, inplace=inplace, progress=progress)
        t3 = time.perf_counter()
        manifest = {
            "format_version": FORMAT_VERSION, "method": config.method, "created_by": f"rocket-deploy {__version__}",
            "storage_dtype": config.storage_dtype, "config": config.to_dict(),
            "budget": {"target_removed_fraction": config.budget, **summarize(records)},
            "allocation": alloc_info, "calibration": prof.calibration, "source": source or {},
            "timings_s": {"profile": round(prof.seconds, 2) if profile is None else 0.0,
                          "allocate": round(t2 - t1, 3), "factorize": round(t3 - t2, 2)},
            "layers": records,
        }
        path = save_artifact(out, new_model, tokenizer, manifest, overwrite=overwrite) if out else None
        manifest["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
        return CompressionResult(new_model, manifest, prof, path)
    finally:
        if profile is None and getattr(prof, "owned", False):
            shutil.rmtree(prof.cache_dir, ignore_errors=True)
