"""Profiling: for every target layer, the error and bytes of each (rank, keep) candidate.

Runs the model block by block (see :mod:`.calibration`); for each layer it whitens, computes one
eigendecomposition, evaluates every candidate of the grid in float32, and stores the eigenbasis (float32,
on disk) so that any budget can later be materialised without recalibrating: profile once, allocate many.

``--method dense-quant`` needs none of that: its profile (``grid["dense_only"]``) holds only each layer's dense
weight quantized (:attr:`LayerProfile.dense_option`) and the whitening factors -- no eigendecomposition, no
candidates -- and no ROCKET method reuses it (:func:`profile_mismatch`).

Under ``torchrun`` (:mod:`.distributed`) rank 0 runs the calibration forward passes and broadcasts each block's
whitening factors; the block's layers are shared out among the ranks (:func:`layer_cost`), each rank writes the
eigenbasis files of its layers into the shared ``cache_dir``, and the layer profiles are gathered so that every
rank returns the same :class:`Profile` (docs/architecture.md, "Distributed profiling").
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rocket_deploy.config import RocketConfig
from rocket_deploy.sparse_format import dense_weight_bytes
from rocket_deploy.targets import block_targets, find_blocks

from .calibration import GramAccumulator, block_on, capture_block_inputs, non_blocks_on
from .candidates import candidate_grid
from .distributed import assign, barrier, broadcast, gather, world
from .factorize import Eigenbasis, eigenbasis, factorize, fisher_error
from .whitening import damped_gram, inverse_upper, whitening_factor

PROFILE_VERSION = 1


@dataclasses.dataclass
class LayerOption:
    rank: int
    keep: int
    bytes: int
    params: int
    rel_original: float
    rel_whitened: float
    whitened_sq: float
    fisher: float = 0.0          # sum_j f_j ||S dW_:,j||^2 with f the output sensitivity (0 when not measured)

    @property
    def dense(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class LayerProfile:
    name: str
    d_in: int
    d_out: int
    has_bias: bool
    dense_bytes: int
    group: str
    jitter: float
    z_sq: float                     # ||S W||_F^2 (output energy over the calibration tokens)
    options: list[LayerOption]
    dense_option: LayerOption | None = None   # --quantize: the dense weight quantized (rank 0, measured error)

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out


@dataclasses.dataclass
class Profile:
    layers: dict[str, LayerProfile]
    cache_dir: str
    calibration: dict
    grid: dict
    seconds: float = 0.0

    @property
    def dense_bytes(self) -> int:
        return sum(lp.dense_bytes for lp in self.layers.values())

    @property
    def dense_only(self) -> bool:
        """Made for ``--method dense-quant``: dense quantized options only, no ROCKET candidates."""
        return bool(self.grid.get("dense_only"))

    def eigenbasis(self, name: str, w: torch.Tensor) -> Eigenbasis:
        """Reload a layer's eigenbasis from the cache (float64) given its original weight ``w`` (d_in x d_out).

        A dense-only profile (``--method dense-quant``) computed no eigenbasis: its layers get the whitening
        alone (``w``, ``z = S W``, ``S``, ``S^-1``) with an empty basis (rank 0), all the dense option needs."""
        g = load_file(os.path.join(self.cache_dir, _fname("group." + self.layers[name].group)))
        if self.dense_only:
            s64, w64 = g["s"].double(), w.double()
            z = s64 @ w64
            d_in, d_out = w64.shape
            none = torch.zeros(0, dtype=torch.float64)
            return Eigenbasis(w64, z, s64, g["s_inv"].double(), torch.zeros(d_in, 0, dtype=torch.float64),
                              torch.zeros(0, d_out, dtype=torch.float64), none, none,
                              float(torch.linalg.matrix_norm(w64)), float(torch.linalg.matrix_norm(z)))
        t = load_file(os.path.join(self.cache_dir, _fname(name)))
        basis = t["basis"].double()
        coeffs = t["coeffs"].double()
        w64 = w.double()
        z = basis @ coeffs
        return Eigenbasis(w64, z, g["s"].double(), g["s_inv"].double(), basis, coeffs, t["orig_norms"].double(), t["eigvals"].double(),
                          float(torch.linalg.matrix_norm(w64)), float(torch.linalg.matrix_norm(z)))

    def sensitivity(self, name: str) -> torch.Tensor | None:
        path = os.path.join(self.cache_dir, "sensitivity.safetensors")
        if not os.path.isfile(path):
            return None
        if getattr(self, "_sens", None) is None:
            self._sens = load_file(path)
        return self._sens.get(name)

    def to_json(self) -> dict:
        return {"version": PROFILE_VERSION, "calibration": self.calibration, "grid": self.grid,
                "seconds": self.seconds,
                "layers": {n: dataclasses.asdict(lp) for n, lp in self.layers.items()}}

    def save(self) -> None:
        path = os.path.join(self.cache_dir, "profile.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_json(), f)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, cache_dir: str) -> "Profile":
        with open(os.path.join(cache_dir, "profile.json")) as f:
            d = json.load(f)
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile in {cache_dir} has version {d.get('version')}, expected {PROFILE_VERSION}")
        layers = {}
        for n, lp in d["layers"].items():
            lp["options"] = [LayerOption(**o) for o in lp["options"]]
            if lp.get("dense_option") is not None:
                lp["dense_option"] = LayerOption(**lp["dense_option"])
            layers[n] = LayerProfile(**lp)
        return cls(layers, cache_dir, d["calibration"], d["grid"], d.get("seconds", 0.0))


DENSE_ONLY_KEYS = ("gram_damping", "quantize", "quant_group_size", "quant_method", "quant_act_order")


def profile_grid(config: RocketConfig) -> dict:
    """Every setting that changes what a profile holds (a profile is reusable only for the same grid).
    ``--method dense-quant`` profiles only the dense quantized weights: its grid is ``dense_only`` and the
    settings those depend on (:data:`DENSE_ONLY_KEYS`)."""
    if config.method == "dense-quant":
        full = profile_grid(config.replace(method="rocket"))
        return {"dense_only": True, **{k: full[k] for k in DENSE_ONLY_KEYS}}
    grid = {"byte_fractions": list(config.byte_fractions), "keep_ratios": list(config.keep_ratios),
            "rank_multiple": config.rank_multiple, "importance_lambda": config.importance_lambda,
            "oversparsify": config.oversparsify, "ridge_rel": config.ridge_rel,
            "gram_damping": config.gram_damping}
    if config.quantize:
        grid.update(quantize=config.quantize, quant_group_size=config.quant_group_size,
                    quant_method=config.quant_method, quant_act_order=config.quant_act_order)
        if config.quant_v_bits != 8:        # absent for 8, so profiles made before the option still match
            grid["quant_v_bits"] = config.quant_v_bits
    return grid


def profile_mismatch(profile: "Profile", config: RocketConfig, calibration_info: dict,
                     model_fingerprint: str | None = None, targets=None) -> str | None:
    """Why ``profile`` cannot serve ``config`` on this calibration data (None: it can be reused). When given, the
    model's fingerprint (:func:`rocket_deploy.models.model_fingerprint`) and target layer names must match too."""
    if model_fingerprint is not None and profile.calibration.get("model_fingerprint") != model_fingerprint:
        have = profile.calibration.get("model_fingerprint")
        return (f"it was made from another model (fingerprint {have}, this model {model_fingerprint})" if have
                else "it records no model fingerprint (made by an older rocket-deploy)")
    if targets is not None and sorted(targets) != sorted(profile.layers):
        return "it profiled other layers (--targets / --exclude differ)"
    if profile.calibration.get("calib_sha256_16") != calibration_info.get("calib_sha256_16"):
        return "it was made from other calibration tokens"
    if "sensitivity_samples" in calibration_info and (profile.calibration.get("sensitivity_samples")
                                                       != calibration_info["sensitivity_samples"]):
        return (f"its sensitivity pass used {profile.calibration.get('sensitivity_samples', 'all')} calibration "
                f"sequences, this run asks for {calibration_info['sensitivity_samples']}")
    want, have = profile_grid(config), profile.grid
    if have.get("dense_only") and not want.get("dense_only"):
        return (f"it holds only the dense quantized weights (made for --method dense-quant); method "
                f"{config.method!r} needs the ROCKET candidates")
    if want.get("dense_only") and not have.get("dense_only"):
        have = {k: have.get(k) for k in want if k != "dense_only"}      # a full profile serves dense-quant too
        want = {k: v for k, v in want.items() if k != "dense_only"}
    diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
    if diff:
        return "its grid differs in " + ", ".join(diff)
    return None


