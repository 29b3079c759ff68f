"""Validation of an exported graph: run it in ONNX Runtime against the torch model.

Decoders: a prefill with an EMPTY past (past length 0) and a decode step that feeds the prefill's present back as
past; encoders: one pass. Per output: max abs difference and max relative difference (``max|onnx - torch| /
max|torch|``), pass / fail against the tolerance of the export dtype. A shape mismatch raises; a tolerance miss is
reported (``passed: False``) and warned about loudly.

``--target trt`` graphs hold ``rocket.RocketSparseVMatMul``, which ONNX Runtime cannot run. They are validated by
lowering a copy of the SAME graph in memory (only those nodes replaced by the standard-op expansion of the ort
target) -- so everything else of the trt graph (attention, KV cache, shapes, dtypes, initializers, the custom
node's inputs and attributes, which the lowering reads) is checked numerically; the plugin's own kernel is checked
by the TensorRT tests against the same numpy reference.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from rocket_deploy.onnx_contract import (ATTENTION_MASK, INPUT_IDS, KV_KINDS, LAST_HIDDEN_STATE, LOGITS, POSITION_IDS,
                                         TOKEN_TYPE_IDS, decoder_io_names, past_name)

TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 2e-2, "rtol": 3e-2}}
# Graphs that quantize activations on purpose (MatMulNBits accuracy_level 4, --int8-compute dynamic): the error is
# the activation rounding itself, not an export bug, and an elementwise bound is the wrong test. Measured on
# SmolLM2-135M int4 artifacts exported at level 4 (the validation inputs below): logits max rel 8.0e-2 (the fp16
# bound fails), logits relative RMS <= 3.5e-2, mean next-token KL <= 4.0e-2 nats, KV cache relative RMS <= 0.144
# (the last layers' values), while held-out perplexity through ONNX Runtime moves by +0.65% / +0.28%
# (docs/quantization.md, "Export"). Such graphs are judged on what the model outputs: logits pass when the mean
# KL divergence of the next-token distributions (torch || onnx, nats) is at most ``kl`` AND their relative RMS
# error ||onnx - torch|| / ||torch|| at most ``logits_rel_rms``; other outputs (KV cache, encoder states) when
# their relative RMS is at most ``rel_rms`` (their error reaches the logits of the same pass anyway; this bound
# catches miswired outputs, which are off by ~1 or more).
ACT_QUANT_TOLERANCE = {"kl": 0.15, "logits_rel_rms": 0.15, "rel_rms": 0.5}
# ORT fuses DequantizeLinear(INT4, blocked) -> MatMul into MatMulNBits with this accuracy level (default 4:
# int8 activations); trt graphs are validated weight-only, as TensorRT computes them.
_ORT_QDQ_NBITS_LEVEL = "session.qdq_matmulnbits_accuracy_level"


class ValidationShapeError(RuntimeError):
    """An exported output has a different shape than the torch model's."""


class ToleranceWarning(UserWarning):
    pass


