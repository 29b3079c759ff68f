"""``rocket-deploy doctor``: which backends, plugins and kernels work on this machine, and how to fix the rest."""
from __future__ import annotations

import json
import shutil
import textwrap

import click


def format_table(checks) -> str:
    width = max(len(c.name) for c in checks)
    term = shutil.get_terminal_size((110, 20)).columns
    lines = []
    for c in checks:
        mark = "ok " if c.ok else ("FAIL" if c.required else "no ")
        head = f"{mark:<4} {c.name:<{width}}  "
        body = textwrap.wrap(c.detail, max(40, term - len(head))) or [""]
        lines.append(head + body[0])
        lines.extend(" " * len(head) + b for b in body[1:])
        if not c.ok and c.fix:
            fix = textwrap.wrap(f"fix: {c.fix}", max(40, term - len(head)))
            lines.extend(" " * len(head) + f for f in fix)
    usable = sum(c.ok for c in checks)
    lines.append(f"\n{usable}/{len(checks)} usable; 'no' = optional feature unavailable, 'FAIL' = required.")
    return "\n".join(lines)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when a required check fails.")
def doctor(as_json, strict):
    """Report which backends, plugins and kernels work here, with the fix for each that does not."""
    from rocket_deploy.runtime.diagnostics import run_checks

    checks = run_checks()
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        click.echo(format_table(checks))
    if strict and any(c.required and not c.ok for c in checks):
        raise SystemExit(1)