def _fname(name: str) -> str:
    return name.replace("/", "_") + ".safetensors"


def weight_in_out(linear: nn.Linear) -> torch.Tensor:
    """The weight as ``d_in x d_out`` (``y = x W``); nn.Linear stores ``d_out x d_in``."""
    return linear.weight.detach().t()


def layer_candidates(d_in: int, d_out: int, config: RocketConfig):
    """The (rank, keep) candidates profiled for a ``d_in x d_out`` layer under ``config``."""
    fractions, bfn = config.byte_fractions, None
    if config.quantize:     # quantized sizes and errors: the knapsack allocates for the quantized model
        from .quant_pipeline import quant_bytes_fn, quant_fractions
        fractions, bfn = quant_fractions(config, d_in, d_out), quant_bytes_fn(config)
    return candidate_grid(d_in, d_out, fractions, config.keep_ratios, config.rank_multiple,
                          **({"bytes_fn": bfn} if bfn else {}))


def profile_layer(name: str, w: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor, config: RocketConfig,
                  cache_dir: str, group: str, sensitivity: torch.Tensor | None = None) -> tuple[list[LayerOption], float]:
    eb = eigenbasis(w, s, s_inv)
    save_file({"basis": eb.basis.float().contiguous(), "coeffs": eb.coeffs.float().contiguous(),
               "orig_norms": eb.orig_norms.float().contiguous(), "eigvals": eb.eigvals.float().contiguous()},
              os.path.join(cache_dir, _fname(name)))
    eb32 = eb.to(torch.float32)
    d_in, d_out = w.shape
    options = []
    if config.quantize:
        from .quant_pipeline import quantized_option
    for cand in layer_candidates(d_in, d_out, config):
        f = factorize(eb32, cand.rank, cand.keep, config.importance_lambda, config.oversparsify, config.ridge_rel)
        if config.quantize:
            options.append(quantized_option(eb32, f, config, sensitivity))
            continue
        options.append(LayerOption(cand.rank, cand.keep, cand.bytes, cand.params,
                                   f.rel_original, f.rel_whitened, f.whitened_sq,
                                   fisher_error(f.col_sq, sensitivity)))
    return options, eb.z_norm ** 2