def ort_session_for(path: str, target: str, threads: int | None = None):
    """An ORT CPU session for an exported file; trt-target graphs are lowered to standard ops in memory."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if target == "trt":
        so.add_session_config_entry(_ORT_QDQ_NBITS_LEVEL, "0")
        import onnx_ir as ir
        from .lowering import lower_rocket_nodes
        import tempfile
        model = ir.load(path)
        lower_rocket_nodes(model, merge="never")
        with tempfile.TemporaryDirectory(prefix="rocket-validate-") as tmp:   # external data: no 2 GB limit
            lowered = os.path.join(tmp, "lowered.onnx")
            ir.save(model, lowered, external_data="lowered.onnx.data")
            return ort.InferenceSession(lowered, so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def next_token_kl(got_logits: np.ndarray, ref_logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(got)) in nats and top-1 agreement over the rows of [..., vocab] logits."""
    g = torch.from_numpy(np.asarray(got_logits, dtype=np.float64)).reshape(-1, got_logits.shape[-1])
    r = torch.from_numpy(np.asarray(ref_logits, dtype=np.float64)).reshape(-1, ref_logits.shape[-1])
    lg, lr = torch.log_softmax(g, -1), torch.log_softmax(r, -1)
    kl = (lr.exp() * (lr - lg)).sum(-1)
    return float(kl.mean()), float((g.argmax(-1) == r.argmax(-1)).double().mean())


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: dict, act_quant: bool = False) -> dict[str, Any]:
    """Elementwise comparison (max abs / max rel / rel RMS); with ``act_quant`` the pass test is the
    distribution-level one of :data:`ACT_QUANT_TOLERANCE` (KL for logits, rel RMS otherwise)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise ValidationShapeError(f"output {name!r}: ONNX shape {tuple(got.shape)} != torch shape {tuple(ref.shape)}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    if g.size == 0:
        return {"output": name, "shape": list(got.shape), "max_abs": 0.0, "max_rel": 0.0, "rel_rms": 0.0,
                "passed": True}
    diff = float(np.max(np.abs(g - r)))
    scale = float(np.max(np.abs(r)))
    rel_rms = float(np.linalg.norm(g - r) / max(float(np.linalg.norm(r)), 1e-30))
    finite = bool(np.isfinite(g).all())
    res = {"output": name, "shape": list(got.shape), "max_abs": diff, "max_rel": diff / max(scale, 1e-30),
           "rel_rms": rel_rms}
    if not act_quant:
        res["passed"] = finite and diff <= tol["atol"] + tol["rtol"] * scale
    elif name == LOGITS:
        res["kl"], res["top1"] = next_token_kl(g, r) if finite else (float("inf"), 0.0)
        res["passed"] = finite and res["kl"] <= tol["kl"] and rel_rms <= tol["logits_rel_rms"]
    else:
        res["passed"] = finite and rel_rms <= tol["rel_rms"]
    return res


@torch.no_grad()
def validate_export(path: str, model: torch.nn.Module, *, target: str = "ort", dtype: str = "fp32",
                    batch: int = 2, prompt_len: int = 7, seed: int = 0, session=None,
                    act_quant: bool = False) -> dict[str, Any]:
    """Compare the exported graph at ``path`` with ``model`` (fp32 torch). Returns the report dict.
    ``act_quant``: the graph quantizes activations on purpose (int4 MatMulNBits accuracy_level 4, dynamic int8):
    judged by :data:`ACT_QUANT_TOLERANCE` (next-token KL, relative RMS) instead of the dtype's elementwise bound."""
    from .graph_io import decoder_geometry, is_decoder_model
    tol = dict(ACT_QUANT_TOLERANCE) if act_quant else TOLERANCES[dtype]
    sess = session or ort_session_for(path, target)
    model = model.eval() if next(model.parameters()).dtype == torch.float32 else model.eval().float()
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(4, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.int64)
    if batch > 1:
        mask[1, :2] = 0            # left padding in the second row
    in_types = {i.name: i.type for i in sess.get_inputs()}
    fdt = np.float16 if any("float16" in t for t in in_types.values()) else np.float32
    steps: list[dict[str, Any]] = []
    if not is_decoder_model(model):
        feeds, kw = {INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy()}, {}
        if TOKEN_TYPE_IDS in in_types:      # BERT-style: random segments, so the token-type path is checked too
            n_types = int(getattr(model.config, "type_vocab_size", 1) or 1)
            kw[TOKEN_TYPE_IDS] = torch.randint(0, n_types, ids.shape, generator=g)
            feeds[TOKEN_TYPE_IDS] = kw[TOKEN_TYPE_IDS].numpy()
        ref = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        got = sess.run([LAST_HIDDEN_STATE], feeds)[0]
        valid = mask.bool().numpy()   # padded positions are not defined outputs
        steps.append({"step": "encode", "outputs": [compare(LAST_HIDDEN_STATE, got[valid], ref.numpy()[valid], tol,
                                                           act_quant)]})
    else:
        n, kv, hd = decoder_geometry(model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        pos = torch.where(mask.bool(), pos, torch.ones_like(pos))
        feeds = {INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy(), POSITION_IDS: pos.numpy()}
        for i in range(n):
            for k in KV_KINDS:
                feeds[past_name(i, k)] = np.zeros((batch, kv, 0, hd), dtype=fdt)
        from transformers import DynamicCache

        from rocket_deploy.hf_compat import cache_kwarg
        arg = cache_kwarg(model)   # torch-side keyword only; the graph keeps the past_key_values.* names
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{arg: DynamicCache(config=model.config)})
        past = getattr(out, arg)
        names = decoder_io_names(n)[1]                  # logits, present.{i}.key / .value
        got = sess.run(names, feeds)
        refs = [out.logits] + [t for layer in past.layers for t in (layer.keys, layer.values)]
        steps.append({"step": "prefill (empty past)",
                      "outputs": _compare_all(names, got, refs, tol, mask, act_quant)})
        # decode step: feed the torch present back as past to both (isolates one step's error)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
        pos2 = pos[:, -1:] + 1
        feeds = {INPUT_IDS: nxt.numpy(), ATTENTION_MASK: mask2.numpy(), POSITION_IDS: pos2.numpy()}
        for i, layer in enumerate(past.layers):
            feeds[past_name(i, KV_KINDS[0])] = layer.keys.numpy().astype(fdt)
            feeds[past_name(i, KV_KINDS[1])] = layer.values.numpy().astype(fdt)
        out2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, use_cache=True, **{arg: past})
        got2 = sess.run(names, feeds)
        refs2 = [out2.logits] + [t for layer in getattr(out2, arg).layers for t in (layer.keys, layer.values)]
        steps.append({"step": f"decode (past {prompt_len})", "outputs": _compare_all(names, got2, refs2, tol, mask2, act_quant)})
    passed = all(o["passed"] for s in steps for o in s["outputs"])
    report = {"target": target, "dtype": dtype, "tolerance": tol, "passed": passed, "steps": steps,
              "activations_quantized": bool(act_quant),
              "validated_graph": "lowered copy of the trt graph (RocketSparseVMatMul -> standard ops)"
              if target == "trt" else "the exported file"}
    if not passed:
        failed = [o for s in steps for o in s["outputs"] if not o["passed"]]
        worst = max(failed, key=lambda o: o["max_rel"])
        what = (f"next-token KL {worst['kl']:.3g} nats" if "kl" in worst else f"rel RMS {worst['rel_rms']:.3g}") \
            if act_quant else f"max rel {worst['max_rel']:.3g}"
        warnings.warn(f"EXPORT VALIDATION FAILED: {worst['output']} differs from torch by {worst['max_abs']:.3g} "
                      f"({what}), above the {'quantized-activation' if act_quant else dtype} tolerance {tol}",
                      ToleranceWarning, stacklevel=2)
    return report


