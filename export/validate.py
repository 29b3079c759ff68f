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

``--dtype bf16`` graphs: ONNX Runtime's CPU provider has no bfloat16 kernels (``Mul``, ``MatMul``, ... are
NOT_IMPLEMENTED), so when it cannot open the file, validation runs an fp32 copy of the SAME graph (bf16 weights
upcast exactly, bf16 casts and value types made fp32: :func:`upcast_bf16`) against torch computing in bfloat16,
with the bf16 tolerance. That checks the graph's structure, wiring, shapes and bf16-rounded weights; the bf16
rounding of the activations inside ONNX Runtime / TensorRT is not exercised (the report says so in
``validated_graph``).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable

import numpy as np
import torch

from rocket_deploy.onnx_contract import (ATTENTION_MASK, INPUT_IDS, KV_KINDS, LAST_HIDDEN_STATE, LOGITS, POSITION_IDS,
                                         TOKEN_TYPE_IDS, decoder_io_names, past_name)

TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 2e-2, "rtol": 3e-2},
              # bf16 keeps 8 mantissa bits (fp16: 11). SmolLM2-135M logits, torch bf16 vs fp32 compute with the same
              # bf16 weights (what the bf16 validation compares): max abs 0.82 at max |logit| 33.3 (max rel 2.5e-2;
              # fp16 vs fp32: 4.2e-3): this bound (2.76 there) leaves a 3.4x margin; miswired outputs are off by ~1.
              "bf16": {"atol": 1e-1, "rtol": 8e-2}}
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


BF16_UPCAST_NOTE = ("fp32 copy of the bf16 graph (ONNX Runtime CPU has no bfloat16 kernels: {why}); reference: "
                    "torch in bfloat16")


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None,
                  act_quant: bool = False) -> dict:
    """The pass bounds: the dtype's elementwise :data:`TOLERANCES` (or :data:`ACT_QUANT_TOLERANCE` for graphs that
    quantize activations). An explicit ``atol`` / ``rtol`` selects the elementwise test with those bounds (the other
    one from the dtype's defaults), activation-quantized graphs included."""
    if atol is None and rtol is None:
        return dict(ACT_QUANT_TOLERANCE) if act_quant else dict(TOLERANCES[dtype])
    tol = dict(TOLERANCES[dtype])
    if atol is not None:
        tol["atol"] = float(atol)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    return tol


class ValidationShapeError(RuntimeError):
    """An exported output has a different shape than the torch model's."""


class ToleranceWarning(UserWarning):
    pass


def upcast_bf16(model) -> int:
    """Make an ``onnx_ir`` model's bfloat16 float32 in place: initializers (exactly: every bf16 value is an fp32
    value), value types (graph I/O, node outputs), ``Cast``'s ``to`` and bf16 tensor attributes (``Constant``,
    ``ConstantOfShape``). Returns the number of values changed."""
    import onnx_ir as ir
    bf16, f32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    changed = 0

    def fix_value(v) -> None:
        nonlocal changed
        if v is None or v.dtype != bf16:
            return
        if v.const_value is not None:
            v.const_value = ir.tensor(np.asarray(v.const_value.numpy(), dtype=np.float32), name=v.name)
        v.dtype = f32
        changed += 1

    graphs = [model.graph, *model.functions.values()]
    for g in graphs:
        for v in [*g.inputs, *g.outputs, *getattr(g, "initializers", {}).values()]:
            fix_value(v)
        for node in ir.traversal.RecursiveGraphIterator(g):
            for v in node.outputs:
                fix_value(v)
            for name, attr in list(node.attributes.items()):
                if name == "to" and attr.type == ir.AttributeType.INT and attr.value == int(bf16):
                    node.attributes[name] = ir.AttrInt64(name, int(f32))
                    changed += 1
                elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == bf16:
                    node.attributes[name] = ir.AttrTensor(name, ir.tensor(
                        np.asarray(attr.value.numpy(), dtype=np.float32)))
                    changed += 1
    return changed


