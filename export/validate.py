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

TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 2e-2, "rtol": 3e-2}}
# Graphs that quantize activations on purpose (MatMulNBits accuracy_level 4, --int8-compute dynamic): the error is
# the activation rounding itself, not an export bug. Measured (docs/quantization.md, "Export"; tiny random Llama,
# 3 seeds): max |diff| / max |torch| <= 5.3e-3 on the logits and <= 1.1e-2 on the KV cache; one layer of SmolLM2's
# shape: 0.6% (1.6% with outlier channels). The fp16 tolerance, about 2x the worst measured, is used for them.
ACT_QUANT_TOLERANCE = {"atol": 2e-2, "rtol": 3e-2}
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


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: dict) -> dict[str, Any]:
    if tuple(got.shape) != tuple(ref.shape):
        raise ValidationShapeError(f"output {name!r}: ONNX shape {tuple(got.shape)} != torch shape {tuple(ref.shape)}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    if g.size == 0:
        return {"output": name, "shape": list(got.shape), "max_abs": 0.0, "max_rel": 0.0, "passed": True}
    diff = float(np.max(np.abs(g - r)))
    scale = float(np.max(np.abs(r)))
    ok = bool(np.isfinite(g).all()) and diff <= tol["atol"] + tol["rtol"] * scale
    return {"output": name, "shape": list(got.shape), "max_abs": diff, "max_rel": diff / max(scale, 1e-30),
            "passed": ok}


@torch.no_grad()
def validate_export(path: str, model: torch.nn.Module, *, target: str = "ort", dtype: str = "fp32",
                    batch: int = 2, prompt_len: int = 7, seed: int = 0, session=None,
                    act_quant: bool = False) -> dict[str, Any]:
    """Compare the exported graph at ``path`` with ``model`` (fp32 torch). Returns the report dict.
    ``act_quant``: the graph quantizes activations on purpose (int4 MatMulNBits accuracy_level 4, dynamic int8):
    compared against :data:`ACT_QUANT_TOLERANCE` (or the dtype's, whichever is looser)."""
    from .onnx_export import decoder_geometry, is_decoder_model
    tol = TOLERANCES[dtype]
    if act_quant:
        tol = {k: max(tol[k], ACT_QUANT_TOLERANCE[k]) for k in tol}
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
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = sess.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        valid = mask.bool().numpy()   # padded positions are not defined outputs
        steps.append({"step": "encode", "outputs": [compare("last_hidden_state", got[valid], ref.numpy()[valid], tol)]})
    else:
        n, kv, hd = decoder_geometry(model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        pos = torch.where(mask.bool(), pos, torch.ones_like(pos))
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for i in range(n):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.zeros((batch, kv, 0, hd), dtype=fdt)
        from transformers import DynamicCache

        from rocket_deploy.hf_compat import cache_kwarg
        arg = cache_kwarg(model)   # torch-side keyword only; the graph keeps the past_key_values.* names
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{arg: DynamicCache(config=model.config)})
        past = getattr(out, arg)
        names = ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
        got = sess.run(names, feeds)
        refs = [out.logits] + [t for layer in past.layers for t in (layer.keys, layer.values)]
        steps.append({"step": "prefill (empty past)",
                      "outputs": _compare_all(names, got, refs, tol, mask)})
        # decode step: feed the torch present back as past to both (isolates one step's error)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
        pos2 = pos[:, -1:] + 1
        feeds = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy()}
        for i, layer in enumerate(past.layers):
            feeds[f"past_key_values.{i}.key"] = layer.keys.numpy().astype(fdt)
            feeds[f"past_key_values.{i}.value"] = layer.values.numpy().astype(fdt)
        out2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, use_cache=True, **{arg: past})
        got2 = sess.run(names, feeds)
        refs2 = [out2.logits] + [t for layer in getattr(out2, arg).layers for t in (layer.keys, layer.values)]
        steps.append({"step": f"decode (past {prompt_len})", "outputs": _compare_all(names, got2, refs2, tol, mask2)})
    passed = all(o["passed"] for s in steps for o in s["outputs"])
    report = {"target": target, "dtype": dtype, "tolerance": tol, "passed": passed, "steps": steps,
              "activations_quantized": bool(act_quant),
              "validated_graph": "lowered copy of the trt graph (RocketSparseVMatMul -> standard ops)"
              if target == "trt" else "the exported file"}
    if not passed:
        worst = max((o for s in steps for o in s["outputs"]), key=lambda o: o["max_rel"])
        warnings.warn(f"EXPORT VALIDATION FAILED: {worst['output']} differs from torch by {worst['max_abs']:.3g} "
                      f"(max rel {worst['max_rel']:.3g}), above the {dtype} tolerance {tol}", ToleranceWarning,
                      stacklevel=2)
    return report


def _compare_all(names, got, refs, tol, mask) -> list[dict]:
    res = []
    valid = mask.bool().numpy()
    for name, gv, rv in zip(names, got, refs):
        rv = rv.float().numpy()
        if name == "logits":            # logits at padded positions are undefined
            q = valid[:, -gv.shape[1]:]
            if gv.shape != rv.shape:
                raise ValidationShapeError(f"output 'logits': ONNX shape {gv.shape} != torch shape {rv.shape}")
            res.append(compare(name, gv[q], rv[q], tol))
        else:                           # keys / values at padded positions are computed but masked out later
            if gv.shape != rv.shape:
                raise ValidationShapeError(f"output {name!r}: ONNX shape {gv.shape} != torch shape {rv.shape}")
            q = valid[:, -gv.shape[2]:]
            res.append(compare(name, gv.transpose(0, 2, 1, 3)[q], rv.transpose(0, 2, 1, 3)[q], tol))
        res[-1]["shape"] = list(gv.shape)
    return res


def format_report(report: dict[str, Any]) -> str:
    from rocket_deploy.commands._common import format_table
    rows = []
    for s in report["steps"]:
        for o in s["outputs"]:
            rows.append([s["step"], o["output"], "x".join(map(str, o["shape"])), o["max_abs"], o["max_rel"],
                         "pass" if o["passed"] else "FAIL"])
    if len(rows) > 12:   # many KV outputs: keep logits and the worst cache entries per step
        rows = [r for r in rows if r[1] in ("logits", "last_hidden_state")] + \
               sorted([r for r in rows if r[1] not in ("logits", "last_hidden_state")], key=lambda r: -r[4])[:4]
    kind = report["dtype"] + (", quantized activations" if report.get("activations_quantized") else "")
    head = (f"validation ({report['validated_graph']}; {kind} tolerance atol={report['tolerance']['atol']} "
            f"rtol={report['tolerance']['rtol']}): {'PASSED' if report['passed'] else 'FAILED'}")
    return head + "\n" + format_table(["step", "output", "shape", "max abs", "max rel", "result"], rows)
