"""Healing: a short distillation of a compressed model from its dense model with the sparsity masks FIXED.

Only U and V's kept values of every factorized layer train (AdamW, warmup + cosine / linear decay, gradient
clipping); everything else is frozen. The loss is KL(dense || student) of the next-token distributions, plus
optionally ``hidden_mse`` x the relative MSE of the last hidden state. Quantized layers cannot train (their codes
are integers): :func:`heal_artifact` refuses quantized artifacts -- heal the fp16 artifact instead.

Sections: MATH (trainable layer, loss, schedule) -- STATE (the training loop, resumable checkpoints) -- I/O
(artifact in, artifact out).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HealConfig
from ..rocket_linear import RocketLinear
from ..sparse_format import pack_bits, unpack_bits
from ..targets import set_module


class HealError(ValueError):
    """The artifact or checkpoint cannot be healed / resumed; the message names the problem and the fix."""


# ---------------------------------------------------------------- MATH
class TrainableRocket(nn.Module):
    """A RocketLinear whose U and kept V values are parameters; the support of V (``rows``: d_out x k row
    indices, increasing, the packed order of :mod:`rocket_deploy.sparse_format`) is fixed."""

    def __init__(self, mod: RocketLinear):
        super().__init__()
        self.rank = mod.rank
        self.u = nn.Parameter(mod.u.detach().float().clone())
        self.v_values = nn.Parameter(mod.v_values.detach().float().clone())
        kept = unpack_bits(mod.v_mask.cpu(), mod.rank)                     # d_out x r, bool
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :mod.keep]
        self.register_buffer("rows", order.to(mod.u.device))
        self.register_buffer("bias", None if mod.bias is None else mod.bias.detach().float().clone())

    def dense_v(self) -> torch.Tensor:
        vt = torch.zeros(self.rows.shape[0], self.rank, dtype=self.v_values.dtype, device=self.v_values.device)
        return vt.scatter(1, self.rows, self.v_values).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.to(self.u.dtype) @ self.u) @ self.dense_v()
        return y if self.bias is None else y + self.bias

    def to_rocket(self) -> RocketLinear:
        d_in, d_out, k = self.u.shape[0], self.rows.shape[0], self.rows.shape[1]
        mod = RocketLinear(d_in, d_out, self.rank, k, bias=self.bias is not None)
        kept = torch.zeros(d_out, self.rank, dtype=torch.bool).scatter_(1, self.rows.cpu(), True)
        mod.load_packed(self.u.detach().cpu(), self.v_values.detach().cpu(),
                        None if k == self.rank else pack_bits(kept), None if self.bias is None else self.bias.cpu())
        return mod


def make_trainable(model: nn.Module) -> dict[str, TrainableRocket]:
    """Swap every RocketLinear of ``model`` for a :class:`TrainableRocket`; freeze every other tensor."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, RocketLinear)]
    layers = {}
    for n in names:
        layers[n] = TrainableRocket(model.get_submodule(n))
        set_module(model, n, layers[n])
    return layers


def restore_rocket(model: nn.Module, layers: dict[str, TrainableRocket]) -> None:
    for n, t in layers.items():
        set_module(model, n, t.to_rocket())


def distill_loss(student_logits, teacher_logits, student_hidden=None, teacher_hidden=None,
                 hidden_mse: float = 0.0) -> tuple[torch.Tensor, float]:
    """(loss, KL part): mean over positions of KL(teacher || student) in nats, + ``hidden_mse`` x
    ||h_s - h_t||^2 / ||h_t||^2 of the last hidden state."""
    ls = F.log_softmax(student_logits.float(), dim=-1)
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    loss = kl
    if hidden_mse and student_hidden is not None:
        loss = loss + hidden_mse * (student_hidden - teacher_hidden).pow(2).sum() / teacher_hidden.pow(2).sum().clamp_min(1e-12)
    return loss, float(kl.detach())


def lr_factor(step: int, cfg: HealConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warmup, then cosine / linear decay to 0 / constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t


# ---------------------------------------------------------------- STATE
def _checkpoint_state(step, layers, opt, gen, losses, cfg, key, seconds) -> dict:
    # saved synchronously by torch.save: the live tensors need no copy (a copy would double the optimizer's memory)
    return {"step": step, "key": key, "config": cfg.to_dict(), "losses": list(losses), "seconds": seconds,
            "params": {n: {"u": t.u.detach(), "v_values": t.v_values.detach()} for n, t in layers.items()},
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: written beside ``path`` and renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: HealConfig, key: str) -> dict:
    if not os.path.isfile(path):
        raise HealError(f"--resume: no checkpoint at {path}; run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for damaged files
        raise HealError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); delete it and "
                        f"run without --resume") from None
    if not isinstance(state, dict) or state.get("key") != key or state.get("config") != cfg.to_dict():
        was = state.get("config") if isinstance(state, dict) else None
        raise HealError(f"--resume: {path} was written for another artifact or heal settings ({was}); use the "
                        f"same options or run without --resume")
    return state