def _compare_all(names, got, refs, tol, mask, act_quant=False) -> list[dict]:
    res = []
    valid = mask.bool().numpy()
    for name, gv, rv in zip(names, got, refs):
        rv = rv.float().numpy()
        if name == LOGITS:              # logits at padded positions are undefined
            q = valid[:, -gv.shape[1]:]
            if gv.shape != rv.shape:
                raise ValidationShapeError(f"output 'logits': ONNX shape {gv.shape} != torch shape {rv.shape}")
            res.append(compare(name, gv[q], rv[q], tol, act_quant))
        else:                           # keys / values at padded positions are computed but masked out later
            if gv.shape != rv.shape:
                raise ValidationShapeError(f"output {name!r}: ONNX shape {gv.shape} != torch shape {rv.shape}")
            q = valid[:, -gv.shape[2]:]
            res.append(compare(name, gv.transpose(0, 2, 1, 3)[q], rv.transpose(0, 2, 1, 3)[q], tol, act_quant))
        res[-1]["shape"] = list(gv.shape)
    return res


def format_report(report: dict[str, Any]) -> str:
    from rocket_deploy.report import format_table
    aq = bool(report.get("activations_quantized"))
    rows = []
    for s in report["steps"]:
        for o in s["outputs"]:
            row = [s["step"], o["output"], "x".join(map(str, o["shape"])), o["max_abs"], o["max_rel"]]
            if aq:
                row += [o.get("rel_rms", ""), o.get("kl", ""), o.get("top1", "")]
            rows.append(row + ["pass" if o["passed"] else "FAIL"])
    if len(rows) > 12:   # many KV outputs: keep logits and the worst cache entries per step
        rows = [r for r in rows if r[1] in (LOGITS, LAST_HIDDEN_STATE)] + \
               sorted([r for r in rows if r[1] not in (LOGITS, LAST_HIDDEN_STATE)], key=lambda r: -r[4])[:4]
    tol = report["tolerance"]
    if aq:
        rule = (f"{report['dtype']}, quantized activations: logits next-token KL <= {tol['kl']} nats and rel RMS <= "
                f"{tol['logits_rel_rms']}, other outputs rel RMS <= {tol['rel_rms']}")
    else:
        rule = f"{report['dtype']} tolerance atol={tol['atol']} rtol={tol['rtol']}"
    head = f"validation ({report['validated_graph']}; {rule}): {'PASSED' if report['passed'] else 'FAILED'}"
    cols = ["step", "output", "shape", "max abs", "max rel"] + (["rel RMS", "KL", "top-1"] if aq else []) + ["result"]
    return head + "\n" + format_table(cols, rows)
