"""``rocket-deploy inspect DIR``: per-layer table and an allocation plot (PNG)."""
from __future__ import annotations

import os

import click

from ._common import echo_json_line, format_table, friendly_errors


@click.command("inspect")
@click.argument("artifact", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="allocation.png", show_default=True,
              help="Where to write the allocation plot (PNG); '-' for none.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON line.")
def inspect_(artifact, plot_path, as_json):
    """Show how ARTIFACT allocated its budget: rank, keep, bytes and errors per layer."""
    with friendly_errors():
        from ..artifact import read_manifest
        from ..report import allocation_plot, layer_rows
        m = read_manifest(artifact)
        from ..manifest import check_report_fields
        check_report_fields(m, os.path.join(artifact, "rocket.json"))
    headers, rows = layer_rows(m)
    b = m["budget"]
    if not as_json:
        click.echo(format_table(headers, rows))
        click.echo(f"\nmethod {m['method']}, target removed {b['target_removed_fraction']}, removed "
                   f"{b['removed_bytes_fraction']:.4f} of {b['dense_bytes']} targeted bytes "
                   f"({b['compressed_bytes']} kept; params ratio {b['params_ratio']:.4f}); "
                   f"{b['layers_compressed']} layers factorized, {b['layers_dense']} dense")
    if plot_path != "-":
        allocation_plot(m, plot_path)
        if not as_json:
            click.echo(f"allocation plot: {plot_path}")
    echo_json_line({"artifact": artifact, **{k: b[k] for k in ("removed_bytes_fraction", "compressed_bytes",
                                                              "dense_bytes", "params_ratio")}})
