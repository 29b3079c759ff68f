"""Perplexity of exported ONNX graphs in ONNX Runtime against the torch model of the same artifact.

For graphs that quantize activations on purpose (int4 MatMulNBits accuracy_level 4, ``--int8-compute dynamic``)
the export validation cannot be elementwise; this measures what the rounding costs on real held-out text:
perplexity (ORT vs torch), mean next-token KL divergence (torch || ORT) and top-1 agreement.

    python bench/bench_ort_perplexity.py out/quant/dense-int4=out/bench-quant-export/dense-int4/model.onnx ...

Each argument is ARTIFACT=ONNX_FILE. The held-out text is the calibration split's held-out documents of
``--domain`` (default stdlib; 16 x 256 tokens, as in bench/bench_quantization.py). A table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F


def nll_and_logits(fn, ids: torch.Tensor, batch: int = 4):
    nll, count, outs = 0.0, 0, []
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        logits = torch.as_tensor(np.asarray(fn(x))).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += x[:, 1:].numel()
        outs.append(logits)
    return nll / count, torch.cat(outs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="ARTIFACT=ONNX")
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer / held-out split source")
    ap.add_argument("--domain", default="stdlib")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    pairs = []
    for p in args.pairs:
        if "=" not in p:
            ap.error(f"expected ARTIFACT=ONNX, got {p!r}")
        pairs.append(tuple(p.split("=", 1)))
    torch.set_num_threads(args.threads)

    import rocket_deploy as rd
    from rocket_deploy.config import CalibrationConfig
    from rocket_deploy.evaluation import heldout_split
    from rocket_deploy.export.validate import next_token_kl
    from rocket_deploy.models import load_model
    from rocket_deploy.runtime.ort_backend import OrtEngine

    lm = load_model(args.model)
    cal = CalibrationConfig(sources=(args.domain,), samples=args.calib_samples, seq_len=args.seq_len,
                            eval_samples=args.eval_samples)
    ids = heldout_split(lm.tokenizer, cal, args.domain, model=lm.model).ids
    rows = []
    for art, onnx_path in pairs:
        model = rd.load(art).eval()
        with torch.no_grad():
            t_nll, t_logits = nll_and_logits(lambda x: model(input_ids=x, attention_mask=torch.ones_like(x)).logits, ids)
        eng = OrtEngine(onnx_path, threads=args.threads, load_tokenizer=False)
        o_nll, o_logits = nll_and_logits(lambda x: eng.forward(x.numpy(), np.ones_like(x.numpy()), None)[0], ids)
        kl, top1 = next_token_kl(o_logits.numpy(), t_logits.numpy())
        rows.append({"artifact": art, "onnx": onnx_path, "ppl_torch": math.exp(t_nll), "ppl_ort": math.exp(o_nll),
                     "ratio": math.exp(o_nll - t_nll), "kl": kl, "top1": top1})
        print(f"{onnx_path}: torch {rows[-1]['ppl_torch']:.3f}  ort {rows[-1]['ppl_ort']:.3f}  "
              f"ratio {rows[-1]['ratio']:.4f}  KL {kl:.2e}  top-1 {top1:.3f}", file=sys.stderr, flush=True)
    print(f"held-out {args.domain}: {ids.shape[0]} x {ids.shape[1]} tokens")
    print("| ONNX file | ppl torch | ppl ORT | ORT / torch | mean KL (nats) | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['onnx']} | {r['ppl_torch']:.3f} | {r['ppl_ort']:.3f} | {r['ratio']:.4f} | {r['kl']:.2e} | "
              f"{r['top1']:.3f} |")
    print(json.dumps({"bench": "ort_perplexity", "domain": args.domain, "tokens": list(ids.shape), "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
