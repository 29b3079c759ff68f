"""``rocket-deploy build``: a TensorRT engine (.plan) from an exported ONNX file."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rocket_deploy.onnx_contract import model_path


def _parse_shapes(values) -> dict:
    from rocket_deploy.runtime.trt.profiles import parse_shape_override
    out = {}
    for v in values:
        try:
            name, shapes = parse_shape_override(v)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--shape") from None
        if name in out:
            raise click.BadParameter(f"input {name!r} is given twice", param_hint="--shape")
        out[name] = shapes
    return out


def _parse_range(value: str, param: str, what: str):
    from rocket_deploy.runtime.trt import DimRange
    try:
        return DimRange.parse(value, what)
    except ValueError as e:
        raise click.BadParameter(f"{e}. Use N, MIN:MAX or MIN:OPT:MAX with MIN <= OPT <= MAX, e.g. 1:128:512",
                                 param_hint=param) from None


@click.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Plan file to write (default: MODEL with a .plan suffix).")
@click.option("--batch", default="1", show_default=True, help="Batch sizes MIN:OPT:MAX (or N, or MIN:MAX).")
@click.option("--seq", default="1:128:512", show_default=True,
              help="New tokens per call MIN:OPT:MAX (prompt chunk on prefill, 1 on decode).")
@click.option("--max-context", type=int, default=None,
              help="Decoders: longest past + new tokens per call (default: the --seq max).")
@click.option("--past-opt", type=int, default=None,
              help="Decoders: past length TensorRT tunes for (default: half the max context).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file: read if it exists, written back after the build (speeds up rebuilds).")
@click.option("--workspace-gb", type=float, default=None,
              help="Builder workspace limit in GiB (default: TensorRT's, the whole device memory).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimization level: 0 builds fastest, 5 searches the most tactics.")
@click.option("--plugin-library", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="librocket_trt_plugins.so to load (default: $ROCKET_TRT_PLUGIN or plugins_trt/build*/).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="Profile shapes of one input, overriding --batch / --seq / --max-context for it, e.g. "
                   "input_ids:1x1,4x64,8x512 (or NAME:SHAPE for a fixed shape). Repeatable.")
@click.option("--dry-run", is_flag=True,
              help="Print the optimization profile and the equivalent trtexec command, then stop (no TensorRT "
                   "needed).")
@click.option("--quiet", "-q", is_flag=True, help="No build progress.")
def build(model, out, batch, seq, max_context, past_opt, timing_cache, workspace_gb, opt_level, plugin_library,
          shapes, dry_run, quiet):
    """Build a TensorRT engine from a --target trt ONNX export MODEL (a .onnx file or its export directory).

    Example: rocket-deploy build model.onnx --out model.plan --batch 1:1:4 --seq 1:128:512 --max-context 2048
    """
    from rocket_deploy.runtime import trt as tb

    onnx_path = Path(model_path(str(model)))
    if not onnx_path.is_file():
        raise click.BadParameter(f"{str(onnx_path)!r} does not exist; pass the .onnx file written by "
                                 f"`rocket-deploy export --target trt` (or its directory)", param_hint="MODEL")
    if onnx_path.suffix != ".onnx":
        raise click.BadParameter(f"{str(onnx_path)!r} is not an .onnx file", param_hint="MODEL")
    batch_r = _parse_range(batch, "--batch", "batch range")
    seq_r = _parse_range(seq, "--seq", "sequence range")
    if max_context is not None and max_context < 1:
        raise click.BadParameter(f"must be >= 1, got {max_context}", param_hint="--max-context")
    if workspace_gb is not None and workspace_gb <= 0:
        raise click.BadParameter(f"must be > 0, got {workspace_gb}", param_hint="--workspace-gb")
    overrides = _parse_shapes(shapes)
    try:
        ranges = tb.ShapeRanges(batch_r, seq_r, max_context, past_opt, overrides)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        inputs = tb.read_onnx_inputs(onnx_path)
    except Exception as e:  # noqa: BLE001 -- an unreadable / corrupt ONNX file
        raise click.ClickException(f"cannot read {onnx_path}: {type(e).__name__}: {e}") from None
    unknown = [n for n in overrides if n not in {i.name for i in inputs}]
    if unknown:
        raise click.BadParameter(f"{', '.join(map(repr, unknown))} is not an input of {onnx_path.name}; its inputs: "
                                 f"{', '.join(i.name for i in inputs)}", param_hint="--shape")
    try:
        profile = ranges.profile(inputs)
    except ValueError as e:
        raise click.ClickException(f"cannot build a profile for {onnx_path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- an unreadable / corrupt ONNX file
        raise click.ClickException(f"cannot read {onnx_path}: {type(e).__name__}: {e}") from None

    plan = out if out is not None else onnx_path.with_suffix(".plan")
    click.echo(f"optimization profile for {onnx_path}:")
    click.echo(tb.format_profile(profile))
    if dry_run:
        from rocket_deploy.runtime.trt.trtexec import format_command, trtexec_argv
        lib = _dry_run_plugin(onnx_path, plugin_library)
        click.echo("equivalent trtexec command:")
        click.echo(format_command(trtexec_argv(onnx_path, plan, profile, plugin_library=lib,
                                               builder_optimization_level=opt_level, workspace_gb=workspace_gb,
                                               timing_cache=timing_cache)))
        return

    click.echo(f"building {plan} (optimization level {opt_level}) ...", err=True)
    t0 = time.perf_counter()
    try:
        tb.build_engine(onnx_path, plan, ranges, timing_cache=timing_cache, workspace_gb=workspace_gb,
                        builder_optimization_level=opt_level, progress=not quiet, plugin_library=plugin_library)
    except tb.TensorRTUnavailable as e:
        raise click.ClickException(f"{e}\n`rocket-deploy build --dry-run` shows the profile without TensorRT; "
                                   f"`rocket-deploy doctor` lists what works here.") from None
    except tb.PluginLibraryNotFound as e:
        raise click.ClickException(str(e)) from None
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    size = plan.stat().st_size
    click.echo(f"wrote {plan} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s"
               + (f"; timing cache {timing_cache}" if timing_cache else ""))


def _dry_run_plugin(onnx_path: Path, plugin_library: Path | None) -> Path | None:
    """The plugin library the build would load for the trtexec line: the named one, else (when the graph uses the
    op) the one found; when none is built yet, the default build location, with a note on stderr."""
    from rocket_deploy.runtime import trt as tb
    if plugin_library is not None:
        return plugin_library
    if not tb.onnx_uses_op(onnx_path):
        return None
    try:
        found = tb.find_plugin_library()
    except tb.PluginLibraryNotFound as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    if found is not None:
        return found
    from rocket_deploy.runtime.trt.trtexec import default_plugin_build_path
    where = default_plugin_build_path()
    click.echo(f"note: the graph uses the plugin but {tb.PLUGIN_FILENAME} is not built yet (the line names where "
               f"the build puts it): {tb.PLUGIN_BUILD_COMMAND}", err=True)
    return where
