"""``rocket-deploy`` command line: a thin click group; each command lives in ``rocket_deploy.commands.*``
and is imported only when it runs (so ``--help`` stays fast and heavy imports stay lazy)."""
from __future__ import annotations

import importlib
import os

import click

# name -> (module, function, one-line help). Modules are imported on use.
COMMANDS = {
    "compress": ("rocket_deploy.commands.compress_cmd", "compress", "Compress a model with ROCKET into an artifact directory."),
    "eval": ("rocket_deploy.commands.eval_cmd", "eval_", "Perplexity of an artifact vs its dense model on held-out text."),
    "heal": ("rocket_deploy.commands.heal_cmd", "heal", "Distil a ROCKET artifact from its dense model (masks fixed)."),
    "inspect": ("rocket_deploy.commands.inspect_cmd", "inspect_", "Per-layer table and allocation plot of an artifact."),
    "export": ("rocket_deploy.commands.export_cmd", "export", "Export an artifact to ONNX (ORT or TensorRT target)."),
    "bench": ("rocket_deploy.commands.bench_cmd", "bench", "Latency / throughput of an artifact, ONNX or engine file."),
    "sweep": ("rocket_deploy.commands.sweep_cmd", "sweep", "Profile once, compress at many budgets, compare with dense."),
    "serve": ("rocket_deploy.commands.serve_cmd", "serve", "OpenAI-compatible HTTP server over a model."),
    "build": ("rocket_deploy.commands.build_cmd", "build", "Build a TensorRT engine from a --target trt ONNX file."),
    "doctor": ("rocket_deploy.commands.doctor_cmd", "doctor", "Report which backends, plugins and kernels work here."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n in COMMANDS if _module_exists(COMMANDS[n][0])]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _module_exists(COMMANDS[name][0]):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Commands that know how to share their work among torchrun processes (compress/distributed.py).
DISTRIBUTED = ("compress",)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rocket-deploy")
@click.pass_context
def main(ctx):
    """rocket-deploy: ROCKET compression, ONNX / TensorRT export, benchmarks and serving."""
    world = os.environ.get("WORLD_SIZE", "1")
    if ctx.invoked_subcommand not in (None, *DISTRIBUTED) and world.strip() not in ("", "1"):
        # every process would run the whole command and write the same files
        raise click.UsageError(f"'{ctx.invoked_subcommand}' runs in one process, but WORLD_SIZE={world} (torchrun): "
                               f"only {', '.join(DISTRIBUTED)} shares its work among processes; run it without "
                               "torchrun")


if __name__ == "__main__":
    main()