def layer_cost(d_in: int, d_out: int, dense_only: bool = False) -> float:
    """Relative compute of profiling one layer, to share a block's layers out among ranks: the eigendecomposition
    of the smaller side's Gram (``min(d_in, d_out)`` square: the ``d_out`` side for down_proj-like layers, see
    :func:`~rocket_deploy.compress.factorize.eigenbasis`) plus the candidate grid (~ ``d_in d_out min(d_in, d_out)``);
    dense-only (GPTQ over the inputs) ~ ``d_in^2 d_out``. The 1/8 weight of the eigendecomposition was measured on
    one thread, SmolLM2-135M shapes, default grid (576x192 0.25 s, 576x576 0.77 s, 576x1536 2.6 s)."""
    if dense_only:
        return float(d_in) * d_in * d_out
    m = min(d_in, d_out)
    return float(d_in) * d_out * m + m ** 3 / 8


def _profile_one(name: str, mod: nn.Linear, gname: str, factor, config: RocketConfig, cache_dir: str,
                 sensitivity: torch.Tensor | None, dense_only: bool) -> LayerProfile:
    """One layer's profile from its group's whitening ``factor = (S, S^-1, jitter)``; writes its eigenbasis."""
    s, s_inv, jitter = factor
    dev = torch.device("cpu") if config.quantize else s.device    # eigh + candidates on the Gram's device
    s, s_inv, w = s.to(dev), s_inv.to(dev), weight_in_out(mod).to(dev)
    sensitivity = sensitivity.to(dev) if sensitivity is not None else None
    if dense_only:      # --method dense-quant: the dense quantized option alone, no eigendecomposition
        options = []
        z_sq = float(torch.linalg.matrix_norm(s.to(torch.float64) @ w.to(torch.float64))) ** 2
    else:
        options, z_sq = profile_layer(name, w, s, s_inv, config, cache_dir, gname, sensitivity)
    dense_opt = None
    if config.quantize:
        from .quant_pipeline import quant_dense_option
        dense_opt = quant_dense_option(w, s, config, sensitivity)
    return LayerProfile(name, w.shape[0], w.shape[1], mod.bias is not None,
                        dense_weight_bytes(*w.shape), gname, jitter, z_sq, options, dense_opt)


def _block_factors(block: nn.Module, lin: dict[str, nn.Linear], inputs, config: RocketConfig,
                   cache_dir: str) -> tuple[dict, dict[str, str]]:
    """Run the calibration batches through ``block`` (its outputs become ``inputs.hidden``, the next block's
    inputs: dense propagation), whiten each input group's Gram and write its factors to the cache.
    Returns ``({group: (S, S^-1, jitter)}, {layer: group})``."""
    acc = GramAccumulator(lin)
    with block_on(block, inputs.hidden[0].device), acc:      # this block alone on the calibration device
        outs = []
        for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
            out = block(h, *a, **kw)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
            acc.end_batch()
    factors = {}
    for gname, gram in acc.grams.items():
        # Mean over tokens: the factorization is invariant to the Gram's scale, and errors become per token.
        s, jitter = whitening_factor(damped_gram(gram / acc.tokens[gname], config.gram_damping))   # on the device
        s_inv = inverse_upper(s)
        factors[gname] = (s, s_inv, jitter)
        save_file({"s": s.float().contiguous(), "s_inv": s_inv.float().contiguous()}, os.path.join(cache_dir, _fname("group." + gname)))
    inputs.hidden = outs
    return factors, dict(acc.group_of)


