"""``rocket-deploy heal ARTIFACT --out DIR``: distil the compressed model from its dense model, masks fixed."""
from __future__ import annotations

import click

from ._common import echo_json_line, friendly_errors
from ._options import no_verify_option, trust_remote_code_option


@click.command("heal")
@click.argument("artifact", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory of the healed artifact.")
@click.option("--steps", type=click.IntRange(1), default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=1e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--batch", "batch_size", type=click.IntRange(1), default=4, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=click.IntRange(8), default=128, show_default=True, help="Tokens per training sequence (longer calibration chunks are cut into pieces of this length).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True,
              help="Learning-rate decay after the warmup.")
@click.option("--warmup", "warmup_steps", type=click.IntRange(0), default=5, show_default=True, help="Linear warmup steps.")
@click.option("--grad-clip", type=click.FloatRange(0), default=1.0, show_default=True, help="Max gradient norm (0: off).")
@click.option("--hidden-mse", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of the last-hidden-state relative MSE added to the KL loss.")
@click.option("--checkpoint-every", type=click.IntRange(0), default=25, show_default=True,
              help="Steps between resumable checkpoints (OUT.heal-checkpoint.pt; 0: none).")
@click.option("--resume", is_flag=True, help="Continue from OUT.heal-checkpoint.pt (same options).")
@click.option("--calib", "calib", multiple=True, metavar="SOURCE",
              help="Training text: a .txt / .jsonl file or a built-in source; repeat to mix (default: the artifact's "
                   "own calibration sources, so eval's held-out documents stay unseen).")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help="Training sequences (default: as calibrated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order.")
@click.option("--dense", "dense_spec", default=None, help="Dense teacher model (default: the artifact's source model).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an artifact.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@no_verify_option
@trust_remote_code_option
def heal(artifact, out, steps, lr, batch_size, seq_len, schedule, warmup_steps, grad_clip, hidden_mse,
         checkpoint_every, resume, calib, calib_samples, seed, dense_spec, overwrite, quiet, no_verify, trust_remote_code):
    """Heal the fp16 ROCKET ARTIFACT: distil it from its dense model on calibration text (KL of next-token
    distributions), training U and V's kept values with the sparsity masks fixed; writes a new artifact."""
    with friendly_errors():
        from ..artifact import read_manifest
        from ..compress.heal import HealError, heal_artifact
        from ..config import CalibrationConfig, HealConfig
        cfg = HealConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, schedule=schedule,
                         warmup_steps=warmup_steps, grad_clip=grad_clip, hidden_mse=hidden_mse,
                         checkpoint_every=checkpoint_every, seed=seed)
        manifest = read_manifest(artifact)
        cal = None
        if calib or calib_samples:
            base = CalibrationConfig.from_dict(manifest["calibration"]["config"]).to_dict()
            cal = CalibrationConfig.from_dict({**base, **({"sources": list(calib)} if calib else {}),
                                               **({"samples": calib_samples} if calib_samples else {})})
        try:
            rec = heal_artifact(artifact, out, cfg, cal, dense_spec=dense_spec, resume=resume, overwrite=overwrite,
                                progress=not quiet, verify=not no_verify, trust_remote_code=trust_remote_code,
                                log=lambda m: click.echo(m, err=True))
        except HealError as e:
            raise click.ClickException(str(e)) from e
    if not quiet:
        click.echo(f"healed {artifact} -> {out}: {rec['steps']} steps, {rec['tokens']} tokens, {rec['seconds']:.0f} s, "
                   f"loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}")
    echo_json_line({"out": out, **{k: rec[k] for k in ("steps", "tokens", "seconds", "loss_first", "loss_last")}})
