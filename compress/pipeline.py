"""The compression pipeline: calibration text -> profile -> allocation -> factors -> model / artifact.

    data = prepare_calibration(tokenizer, CalibrationConfig())
    prof = profile(model, tokenizer, RocketConfig(), data=data)        # once
    for b in (0.2, 0.3):                                                # many budgets
        res = compress(model, tokenizer, RocketConfig(budget=b), data=data, profile=prof, out=f"m-{b}")
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
import weakref
from typing import Any

import torch
from tqdm.auto import tqdm

from rocket_deploy._version import __version__
from rocket_deploy.artifact import save_artifact
from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.corpus import CorpusError, TokenSplit, chunk_tokens, fingerprint, load_source, split_documents
from rocket_deploy.models import check_seq_len, is_causal_lm, model_fingerprint
from rocket_deploy.quant_linear import QUANT_MODULES
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import artifact_format_version, factor_bytes, factor_params
from rocket_deploy.targets import select_targets, set_module

from .allocate import Allocation, allocate, resolve_objective
from .sensitivity import output_sensitivity, sensitivity_rows
from .baselines import uniform_choice
from .factorize import balance_factors, factorize
from .profile import LayerOption, Profile, profile_mismatch, profile_model, weight_in_out


@dataclasses.dataclass
class CalibrationData:
    calib: TokenSplit
    heldout: TokenSplit
    info: dict[str, Any]
    extra_files: dict[str, str] = dataclasses.field(default_factory=dict)   # saved into the artifact
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)     # selfgen (sampling), calibration (text)


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def source_documents(src: str, cal: CalibrationConfig, model, tokenizer, n_calib: int, n_eval: int,
                     progress: bool = False):
    """Documents of one calibration source; ``selfgen`` is sampled from ``model`` (cached; a bar of sequences
    on stderr while sampling when ``progress``)."""
    if src != "selfgen":
        return load_source(src), {}
    if model is None:
        raise CorpusError("the 'selfgen' calibration source samples text from the model; pass the model")
    from rocket_deploy.selfgen import selfgen_documents
    h = cal.heldout_fraction
    n_docs = int(math.ceil(max(n_calib / (1 - h), n_eval / h))) + 2
    docs, path = selfgen_documents(model, tokenizer, n_docs, cal.seq_len, cal.seed, progress=progress)
    return docs, {"selfgen_cache": path, "selfgen_docs": len(docs)}


def prepare_calibration(tokenizer, cal: CalibrationConfig = CalibrationConfig(), model=None,
                        progress: bool = False) -> CalibrationData:
    """Read the sources, split each one's documents into disjoint calibration / held-out sets, and cut token
    chunks; every source gets an equal share of the samples (a mixed corpus by default). ``seconds`` of the
    result: ``selfgen`` (sampling the model, ~0 when cached) and ``calibration`` (everything else)."""
    t0 = time.perf_counter()
    t_selfgen = 0.0
    sources = list(cal.sources)
    if model is not None:
        check_seq_len(model, cal.seq_len)          # longer than the model's positions: garbage activations
    info: dict[str, Any] = {"config": cal.to_dict()}
    if "selfgen" in sources and model is not None and not is_causal_lm(model):
        sources.remove("selfgen")                       # an encoder cannot sample text
        info["skipped_sources"] = {"selfgen": "the model is not a causal LM and cannot generate text"}
        if not sources:
            raise CorpusError("'selfgen' needs a causal LM; pass --calib with text for this encoder")
    n = len(sources)
    calib_n, eval_n = _shares(cal.samples, n), _shares(cal.eval_samples, n)
    calib_parts, held_parts, per_source, extra = [], [], {}, {}
    for i, src in enumerate(sources):
        ts = time.perf_counter()
        docs, meta = source_documents(src, cal, model, tokenizer, calib_n[i], eval_n[i], progress)
        if src == "selfgen":
            t_selfgen += time.perf_counter() - ts
        if not docs:
            raise CorpusError(f"calibration source {src!r} gave no text; pass --calib FILE with your own text")
        info.update(meta)
        if src == "selfgen":
            extra["calibration-selfgen.jsonl"] = "".join(
                json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs)
        c, h = split_documents(docs, cal.heldout_fraction, cal.seed)
        random.Random(cal.seed).shuffle(c)
        if not c:
            raise CorpusError(f"calibration source {src!r} has too few documents to split; add more text")
        if calib_n[i]:
            calib_parts.append(chunk_tokens(tokenizer, c, cal.seq_len, calib_n[i], src))
        if eval_n[i]:
            if not h:
                raise CorpusError(f"too little text in {src!r} to hold any document out for evaluation; add more")
            held_parts.append(chunk_tokens(tokenizer, h, cal.seq_len, eval_n[i], src))
        per_source[src] = {"documents": len(docs), "calib_samples": int(calib_parts[-1].ids.shape[0]) if calib_n[i] else 0,
                           "heldout_samples": int(held_parts[-1].ids.shape[0]) if eval_n[i] else 0}
    calib = TokenSplit(torch.cat([p.ids for p in calib_parts]), "calibration", sum(p.n_documents for p in calib_parts))
    held = TokenSplit(torch.cat([p.ids for p in held_parts]), "heldout", sum(p.n_documents for p in held_parts))
    info.update({"sources": per_source, "calib_samples": int(calib.ids.shape[0]), "calib_tokens": calib.n_tokens,
                 "calib_sha256_16": fingerprint(calib.ids), "heldout_samples": int(held.ids.shape[0]),
                 "heldout_tokens": held.n_tokens, "heldout_sha256_16": fingerprint(held.ids)})
    seconds = {"selfgen": round(t_selfgen, 2), "calibration": round(time.perf_counter() - t0 - t_selfgen, 2)}
    return CalibrationData(calib, held, info, extra, seconds)


def _progress_cb(enabled: bool, total: int):
    bar = tqdm(total=total, desc="profile", unit="layer", disable=not enabled, leave=False)

    def cb(block, n_blocks, layer, n_candidates):
        bar.set_postfix_str(f"block {block + 1}/{n_blocks} {layer.rsplit('.', 1)[-1]} x{n_candidates}")
        bar.update(1)
    return cb, bar


def run_profile(model: torch.nn.Module, tokenizer, config: RocketConfig = RocketConfig(),
            calibration: CalibrationConfig = CalibrationConfig(), data: CalibrationData | None = None,
            cache_dir: str | None = None, progress: bool = True, device: str = "cpu") -> Profile:
    """Calibrate and profile every target layer over the (rank, keep) grid. Reuse the result for many budgets.

    ``device`` (cpu, cuda, cuda:N) runs the sensitivity pass, the Grams (float64), the eigendecompositions and
    the candidates there; the weights stay on the CPU, one block at a time on the device (:mod:`.calibration`).
    The stage times and the device are kept in ``profile.run_info`` and in ``timings.json`` of the cache."""
    from rocket_deploy.devices import resolve_device
    device = resolve_device(device)
    targets = select_targets(model, config.targets, config.exclude)
    data = data or prepare_calibration(tokenizer, calibration, model, progress=progress)
    from .distributed import shared_temp_dir, world
    main = world().main           # torchrun: rank 0 owns the temporary cache, runs the model, shows progress
    owned = cache_dir is None and main
    cache_dir = cache_dir or shared_temp_dir("rocket-profile-")
    bar = None
    try:
        sens = None
        t0 = time.perf_counter()
        if is_causal_lm(model) and main:   # one backward pass: enables the "fisher" objective for this profile
            ids = data.calib.ids[sensitivity_rows(data.calib.ids.shape[0], calibration.sensitivity_samples)]
            sens = output_sensitivity(model, targets, ids, calibration.batch_size // 2 or 1, device,
                                      progress=progress)
        t_sens = time.perf_counter() - t0
        cb, bar = _progress_cb(progress and main, len(targets))     # after the sensitivity pass has its own bar
        prof = profile_model(model, targets, data.calib.ids, config, cache_dir,
                             batch_size=calibration.batch_size, device=device, progress=cb,
                             calibration_info={**data.info, "model_fingerprint": model_fingerprint(model),
                                               "sensitivity_samples": _sens_samples(data, calibration)},
                             sensitivity=sens)
    except BaseException:
        if owned:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    prof.owned = owned
    prof.run_info = {"device": str(device),
                     "seconds": {"sensitivity": round(t_sens, 2), "profile": round(prof.seconds, 2)}}
    if main:
        _write_json(os.path.join(cache_dir, TIMINGS_FILE), prof.run_info)
    if owned:       # a temporary cache lives as long as the Profile object
        weakref.finalize(prof, shutil.rmtree, cache_dir, True)
    return prof


profile = run_profile  # public name: rocket_deploy.profile


def _sens_samples(data: CalibrationData, calibration: CalibrationConfig) -> int:
    """How many calibration sequences the sensitivity pass of a profile of ``data`` uses (see :func:`run_profile`)."""
    return min(int(data.calib.ids.shape[0]), calibration.sensitivity_samples)

TIMINGS_FILE = "timings.json"       # beside profile.json: how long the profile took, on which device


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _saved_run_info(prof: Profile) -> dict:
    """``run_info`` of a profile loaded from its directory (``timings.json``; older ones: ``profile.json``'s
    seconds, the sensitivity pass not timed)."""
    try:
        with open(os.path.join(prof.cache_dir, TIMINGS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"seconds": {"profile": round(prof.seconds, 2)}}


def load_or_profile(model: torch.nn.Module, tokenizer, config: RocketConfig, calibration: CalibrationConfig,
                    data: CalibrationData, profile_dir: str | None, progress: bool = True,
                    log=None, device: str = "cpu") -> Profile:
    """Reuse the profile in ``profile_dir`` when it was made from the same calibration tokens and grid
    (:func:`compress.profile.profile_mismatch`), else profile anew (into ``profile_dir`` when given)."""
    if profile_dir and os.path.isfile(os.path.join(profile_dir, "profile.json")):
        prof = Profile.load(profile_dir)
        fp = model_fingerprint(model)
        if prof.calibration.get("model_fingerprint") not in (None, fp):      # never overwrite another model's
            from rocket_deploy.config import ConfigError
            raise ConfigError(f"the profile in {profile_dir} was made from another model (fingerprint "
                              f"{prof.calibration['model_fingerprint']}, this model {fp}); pass another --profile-dir")
        why = profile_mismatch(prof, config, {**data.info, "sensitivity_samples": _sens_samples(data, calibration)},
                               model_fingerprint=fp, targets=select_targets(model, config.targets, config.exclude))
        if why is None:
            if log:
                log(f"reusing profile in {profile_dir}")
            prof.reused = True          # the manifest says "profile: reused" and keeps the original seconds
            prof.run_info = _saved_run_info(prof)
            return prof
        if log:
            log(f"profile in {profile_dir} cannot be reused ({why}); profiling again")
    return run_profile(model, tokenizer, config, calibration, data=data, cache_dir=profile_dir, progress=progress,
                       device=device)


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
        return alloc.choice, {"allocator": "knapsack", "objective": alloc.objective, "cap_alpha": alloc.cap_alpha,
                              "predicted_error": alloc.predicted_error}
    choice = uniform_choice(profile, targets, config, config.budget, config.method)
    return choice, {"allocator": "uniform", "objective": resolve_objective(profile, config.objective)}


def place_factorization(model: torch.nn.Module, name: str, lin: torch.nn.Linear, lp, f, eb, config: RocketConfig) -> dict:
    """Put factorization ``f`` of ``lin`` into ``model`` as a RocketLinear (factors rounded to the storage dtype)
    and return its manifest record (errors measured on the rounded factors, whitened by ``eb.s``)."""
    storage = getattr(torch, config.storage_dtype)
    u, v = balance_factors(f.u, f.v)
    u = u.to(storage).to(lin.weight.dtype)
    v = v.to(storage).to(lin.weight.dtype)
    bias = lin.bias.detach().to(storage).to(lin.weight.dtype) if lin.bias is not None else None
    home = lin.weight.device        # the factors may come from another device (compress --device)
    new = RocketLinear.from_factors(u.to(home), v.to(home), f.keep_mask.to(home), bias, dtype=lin.weight.dtype)
    set_module(model, name, new.to(home))
    w = weight_in_out(lin).double().to(u.device)
    dw = torch.addmm(w, u.double(), v.double(), alpha=-1)
    sq = float((eb.s @ dw).pow(2).sum())
    return dict(kind="rocket", rank=f.rank, keep=f.keep,
                bytes=factor_bytes(lp.d_in, lp.d_out, f.rank, f.keep),
                params=factor_params(lp.d_in, lp.d_out, f.rank, f.keep),
                rel_original=float(torch.linalg.matrix_norm(dw) / torch.linalg.matrix_norm(w)),
                rel_whitened=math.sqrt(sq) / max(eb.z_norm, 1e-30), whitened_sq=sq)


def layer_record(lp) -> dict:
    return {"d_in": lp.d_in, "d_out": lp.d_out, "has_bias": lp.has_bias, "dense_bytes": lp.dense_bytes,
            "dense_params": lp.dense_params, "group": lp.group, "jitter": lp.jitter}


def keep_dense(lin: torch.nn.Linear, lp, config: RocketConfig) -> dict:
    """Round a layer kept dense to the storage dtype; its manifest record."""
    with torch.no_grad():
        lin.weight.copy_(lin.weight.to(getattr(torch, config.storage_dtype)).to(lin.weight.dtype))
    return dict(kind="dense", rank=None, keep=None, bytes=lp.dense_bytes, params=lp.dense_params,
                rel_original=0.0, rel_whitened=0.0, whitened_sq=0.0)


def round_untouched(model: torch.nn.Module, config: RocketConfig) -> None:
    """Round every persistent floating-point tensor outside the replaced layers to the storage dtype."""
    storage = getattr(torch, config.storage_dtype)
    with torch.no_grad():
        rocket_names = {n for n, m in model.named_modules() if isinstance(m, (RocketLinear, *QUANT_MODULES))}
        for key, t in model.state_dict(keep_vars=True).items():   # persistent tensors only, as saved
            if t.is_floating_point() and key.rpartition(".")[0] not in rocket_names:
                t.data.copy_(t.data.to(storage).to(t.dtype))


def _eigenbasis_on(eb, device: torch.device):
    """``eb`` with its tensors on ``device`` (the factorization then runs there)."""
    if device.type == "cpu":
        return eb
    return dataclasses.replace(eb, **{f.name: getattr(eb, f.name).to(device) for f in dataclasses.fields(eb)
                                      if isinstance(getattr(eb, f.name), torch.Tensor)})


def materialize(model: torch.nn.Module, profile: Profile, choice: dict[str, LayerOption | None],
                config: RocketConfig, inplace: bool = False, progress: bool = True,
                calib_ids: torch.Tensor | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Replace chosen layers by RocketLinear (factors rounded to the storage dtype, as deployed).
    ``device``: where the factorizations (and refits) run; the model stays where it is. Quantized layers and
    error propagation run on the model's device.

    Untouched floating-point tensors are rounded to the storage dtype too, so the returned model computes
    exactly what the saved artifact loads back to. ``config.error_propagation`` refits every chosen layer to the
    inputs of the already-compressed blocks (:mod:`.propagate`; needs ``calib_ids``)."""
    if config.error_propagation and not config.quantize and config.method != "svd-llm":
        if calib_ids is None:
            raise ValueError("error_propagation re-runs the calibration tokens through the compressed blocks: "
                             "pass the calibration data (compress(..., data=...)) or set error_propagation=False")
        from .propagate import materialize_propagated
        return materialize_propagated(model, profile, choice, config, calib_ids, inplace=inplace)
    if not inplace:
        model = copy.deepcopy(model)
    device = torch.device(device)
    targets = select_targets(model, config.targets, config.exclude)
    records = {}
    for name in tqdm(list(profile.layers), desc="factorize", unit="layer", disable=not progress, leave=False):
        lp = profile.layers[name]
        lin = targets[name]
        opt = choice.get(name)
        rec = layer_record(lp)
        if config.quantize:     # quantized factors, or the dense weight quantized (docs/quantization.md)
            from .quant_pipeline import materialize_quant_layer
            eb = profile.eigenbasis(name, weight_in_out(lin).cpu())
            rec.update(materialize_quant_layer(model, name, lin, eb, opt, config))
            records[name] = rec
            continue
        if opt is None:
            rec.update(keep_dense(lin, lp, config))
        else:
            eb = _eigenbasis_on(profile.eigenbasis(name, weight_in_out(lin).cpu()), device)
            refit = config.method != "svd-llm"
            f = factorize(eb, opt.rank, opt.keep, config.importance_lambda, config.oversparsify, config.ridge_rel,
                          refit=refit, refit_rounds=config.refit_rounds if refit else 0)
            rec.update(place_factorization(model, name, lin, lp, f, eb, config))
        records[name] = rec
    round_untouched(model, config)
    return model, records


