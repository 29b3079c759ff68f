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


@torch.no_grad()
def compare_on_text(model, engine, ids: torch.Tensor, batch: int = 4) -> dict:
    """Torch and ORT on the same batches of ``ids``: perplexities, mean next-token KL and top-1 agreement
    (accumulated per batch, so no full-vocabulary logits of the whole set are held)."""
    from rocket_deploy.export.validate import next_token_kl
    from rocket_deploy.perplexity import next_token_nll_sum
    t_nll = o_nll = kl_sum = top1_sum = 0.0
    count = rows = 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        t = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        o = torch.from_numpy(engine.forward(x.numpy(), np.ones_like(x.numpy()), None)[0]).float()
        t_nll += next_token_nll_sum(t, x)
        o_nll += next_token_nll_sum(o, x)
        count += x[:, 1:].numel()
        kl, top1 = next_token_kl(o.numpy(), t.numpy())
        n = x.numel()
        kl_sum, top1_sum, rows = kl_sum + kl * n, top1_sum + top1 * n, rows + n
    return {"ppl_torch": math.exp(t_nll / count), "ppl_ort": math.exp(o_nll / count),
            "ratio": math.exp((o_nll - t_nll) / count), "kl": kl_sum / rows, "top1": top1_sum / rows}


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
    from rocket_deploy.models import load_model
    from rocket_deploy.runtime.ort_backend import OrtEngine

    lm = load_model(args.model)
    cal = CalibrationConfig(sources=(args.domain,), samples=args.calib_samples, seq_len=args.seq_len,
                            eval_samples=args.eval_samples)
    ids = heldout_split(lm.tokenizer, cal, args.domain, model=lm.model).ids
    rows = []
    for art, onnx_path in pairs:
        eng = OrtEngine(onnx_path, threads=args.threads, load_tokenizer=False)
        r = {"artifact": art, "onnx": onnx_path, **compare_on_text(rd.load(art).eval(), eng, ids)}
        rows.append(r)
        print(f"{onnx_path}: torch {r['ppl_torch']:.3f}  ort {r['ppl_ort']:.3f}  ratio {r['ratio']:.4f}  "
              f"KL {r['kl']:.2e}  top-1 {r['top1']:.3f}", file=sys.stderr, flush=True)
    print(f"held-out {args.domain}: {ids.shape[0]} x {ids.shape[1]} tokens")
    print("| ONNX file | ppl torch | ppl ORT | ORT / torch | mean KL (nats) | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['onnx']} | {r['ppl_torch']:.3f} | {r['ppl_ort']:.3f} | {r['ratio']:.4f} | {r['kl']:.2e} | "
              f"{r['top1']:.3f} |")
    print(json.dumps({"bench": "ort_perplexity", "domain": args.domain, "tokens": list(ids.shape), "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