def training_chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Calibration chunks ``ids`` ([n, L]) cut into ``[n * (L // seq_len), seq_len]`` training sequences (no token
    dropped but a chunk's tail shorter than ``seq_len``); chunks already at most ``seq_len`` long stay as they are."""
    n, length = ids.shape
    if length <= seq_len:
        return ids.contiguous()
    per = length // seq_len
    return ids[:, :per * seq_len].reshape(n * per, seq_len).contiguous()


def heal_model(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: HealConfig, *,
               checkpoint: str | None = None, resume: bool = False, key: str = "",
               progress: bool = True, stop_after: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Distil ``student`` (holding RocketLinear layers) from ``teacher`` on token chunks ``ids`` ([n, seq]) for
    ``cfg.steps`` steps, in place. Checkpoints every ``cfg.checkpoint_every`` steps to ``checkpoint``;
    ``resume`` continues from it. ``stop_after`` ends early after that step (tests: an interrupted run).
    Returns ``{"losses": [...], "steps": n, "tokens": n, "seconds": s, "tokens_per_step": t, "sequences": m}``
    (``seconds``: training time summed over the interrupted and resumed runs)."""
    from tqdm.auto import tqdm
    ids = training_chunks(ids, cfg.seq_len)
    state = load_checkpoint(checkpoint, cfg, key) if resume else None     # before the model is touched
    layers = make_trainable(student)
    if not layers:
        raise HealError("the model has no factorized (RocketLinear) layer to heal; pass a ROCKET artifact")
    params = [p for t in layers.values() for p in (t.u, t.v_values)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start, before = 0, 0.0
    if state is not None:
        with torch.no_grad():
            for n, t in layers.items():
                t.u.copy_(state["params"][n]["u"])
                t.v_values.copy_(state["params"][n]["v_values"])
        opt.load_state_dict(state["optimizer"])
        start, losses, before = state["step"], list(state["losses"]), float(state.get("seconds", 0.0))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg), last_epoch=start - 1)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if log:
            log(f"resumed from {checkpoint} at step {start}")
    student.eval()
    teacher.eval()
    want_hidden = cfg.hidden_mse > 0
    tokens_per_step = cfg.batch_size * ids.shape[1]
    bar = tqdm(total=cfg.steps, initial=start, desc="heal", unit="step", disable=not progress)
    t0, saved = time.perf_counter(), {"step": start if resume else None}
    try:
        _train(student, teacher, ids, cfg, layers, params, opt, sched, gen, losses, bar, start, t0, before,
               checkpoint, key, want_hidden, tokens_per_step, stop_after, saved)
    except KeyboardInterrupt:
        if log and saved["step"] is not None:
            log(f"interrupted; {checkpoint} holds step {saved['step']}: rerun with the same options and --resume")
        raise
    finally:
        bar.close()
    seconds = before + time.perf_counter() - t0
    restore_rocket(student, layers)
    n = len(losses)
    return {"losses": losses, "steps": n, "tokens": n * tokens_per_step, "seconds": round(seconds, 2),
            "tokens_per_step": tokens_per_step, "sequences": int(ids.shape[0])}


def _train(student, teacher, ids, cfg, layers, params, opt, sched, gen, losses, bar, start, t0, before,
           checkpoint, key, want_hidden, tokens_per_step, stop_after, saved) -> None:
    for step in range(start, cfg.steps):
        rows = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen)
        x = ids[rows]
        mask = torch.ones_like(x)
        with torch.no_grad():
            tout = teacher(input_ids=x, attention_mask=mask, output_hidden_states=want_hidden)
        sout = student(input_ids=x, attention_mask=mask, output_hidden_states=want_hidden)
        loss, kl = distill_loss(sout.logits, tout.logits, sout.hidden_states[-1] if want_hidden else None,
                                tout.hidden_states[-1] if want_hidden else None, cfg.hidden_mse)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(round(float(loss.detach()), 6))
        done = step + 1
        el = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", kl=f"{kl:.4f}",
                        tok_s=f"{tokens_per_step * (done - start) / max(el, 1e-9):.0f}")
        if checkpoint and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(checkpoint, _checkpoint_state(done, layers, opt, gen, losses, cfg, key,
                                                          before + el))
            saved["step"] = done
        if stop_after is not None and done >= stop_after:
            break


# ---------------------------------------------------------------- I/O
def check_healable(manifest: dict[str, Any], path: str) -> None:
    quant = sorted(n for n, r in manifest["layers"].items() if r.get("quant"))
    if quant:
        raise HealError(f"{path!r} is quantized ({len(quant)} layers, e.g. {quant[0]!r}): integer codes cannot be "
                        f"trained; heal an fp16 artifact instead (compress without --quantize)")
    if not any(r["kind"] == "rocket" for r in manifest["layers"].values()):
        raise HealError(f"{path!r} has no factorized layer (method {manifest.get('method')!r}); nothing to heal")


def heal_artifact(artifact: str, out: str, cfg: HealConfig, calibration=None, *, dense_spec: str | None = None,
                  resume: bool = False, overwrite: bool = False, progress: bool = True, verify: bool = True,
                  trust_remote_code: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Heal the artifact at ``artifact`` into a new artifact ``out`` (atomic; ``rd.load``, eval, export read it
    unchanged). ``calibration``: a CalibrationConfig (default: the artifact's own); its seed and held-out fraction
    must be the artifact's, so training reads only calibration documents and eval's held-out documents stay
    unseen. Sources healing adds are recorded as calibration sources of ``out`` (eval then holds their documents
    out too, and never counts them as never-calibrated). The dense teacher is the artifact's source model (or
    ``dense_spec``), checked by fingerprint. The checkpoint ``<out>.heal-checkpoint.pt`` is removed once ``out``
    is written."""
    from ..artifact import load_artifact, read_manifest, save_artifact
    from ..config import CalibrationConfig
    from ..models import check_same_model, dense_source, load_model
    from ..safe_io import check_output
    from .pipeline import prepare_calibration
    manifest = read_manifest(artifact)
    if os.path.realpath(out) == os.path.realpath(artifact):
        raise HealError(f"--out {out} is the input artifact; healing writes a new artifact: choose another --out")
    check_healable(manifest, artifact)
    own = CalibrationConfig.from_dict(manifest["calibration"]["config"])
    cal = calibration or own
    if (cal.seed, cal.heldout_fraction) != (own.seed, own.heldout_fraction):
        raise HealError(f"the healing calibration must split documents like {artifact!r} (seed {own.seed}, held-out "
                        f"fraction {own.heldout_fraction}), else it would train on eval's held-out documents")
    src = dense_spec or dense_source(manifest, artifact)
    check_output(out, overwrite, kind="artifact", inputs=[artifact])
    ckpt = os.path.abspath(out).rstrip(os.sep) + ".heal-checkpoint.pt"
    if not resume and os.path.isfile(ckpt) and log:
        log(f"note: {ckpt} is left from an earlier run; starting afresh (pass --resume to continue it)")
    model, tokenizer, manifest = load_artifact(artifact, verify=verify, trust_remote_code=trust_remote_code,
                                               need_tokenizer=True)
    dense = load_model(src, trust_remote_code=trust_remote_code)
    check_same_model(manifest, dense, artifact)     # never distil from another model than the one compressed
    cal = CalibrationConfig.from_dict({**cal.to_dict(), "seq_len": max(cal.seq_len, cfg.seq_len)})
    data = prepare_calibration(tokenizer, cal, dense.model)
    key = f"{(manifest.get('files') or {}).get('factors.safetensors', {}).get('sha256', '')}:{data.info['calib_sha256_16']}"
    result = heal_model(model, dense.model, data.calib.ids, cfg, checkpoint=ckpt, resume=resume, key=key,
                        progress=progress, log=log)
    record = {"config": cfg.to_dict(), "from_artifact": os.path.abspath(artifact),
              "calibration": {k: data.info[k] for k in ("config", "calib_samples", "calib_sha256_16")},
              "sequences": result["sequences"], "steps": result["steps"], "tokens": result["tokens"],
              "seconds": result["seconds"], "loss_first": result["losses"][0], "loss_last": result["losses"][-1],
              "loss_curve": result["losses"]}
    if manifest.get("heal"):        # healing a healed artifact: keep the chain (without the older loss curves)
        record["previous"] = {k: v for k, v in manifest["heal"].items() if k != "loss_curve"}
    new = {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version", "tied",
                                                          "architecture", "architecture_kwargs")}
    added = [s for s in cal.sources if s not in own.sources]
    if added:                       # eval holds these sources' documents out and never calls them never-calibrated
        new["calibration"] = {**manifest["calibration"],
                              "config": {**manifest["calibration"]["config"], "sources": [*own.sources, *added]},
                              "heal_added_sources": added}
    new["heal"] = record
    extra = {}
    for name in os.listdir(artifact):
        if name.startswith("calibration-") and name.endswith(".jsonl"):
            with open(os.path.join(artifact, name)) as f:
                extra[name] = f.read()
    save_artifact(out, model, tokenizer, new, overwrite=overwrite, extra_files=extra)
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return record
