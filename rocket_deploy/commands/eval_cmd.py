"""``rocket-deploy eval DIR``: held-out perplexity per text domain, dense vs compressed."""
from __future__ import annotations

import click

from ._common import echo_json_line, format_table, friendly_errors


@click.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--dense", "dense_spec", default=None, help="Dense reference model (default: the artifact's source model).")
@click.option("--domains", default="stdlib,pyref,licenses", show_default=True,
              help="Comma-separated evaluation domains: built-in sources or .txt/.jsonl files. A domain used for "
                   "calibration is evaluated on its held-out documents only.")
@click.option("--samples", type=click.IntRange(1), default=None, help="Sequences per domain (default: as calibrated).")
@click.option("--seq-len", type=click.IntRange(8), default=None, help="Tokens per sequence (default: as calibrated).")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON line.")
def eval_(artifact, dense_spec, domains, samples, seq_len, as_json):
    """Perplexity of the compressed ARTIFACT vs its dense model on held-out text (encoders: hidden-state error)."""
    with friendly_errors():
        from ..artifact import load_artifact, read_manifest
        from ..config import CalibrationConfig
        from ..evaluation import compare, heldout_split
        from ..models import is_causal_lm, load_model
        manifest = read_manifest(artifact)
        model, tokenizer, manifest = load_artifact(artifact)
        spec = dense_spec or manifest.get("source", {}).get("spec")
        if not spec:
            raise click.BadParameter("the artifact does not record its source model; pass --dense MODEL")
        dense = load_model(spec)
        cal = CalibrationConfig.from_dict(manifest["calibration"]["config"])
        splits = [heldout_split(tokenizer, cal, d.strip(), samples, seq_len, dense.model)
                  for d in domains.split(",") if d.strip()]
        causal = is_causal_lm(model)
        results = compare(model, dense.model, splits, causal=causal)
    metric = "perplexity" if causal else "hidden-state rel. L2 error"
    rows = [[r.domain, r.tokens, r.dense, r.compressed, r.ratio if causal else None] for r in results]
    if not as_json:
        click.echo(f"{artifact}: {manifest['method']} at budget {manifest['budget']['target_removed_fraction']} "
                   f"({manifest['budget']['removed_bytes_fraction']:.3f} of targeted bytes removed); metric: {metric}")
        click.echo(format_table(["domain", "tokens", "dense", "compressed", "ratio"], rows))
    echo_json_line({"artifact": artifact, "metric": metric,
                    "domains": {r.domain: {"dense": r.dense, "compressed": r.compressed, "tokens": r.tokens}
                                for r in results}})
