"""Regenerate docs/cli.md from the click commands' own help texts: python tools/gen_cli_docs.py [--check]"""
from __future__ import annotations

import os
import sys

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


def main_entry(argv: list[str]) -> int:
    path = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md"))
    text = render()
    if "--check" in argv:
        with open(path) as f:
            if f.read() != text:
                print(f"{path} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
                return 1
        print(f"{path} is current")
        return 0
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_entry(sys.argv[1:]))
