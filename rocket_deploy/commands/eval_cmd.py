"""``rocket-deploy eval DIR``: held-out quality per text domain, dense vs compressed."""
from __future__ import annotations

import click

from ._common import echo_json_line, format_table, friendly_errors
from ._options import no_verify_option, trust_remote_code_option

NEVER = "never-calibrated"


@click.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--dense", "dense_spec", default=None, help="Dense reference model (default: the artifact's source model).")
@click.option("--domains", default=f"stdlib,pyref,licenses,{NEVER}", show_default=True,
              help="Comma-separated evaluation domains: built-in sources or .txt/.jsonl files. A domain used for "
                   f"calibration is evaluated on its held-out documents only; '{NEVER}' stands for every built-in "
                   "domain of another register that calibration did not use and that has text on this machine "
                   "(pkgdocs, manpages, copyright, faq, vimguide).")
@click.option("--samples", type=click.IntRange(1), default=None, help="Sequences per domain (default: as calibrated).")
@click.option("--seq-len", type=click.IntRange(8), default=None, help="Tokens per sequence (default: as calibrated).")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON line.")
@no_verify_option
@trust_remote_code_option
def eval_(artifact, dense_spec, domains, samples, seq_len, as_json, no_verify, trust_remote_code):
    """Perplexity, KL from the dense model's next-token distribution and top-1 agreement of the compressed
    ARTIFACT vs its dense model on held-out text (encoders: hidden-state error)."""
    with friendly_errors():
        from ..artifact import load_artifact, read_manifest
        from ..config import CalibrationConfig
        from ..evaluation import compare, expand_domains, heldout_split, never_calibrated_summary
        from ..models import ModelLoadError, check_same_model, check_seq_len, dense_source, is_causal_lm, load_model
        manifest = read_manifest(artifact)
        model, tokenizer, manifest = load_artifact(artifact, verify=not no_verify, trust_remote_code=trust_remote_code,
                                                   need_tokenizer=True)
        if seq_len is not None:
            check_seq_len(model, seq_len)
        # the recorded model (relative to the artifact, then the absolute path), checked by fingerprint
        dense = load_model(dense_spec or dense_source(manifest, artifact), trust_remote_code=trust_remote_code)
        try:
            check_same_model(manifest, dense, artifact)
        except ModelLoadError as e:
            if not dense_spec:
                raise
            click.secho(f"warning: {e}", fg="yellow", err=True)
        cal = CalibrationConfig.from_dict(manifest["calibration"]["config"])
        names = expand_domains([d.strip() for d in domains.split(",") if d.strip()], cal, NEVER)
        splits = [heldout_split(tokenizer, cal, d, samples, seq_len, dense.model) for d in names]
        causal = is_causal_lm(model)
        results = compare(model, dense.model, splits, causal=causal)
    metric = "perplexity" if causal else "hidden-state rel. L2 error"
    summary = never_calibrated_summary(results, cal) if causal else None
    if not as_json:
        click.echo(f"{artifact}: {manifest['method']} at budget {manifest['budget']['target_removed_fraction']} "
                   f"({manifest['budget']['removed_bytes_fraction']:.3f} of targeted bytes removed); metric: {metric}")
        if causal:
            rows = [[r.domain, "yes" if r.domain not in cal.sources else "", r.tokens, r.dense, r.compressed,
                     r.ratio, r.kl, r.top1_agreement] for r in results]
            click.echo(format_table(["domain", "never calibrated", "tokens", "dense", "compressed", "ratio",
                                     "KL (nats/token)", "top-1 agreement"], rows))
            if summary:
                click.echo(f"never-calibrated domains ({', '.join(summary['domains'])}): perplexity ratio worst "
                           f"{summary['worst_ratio']:.3f} ({summary['worst_domain']}), mean {summary['mean_ratio']:.3f}; "
                           f"KL mean {summary['mean_kl']:.4f}; top-1 agreement mean {summary['mean_top1']:.3f}")
        else:
            click.echo(format_table(["domain", "tokens", "compressed"], [[r.domain, r.tokens, r.compressed]
                                                                         for r in results]))
    doms = {}
    for r in results:
        doms[r.domain] = {"dense": r.dense, "compressed": r.compressed, "tokens": r.tokens}
        if r.kl is not None:
            doms[r.domain].update(kl=r.kl, top1_agreement=r.top1_agreement)
    echo_json_line({"artifact": artifact, "metric": metric, "domains": doms,
                    **({"never_calibrated": summary} if summary else {})})
