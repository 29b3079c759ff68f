"""Helpers shared by the CLI commands: turning library errors into click errors, loading models."""
from __future__ import annotations

import contextlib
import json

import click

from ..artifact import ArtifactError
from ..config import ConfigError
from ..corpus import CorpusError
from ..models import ModelLoadError
from ..report import format_table  # noqa: F401 -- re-exported for the commands
from ..targets import TargetError


@contextlib.contextmanager
def friendly_errors():
    """Known failures become click errors (message + fix, exit code 1/2), never a traceback. SIGTERM inside
    the block is handled like Ctrl-C (temporary outputs and profiles are removed, nothing half-written stays)."""
    from ..safe_io import sigterm_as_interrupt
    try:
        with sigterm_as_interrupt():
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
