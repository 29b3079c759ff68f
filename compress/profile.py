"""Profiling: for every target layer, the error and bytes of each (rank, keep) candidate.

Runs the model block by block (see :mod:`.calibration`); for each layer it whitens, computes one
eigendecomposition, evaluates every candidate of the grid in float32, and stores the eigenbasis (float32,
on disk) so that any budget can later be materialised without recalibrating: profile once, allocate many.
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

from .calibration import GramAccumulator, capture_block_inputs
from .candidates import candidate_grid
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

    def eigenbasis(self, name: str, w: torch.Tensor) -> Eigenbasis:
        """Reload a layer's eigenbasis from the cache (float64) given its original weight ``w`` (d_in x d_out)."""
        t = load_file(os.path.join(self.cache_dir, _fname(name)))
        g = load_file(os.path.join(self.cache_dir, _fname("group." + self.layers[name].group)))
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


def profile_grid(config: RocketConfig) -> dict:
    """Every setting that changes what a profile holds (a profile is reusable only for the same grid)."""
    grid = {"byte_fractions": list(config.byte_fractions), "keep_ratios": list(config.keep_ratios),
            "rank_multiple": config.rank_multiple, "importance_lambda": config.importance_lambda,
            "oversparsify": config.oversparsify, "ridge_rel": config.ridge_rel,
            "gram_damping": config.gram_damping}
    if config.quantize:
        grid.update(quantize=config.quantize, quant_group_size=config.quant_group_size,
                    quant_method=config.quant_method, quant_act_order=config.quant_act_order)
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
    want, have = profile_grid(config), profile.grid
    diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
    if diff:
        return "its grid differs in " + ", ".join(diff)
    return None


def _fname(name: str) -> str:
    return name.replace("/", "_") + ".safetensors"


def weight_in_out(linear: nn.Linear) -> torch.Tensor:
    """The weight as ``d_in x d_out`` (``y = x W``); nn.Linear stores ``d_out x d_in``."""
    return linear.weight.detach().t()


def profile_layer(name: str, w: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor, config: RocketConfig,
                  cache_dir: str, group: str, sensitivity: torch.Tensor | None = None) -> tuple[list[LayerOption], float]:
    eb = eigenbasis(w, s, s_inv)
    save_file({"basis": eb.basis.float().contiguous(), "coeffs": eb.coeffs.float().contiguous(),
               "orig_norms": eb.orig_norms.float().contiguous(), "eigvals": eb.eigvals.float().contiguous()},
              os.path.join(cache_dir, _fname(name)))
    eb32 = eb.to(torch.float32)
    d_in, d_out = w.shape
    options = []
    fractions, bfn = config.byte_fractions, None
    if config.quantize:     # quantized sizes and errors: the knapsack allocates for the quantized model
        from .quant_pipeline import quant_bytes_fn, quant_fractions, quantized_option
        fractions, bfn = quant_fractions(config, d_in, d_out), quant_bytes_fn(config)
    for cand in candidate_grid(d_in, d_out, fractions, config.keep_ratios, config.rank_multiple,
                               **({"bytes_fn": bfn} if bfn else {})):
        f = factorize(eb32, cand.rank, cand.keep, config.importance_lambda, config.oversparsify, config.ridge_rel)
        if config.quantize:
            options.append(quantized_option(eb32, f, config, sensitivity))
            continue
        options.append(LayerOption(cand.rank, cand.keep, cand.bytes, cand.params,
                                   f.rel_original, f.rel_whitened, f.whitened_sq,
                                   fisher_error(f.col_sq, sensitivity)))
    return options, eb.z_norm ** 2


@torch.no_grad()
def profile_model(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: torch.Tensor, config: RocketConfig,
                  cache_dir: str, batch_size: int = 8, device: str | torch.device = "cpu",
                  progress: Callable | None = None, calibration_info: dict | None = None,
                  sensitivity: dict[str, torch.Tensor] | None = None) -> Profile:
    """Calibrate block by block and profile every target layer. ``calib_ids`` is ``[n, seq]`` token ids."""
    t0 = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    device = torch.device(device)
    prefix, blocks = find_blocks(model, targets)
    batches = [calib_ids[i:i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
    model.to(device)
    inputs = capture_block_inputs(model, blocks[0], iter(batches), device)
    layers: dict[str, LayerProfile] = {}
    n_blocks = len(blocks)
    for bi, block in enumerate(blocks):
        lin = block_targets(prefix, bi, targets)
        acc = GramAccumulator(lin)
        with acc:
            outs = []
            for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
                out = block(h, *a, **kw)
                outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
                acc.end_batch()
        factors = {}
        for gname, gram in acc.grams.items():
            # Mean over tokens: the factorization is invariant to the Gram's scale, and errors become per token.
            s, jitter = whitening_factor(damped_gram(gram.cpu() / acc.tokens[gname], config.gram_damping))
            s_inv = inverse_upper(s)
            factors[gname] = (s, s_inv, jitter)
            save_file({"s": s.float().contiguous(), "s_inv": s_inv.float().contiguous()}, os.path.join(cache_dir, _fname("group." + gname)))
        for li, (name, mod) in enumerate(lin.items()):
            gname = acc.group_of[name]
            s, s_inv, jitter = factors[gname]
            w = weight_in_out(mod).cpu()
            options, z_sq = profile_layer(name, w, s, s_inv, config, cache_dir, gname,
                                          sensitivity.get(name) if sensitivity else None)
            dense_opt = None
            if config.quantize:
                from .quant_pipeline import quant_dense_option
                dense_opt = quant_dense_option(w, s, config, sensitivity.get(name) if sensitivity else None)
            layers[name] = LayerProfile(name, w.shape[0], w.shape[1], mod.bias is not None,
                                        dense_weight_bytes(*w.shape), gname, jitter, z_sq, options, dense_opt)
            if progress:
                progress(block=bi, n_blocks=n_blocks, layer=name, n_candidates=len(options))
        inputs.hidden = outs     # dense propagation: the next block sees the original model's activations
        del acc, factors
    grid = profile_grid(config)
    if sensitivity:
        save_file({k: v.contiguous() for k, v in sensitivity.items()}, os.path.join(cache_dir, "sensitivity.safetensors"))
    prof = Profile(layers, cache_dir, calibration_info or {}, grid, time.perf_counter() - t0)
    prof.save()
    return prof
