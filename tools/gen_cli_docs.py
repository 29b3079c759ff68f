"""Regenerate docs/cli.md from the click commands' own help texts: python tools/gen_cli_docs.py"""
from __future__ import annotations

import os

import click

from rocket_deploy.cli import COMMANDS, main


def render() -> str:
    # The group's context_settings (help_option_names) apply to every context, exactly as on the command line;
    # click caches each command's help option, so building contexts without them would render order-dependent docs.
    ctx = click.Context(main, info_name="rocket-deploy", terminal_width=100, max_content_width=100,
                        **main.context_settings)
    parts = ["# CLI reference", "",
             "Generated from the commands' help by `python tools/gen_cli_docs.py`; every command is a thin wrapper "
             "over a library function. Errors name the problem and the fix and exit with status 1 (bad state) or 2 "
             "(bad usage), without a traceback.", "", "```", main.get_help(ctx), "```", ""]
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        if cmd is None:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=100, max_content_width=100)
        parts += [f"## `rocket-deploy {name}`", "", "```", cmd.get_help(sub), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")
    with open(path, "w") as f:
        f.write(render())
    print(f"wrote {os.path.normpath(path)}")