def _session_from_ir(model, so, ort):
    import tempfile

    import onnx_ir as ir
    with tempfile.TemporaryDirectory(prefix="rocket-validate-") as tmp:   # external data: no 2 GB limit
        path = os.path.join(tmp, "validate.onnx")
        ir.save(model, path, external_data="validate.onnx.data")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_session_for(path: str, target: str, threads: int | None = None, upcast: bool = False):
    """An ORT CPU session for an exported file; trt-target graphs are lowered to standard ops in memory;
    ``upcast``: bfloat16 made float32 in memory (:func:`upcast_bf16`)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if target == "trt":
        so.add_session_config_entry(_ORT_QDQ_NBITS_LEVEL, "0")
    if target not in ("trt", "ort-packed") and not upcast:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    import onnx_ir as ir
    model = ir.load(path)
    if target in ("trt", "ort-packed"):
        from .lowering import lower_rocket_nodes
        if target == "ort-packed":             # the custom-op library's fp16 products, in standard ops
            from .trt_graph import unpack_for_validation
            unpack_for_validation(model)
        lower_rocket_nodes(model, merge="never")
    if upcast:
        upcast_bf16(model)
    return _session_from_ir(model, so, ort)


def bf16_session(path: str, target: str) -> tuple[Any, str | None]:
    """``(session, note)`` for a bf16 graph: the file itself when ONNX Runtime can run it (``note`` None), else the
    fp32 copy of :func:`upcast_bf16` with the reason in ``note``."""
    try:
        return ort_session_for(path, target), None
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own NotImplemented / Fail types
        why = str(e).strip().splitlines()[0]
        if "NOT_IMPLEMENTED" not in why and "bfloat16" not in why.lower():
            raise
        why = why.split(":", 2)[-1].strip() if "NOT_IMPLEMENTED" in why else why
        return ort_session_for(path, target, upcast=True), why


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
                    act_quant: bool = False, atol: float | None = None, rtol: float | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare the exported graph at ``path`` with ``model`` (fp32 torch). Returns the report dict.
    ``act_quant``: the graph quantizes activations on purpose (int4 MatMulNBits accuracy_level 4, dynamic int8):
    judged by :data:`ACT_QUANT_TOLERANCE` (next-token KL, relative RMS) instead of the dtype's elementwise bound.
    ``atol`` / ``rtol``: see :func:`tolerance_for`. ``dtype="bf16"``: see the module doc (the reference is ``model``
    in bfloat16). ``progress``: gets one line per check (each step, with its worst output)."""
    from .graph_io import decoder_geometry, is_decoder_model
    explicit = atol is not None or rtol is not None
    tol = tolerance_for(dtype, atol, rtol, act_quant)
    graph_act_quant, act_quant = act_quant, act_quant and not explicit
    say = progress or (lambda line: None)
    note = None
    lowered = ", trt graph lowered in memory" if target == "trt" else ""
    say(f"validation: opening the graph in ONNX Runtime (CPU{lowered})")
    if session is not None:
        sess = session
    elif dtype == "bf16":
        sess, note = bf16_session(path, target)
        if note:
            say(f"validation: ONNX Runtime CPU cannot run bfloat16 ({note}); validating an fp32 copy of the graph "
                f"against torch in bf16")
    else:
        sess = ort_session_for(path, target)
    model = model.eval() if next(model.parameters()).dtype == torch.float32 else model.eval().float()
    ref_model = copy.deepcopy(model).to(torch.bfloat16) if dtype == "bf16" else model
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(4, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.int64)
    if batch > 1:
        mask[1, :2] = 0            # left padding in the second row
    in_types = {i.name: i.type for i in sess.get_inputs()}
    fdt = _float_feed_type(in_types.values())
    steps: list[dict[str, Any]] = []
    if not is_decoder_model(model):
        feeds, kw = {INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy()}, {}
        if TOKEN_TYPE_IDS in in_types:      # BERT-style: random segments, so the token-type path is checked too
            n_types = int(getattr(model.config, "type_vocab_size", 1) or 1)
            kw[TOKEN_TYPE_IDS] = torch.randint(0, n_types, ids.shape, generator=g)
            feeds[TOKEN_TYPE_IDS] = kw[TOKEN_TYPE_IDS].numpy()
        ref = ref_model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state.float()
        got = np.asarray(sess.run([LAST_HIDDEN_STATE], feeds)[0], dtype=np.float32)
        valid = mask.bool().numpy()   # padded positions are not defined outputs
        steps.append({"step": "encode", "outputs": [compare(LAST_HIDDEN_STATE, got[valid], ref.numpy()[valid], tol,
                                                           act_quant)]})
        _say_step(say, steps[-1])
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
        out = ref_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **{arg: DynamicCache(config=model.config)})
        past = getattr(out, arg)
        names = decoder_io_names(n)[1]                  # logits, present.{i}.key / .value
        got = [np.asarray(a, dtype=np.float32) for a in sess.run(names, feeds)]
        refs = [out.logits] + [t for layer in past.layers for t in (layer.keys, layer.values)]
        steps.append({"step": "prefill (empty past)",
                      "outputs": _compare_all(names, got, refs, tol, mask, act_quant)})
        _say_step(say, steps[-1])
        # decode step: feed the torch present back as past to both (isolates one step's error)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
        pos2 = pos[:, -1:] + 1
        feeds = {INPUT_IDS: nxt.numpy(), ATTENTION_MASK: mask2.numpy(), POSITION_IDS: pos2.numpy()}
        for i, layer in enumerate(past.layers):
            feeds[past_name(i, KV_KINDS[0])] = layer.keys.float().numpy().astype(fdt)
            feeds[past_name(i, KV_KINDS[1])] = layer.values.float().numpy().astype(fdt)
        out2 = ref_model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, use_cache=True, **{arg: past})
        got2 = [np.asarray(a, dtype=np.float32) for a in sess.run(names, feeds)]
        refs2 = [out2.logits] + [t for layer in getattr(out2, arg).layers for t in (layer.keys, layer.values)]
        steps.append({"step": f"decode (past {prompt_len})", "outputs": _compare_all(names, got2, refs2, tol, mask2, act_quant)})
        _say_step(say, steps[-1])
    passed = all(o["passed"] for s in steps for o in s["outputs"])
    report = {"target": target, "dtype": dtype, "tolerance": tol, "passed": passed, "steps": steps,
              "activations_quantized": bool(act_quant),
              "validated_graph": "lowered copy of the trt graph (RocketSparseVMatMul -> standard ops)"
              if target == "trt" else "lowered copy of the ort-packed graph (RocketMatMulF16 / RocketSparseVMatMul "
              "-> standard ops; the custom-op kernels are tested apart)" if target == "ort-packed"
              else "the exported file"}
    if note:
        report["validated_graph"] = ("lowered " if target == "trt" else "") + BF16_UPCAST_NOTE.format(why=note)
    if explicit:
        report["tolerance_source"] = "--atol / --rtol"
        report["graph_quantizes_activations"] = bool(graph_act_quant)
    if not passed:
        failed = [o for s in steps for o in s["outputs"] if not o["passed"]]
        worst = max(failed, key=lambda o: o["max_rel"])
        what = (f"next-token KL {worst['kl']:.3g} nats" if "kl" in worst else f"rel RMS {worst['rel_rms']:.3g}") \
            if act_quant else f"max rel {worst['max_rel']:.3g}"
        warnings.warn(f"EXPORT VALIDATION FAILED: {worst['output']} differs from torch by {worst['max_abs']:.3g} "
                      f"({what}), above the {'quantized-activation' if act_quant else dtype} tolerance {tol}",
                      ToleranceWarning, stacklevel=2)
    return report


def _float_feed_type(types) -> Any:
    """The numpy type of the graph's float inputs (``tensor(bfloat16)`` before ``tensor(float16)``: substrings)."""
    types = list(types)
    if any("bfloat16" in t for t in types):
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.float16 if any("float16" in t for t in types) else np.float32


def _say_step(say, step: dict) -> None:
    outs = step["outputs"]
    worst = max(outs, key=lambda o: o["max_rel"])
    bad = sum(not o["passed"] for o in outs)
    say(f"validation: {step['step']}: {len(outs)} output(s), worst {worst['output']} max abs {worst['max_abs']:.3g} "
        f"max rel {worst['max_rel']:.3g}: " + ("pass" if not bad else f"{bad} FAIL"))


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