def _check_shared(cache_dir: str, layers: dict[str, LayerProfile], dense_only: bool) -> None:
    """Every rank sees every rank's files (the cache directory is shared), else all ranks stop with one error."""
    names = {_fname("group." + lp.group) for lp in layers.values()}
    if not dense_only:
        names |= {_fname(n) for n in layers}
    missing = sorted(n for n in names if not os.path.isfile(os.path.join(cache_dir, n)))
    if missing:
        raise RuntimeError(f"{missing[0]} (and {len(missing) - 1} more files), written by another rank, is not in "
                           f"{cache_dir}: the ranks must share the profile directory (pass --profile-dir on a "
                           "filesystem that every machine mounts)")


@torch.no_grad()
def profile_model(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: torch.Tensor, config: RocketConfig,
                  cache_dir: str, batch_size: int = 8, device: str | torch.device = "cpu",
                  progress: Callable | None = None, calibration_info: dict | None = None,
                  sensitivity: dict[str, torch.Tensor] | None = None) -> Profile:
    """Calibrate block by block and profile every target layer. ``calib_ids`` is ``[n, seq]`` token ids.

    Under torchrun every rank calls this with the same model and arguments and gets the same Profile; only
    rank 0 runs the model (its ``calib_ids`` and ``sensitivity`` are the ones used) and reports ``progress``,
    and ``cache_dir`` must be one directory that all ranks see (a shared filesystem across machines)."""
    t0 = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    wd = world()
    dense_only = config.method == "dense-quant"
    device = torch.device(device)
    prefix, blocks = find_blocks(model, targets)
    if wd.size > 1:     # rank 0's sensitivities (from its CPU) on every rank
        sent = broadcast({k: v.cpu() for k, v in sensitivity.items()} if wd.main and sensitivity else None)
        sensitivity = sensitivity if wd.main else sent
    if wd.main:
        batches = [calib_ids[i:i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
        with non_blocks_on(model, blocks, device):    # offload: the weights stay on the CPU, see .calibration
            inputs = capture_block_inputs(model, blocks[0], iter(batches), device)
    layers: dict[str, LayerProfile] = {}
    order: list[str] = []
    pending: list[tuple[int, str, int]] = []     # rank 0: other ranks' layers, reported at the next collective
    n_blocks = len(blocks)

    def report(items):
        for bi, name, n in items:
            if progress:
                progress(block=bi, n_blocks=n_blocks, layer=name, n_candidates=n)

    for bi, block in enumerate(blocks):
        lin = block_targets(prefix, bi, targets)
        factors, group_of = _block_factors(block, lin, inputs, config, cache_dir) if wd.main else (None, None)
        if wd.size > 1:     # rank 0's factors, sent from its CPU; the other ranks put them on their own device
            sent = {g: (s.cpu(), s_inv.cpu(), j) for g, (s, s_inv, j) in factors.items()} if wd.main else None
            sent, group_of = broadcast((sent, group_of))
            if not wd.main:
                factors = {g: (s.to(device), s_inv.to(device), j) for g, (s, s_inv, j) in sent.items()}
            report(pending)
            pending = []
        shapes = [tuple(weight_in_out(m).shape) for m in lin.values()]
        owner = assign([layer_cost(*sh, dense_only) for sh in shapes], wd.size)
        for li, (name, mod) in enumerate(lin.items()):
            order.append(name)
            if owner[li] != wd.rank:
                if wd.main:
                    pending.append((bi, name, 1 if dense_only else len(layer_candidates(*shapes[li], config))))
                continue
            gname = group_of[name]
            lp = _profile_one(name, mod, gname, factors[gname], config, cache_dir,
                              sensitivity.get(name) if sensitivity else None, dense_only)
            layers[name] = lp
            if wd.main:
                report([(bi, name, 1 if dense_only else len(lp.options))])
        del factors
    seconds = None
    if wd.size > 1:
        parts = gather(layers)
        merged = {n: lp for part in parts for n, lp in part.items()}
        layers = {n: merged[n] for n in order}
        report(pending)
        seconds = broadcast(time.perf_counter() - t0)
        _check_shared(cache_dir, layers, dense_only)
    grid = profile_grid(config)
    if wd.main:
        if sensitivity:
            save_file({k: v.contiguous() for k, v in sensitivity.items()}, os.path.join(cache_dir, "sensitivity.safetensors"))
    prof = Profile(layers, cache_dir, calibration_info or {}, grid,
                   time.perf_counter() - t0 if seconds is None else seconds)
    if wd.main:
        prof.save()
    barrier()
    return prof
