"""``rocket-deploy bench PATH --backend ort|torch|trt --batch 1,4 --prompt-len 128 --gen-len 64``."""
from __future__ import annotations

import os

import click

from ..runtime.backends import BACKEND_NAMES
from ._common import echo_json_line, format_table, friendly_errors


def _ints(ctx, param, value):
    try:
        vals = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"batch sizes must be integers >= 1, got {value!r}")
    return vals


@click.command("bench")
@click.argument("path", type=click.Path())
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Default: from PATH (artifact dir -> torch, .onnx or export dir -> ort, .plan -> trt).")
@click.option("--batch", "batches", default="1", show_default=True, callback=_ints, help="Comma-separated batch sizes.")
@click.option("--prompt-len", type=click.IntRange(1), default=128, show_default=True, help="Prompt tokens (random ids).")
@click.option("--gen-len", type=click.IntRange(1), default=64, show_default=True, help="Generated tokens per sequence.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed generations per batch size.")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True, help="Timed generations per batch size.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ORT intra-op threads (default: ORT's choice).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="torch / trt on CUDA: decode steps replayed from CUDA graphs on a static KV cache "
                   "[default: on where the model runs on CUDA].")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON line.")
def bench(path, backend, batches, prompt_len, gen_len, warmup, runs, threads, cuda_graphs, as_json):
    """Latency and throughput of PATH: an artifact directory, an exported .onnx (or its folder), or a .plan."""
    if not os.path.exists(path):
        raise click.BadParameter(f"{path!r} does not exist; pass an artifact directory, a .onnx file or a .plan",
                                 param_hint="PATH")
    with friendly_errors():
        from ..runtime.backends import open_backend
        from ..runtime.bench import BenchConfig, bench_engine
        try:
            engine = open_backend(path, backend, threads=threads, cuda_graphs=cuda_graphs)
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(str(e), param_hint="PATH") from e
        from ..runtime.bench import environment, few_runs_warning
        cfg = BenchConfig(batches=batches, prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, runs=runs)
        warn = few_runs_warning(runs)
        if warn:
            click.echo(f"warning: {warn}", err=True)
        res = bench_engine(engine, cfg, None if as_json else (lambda m: click.echo(m, err=True)))
        res["environment"] = environment(engine, threads)
        if hasattr(engine, "graph_stats"):
            res["cuda_graphs"] = engine.graph_stats
    if not as_json:
        click.echo(f"{path} [{res['backend']}]  model {res['model_bytes'] / 1e6:.1f} MB  peak RSS "
                   f"{res['peak_rss_bytes'] / 1e6:.0f} MB" + (f"  GPU peak {res['gpu_peak_bytes'] / 1e6:.0f} MB"
                                                            if res.get("gpu_peak_bytes") else ""))
        hdr = ["batch", "min ms", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms", "stddev ms", "prefill ms",
               "decode tok/s" if res["is_decoder"] else "tok/s"]
        rows = [[r["batch"], r["latency_ms_min"], r["latency_ms_mean"], r["latency_ms_p50"], r["latency_ms_p90"],
                 r["latency_ms_p95"], r["latency_ms_p99"], r["latency_ms_max"], r["latency_ms_stddev"],
                 r["prefill_ms_median"],
                 r["decode_tokens_per_s"] if res["is_decoder"] else r["tokens_per_s"]] for r in res["rows"]]
        click.echo(format_table(hdr, rows))
    echo_json_line({"path": path, **res})
