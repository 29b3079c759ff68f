"""Helpers shared by the CLI commands: turning library errors into click errors, loading models."""
from __future__ import annotations

import contextlib
import json

import click

from ..artifact import ArtifactError
from ..config import ConfigError
from ..corpus import CorpusError
from ..models import ModelLoadError
from ..targets import TargetError


@contextlib.contextmanager
def friendly_errors():
    """Known failures become click errors (message + fix, exit code 1/2), never a traceback."""
    try:
        yield
    except (ModelLoadError, ArtifactError) as e:
        raise click.BadParameter(str(e)) from e
    except (ConfigError, CorpusError, TargetError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:
        from ..compress.knapsack import InfeasibleBudget
        if isinstance(e, InfeasibleBudget):
            raise click.ClickException(f"infeasible budget: {e}") from e
        raise


def echo_json_line(obj) -> None:
    click.echo(json.dumps(obj, sort_keys=True, default=float))


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e5 else f"{c:.3e}"
    return "-" if c is None else str(c)