def heldout_quality(candidate: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> float:
    """Lower is better: perplexity for causal LMs, hidden-state relative error for encoders."""
    from rocket_deploy.perplexity import hidden_state_fidelity, perplexity
    if is_causal_lm(candidate):
        return perplexity(candidate, ids)
    return hidden_state_fidelity(candidate, dense, ids)["rel_l2"]


def safeguarded(model, prof: Profile, targets, choice, config: RocketConfig, data: CalibrationData, progress: bool,
                device: str | torch.device = "cpu", seconds: dict | None = None):
    """Keep the knapsack allocation or the uniform one at the same budget, whichever does better on the held-out
    calibration split (never the evaluation domains).

    Both are compared as factorized without the both-factor refit (``refit_rounds``: it lowers every layer's
    error by a few percent, both allocations alike, and is most of the build time); only the winner is then built
    with it. ``seconds`` gets ``safeguard`` (both quick builds), ``evaluation`` (both held-out measurements) and
    ``materialize`` (the winner with its refits; 0 when ``refit_rounds`` is 0 and the quick build is final)."""
    seconds = {} if seconds is None else seconds
    quick = config.replace(refit_rounds=0) if config.refit_rounds and not config.quantize else config
    t = time.perf_counter()
    uni_choice = uniform_choice(prof, targets, config, config.budget, "rocket-uniform")
    ids = data.calib.ids
    knap_model, knap_rec = materialize(model, prof, choice, quick, progress=progress, calib_ids=ids, device=device)
    uni_model, uni_rec = materialize(model, prof, uni_choice, quick, progress=progress, calib_ids=ids, device=device)
    t, seconds["safeguard"] = time.perf_counter(), round(time.perf_counter() - t, 2)
    ids = data.heldout.ids
    q_knap = heldout_quality(knap_model, model, ids)
    q_uni = heldout_quality(uni_model, model, ids)
    t, seconds["evaluation"] = time.perf_counter(), round(time.perf_counter() - t, 2)
    use_uniform = q_uni < q_knap and sum(r["bytes"] for r in uni_rec.values()) <= prof.dense_bytes * (1 - config.budget)
    guard = {"metric": "perplexity" if is_causal_lm(model) else "hidden-state rel. L2",
             "split": "held-out calibration documents", "knapsack": q_knap, "uniform": q_uni,
             "chosen": "uniform" if use_uniform else "knapsack", "compared_without_refit": quick is not config}
    new_model, records = (uni_model, uni_rec) if use_uniform else (knap_model, knap_rec)
    del knap_model, uni_model
    if quick is not config:
        new_model, records = materialize(model, prof, uni_choice if use_uniform else choice, config,
                                         progress=progress, calib_ids=data.calib.ids, device=device)
    seconds["materialize"] = round(time.perf_counter() - t, 2)
    return new_model, records, guard


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
             progress: bool = True, source: dict | None = None, device: str = "cpu",
             started: float | None = None) -> CompressionResult:
    """Compress ``model`` at ``config.budget`` (fraction of targeted bytes removed); save to ``out`` if given.

    ``device`` (cpu, cuda, cuda:N; checked first): where calibration, profiling and the factorizations run, the
    weights staying on the CPU (see :func:`run_profile`); recorded as the manifest's ``device``.
    ``manifest["seconds"]``: ``selfgen`` (sampling calibration text from the model), ``calibration`` (the rest of
    the calibration text), ``sensitivity``, ``profile`` (Grams, eigendecompositions, candidates), ``allocate``,
    ``materialize``, ``safeguard`` (the uniform alternative), ``evaluation`` (held-out quality of both), ``save``
    and ``total`` (wall time from ``started``, a ``time.perf_counter()`` value taken when the caller began making
    ``data`` / ``profile`` for this artifact; default: this call). A stage whose result was passed in and made
    before ``started`` (or with no ``started``), or a profile loaded by :func:`load_or_profile`, says
    ``"reused"``, the profile's own seconds kept as ``profile_original``; a stage that did not run is None."""
    from rocket_deploy.devices import resolve_device
    t0 = time.perf_counter() if started is None else started
    device = resolve_device(device)
    if out is not None:     # before the work: never replace what is not ours, the parent must be writable
        from rocket_deploy.safe_io import check_output
        check_output(out, overwrite, "artifact", inputs=[(source or {}).get("directory")])
    seconds: dict[str, Any] = {}
    if data is None and profile is None:
        data = prepare_calibration(tokenizer, calibration, model, progress=progress)
        seconds.update(data.seconds)
    elif data is not None and started is not None:
        seconds.update(data.seconds)
    else:
        seconds.update(selfgen="reused", calibration="reused")
    prof = profile or run_profile(model, tokenizer, config, calibration, data=data, progress=progress, device=device)
    run_info = getattr(prof, "run_info", None) or {"seconds": {"profile": round(prof.seconds, 2)}}
    if profile is None or (started is not None and not getattr(prof, "reused", False)):
        seconds.update(sensitivity=run_info["seconds"].get("sensitivity"), profile=run_info["seconds"].get("profile"))
    else:
        seconds.update(sensitivity="reused", profile="reused", profile_original=dict(run_info["seconds"]))
    if prof.grid.get("dense_only") and config.method != "dense-quant":
        raise ValueError(f"the profile was made for --method dense-quant (dense quantized weights only); method "
                         f"{config.method!r} needs a full profile: profile again with this method")
    if config.method != "dense-quant" and prof.grid.get("quantize") != config.quantize:
        raise ValueError(f"the profile was made with quantize={prof.grid.get('quantize')!r} but the config asks for "
                         f"quantize={config.quantize!r}; profile again with the same quantize setting")
    v_bits = prof.grid.get("quant_v_bits", 8)
    if config.quantize and config.method != "dense-quant" and v_bits != config.quant_v_bits:
        raise ValueError(f"the profile was made with quant_v_bits={v_bits} but the config "
                         f"asks for quant_v_bits={config.quant_v_bits} (its candidates are sized for other V bytes); "
                         f"profile again with the same setting")
    if prof.grid.get("gram_damping", 0.0) != config.gram_damping:
        raise ValueError(f"the profile was made with gram_damping={prof.grid.get('gram_damping', 0.0)!r} but the config "
                         f"asks for gram_damping={config.gram_damping!r}; profile again with the same setting")
    try:
        t = time.perf_counter()
        targets = select_targets(model, config.targets, config.exclude)
        choice, alloc_info = choose_layers(prof, targets, config)
        seconds["allocate"] = round(time.perf_counter() - t, 3)
        seconds.update(materialize=None, safeguard=None, evaluation=None)
        if config.method == "rocket" and config.safeguard and data is not None:
            new_model, records, guard = safeguarded(model, prof, targets, choice, config, data, progress,
                                                    device=device, seconds=seconds)
            alloc_info["safeguard"] = guard
        else:
            t = time.perf_counter()
            new_model, records = materialize(model, prof, choice, config, inplace=inplace, progress=progress,
                                             calib_ids=data.calib.ids if data is not None else None, device=device)
            seconds["materialize"] = round(time.perf_counter() - t, 2)
        manifest = {
            "format_version": artifact_format_version(bool(config.quantize)), "method": config.method, "created_by": f"rocket-deploy {__version__}",
            "storage_dtype": config.storage_dtype, "config": config.to_dict(),
            "budget": {"target_removed_fraction": config.budget, **summarize(records)},
            "allocation": alloc_info, "calibration": prof.calibration, "source": source or {},
            "device": str(device), **({"profile_device": run_info["device"]} if "device" in run_info else {}),
            "layers": records,
        }
        extra = data.extra_files if data is not None else {}
        t = time.perf_counter()
        path = save_artifact(out, new_model, tokenizer, manifest, overwrite=overwrite, extra_files=extra) if out else None
        seconds["save"] = round(time.perf_counter() - t, 2) if out else None
        seconds["total"] = round(time.perf_counter() - t0, 2)
        manifest["seconds"] = _ordered_seconds(seconds)
        if path:
            _record_seconds(path, manifest["seconds"])
        return CompressionResult(new_model, manifest, prof, path)
    finally:
        if profile is None and getattr(prof, "owned", False):
            shutil.rmtree(prof.cache_dir, ignore_errors=True)


STAGES = ("selfgen", "calibration", "sensitivity", "profile", "allocate", "materialize", "safeguard", "evaluation",
          "save")


def _ordered_seconds(seconds: dict) -> dict:
    out = {k: seconds.get(k) for k in STAGES}
    out["total"] = seconds["total"]
    if "profile_original" in seconds:
        out["profile_original"] = seconds["profile_original"]
    return out


def _record_seconds(path: str, seconds: dict) -> None:
    """Put the final ``seconds`` (the save included) into the saved ``rocket.json`` (not among the hashed files)."""
    from rocket_deploy.manifest import MANIFEST
    mpath = os.path.join(path, MANIFEST)
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["seconds"] = seconds
    tmp = f"{mpath}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, mpath)
