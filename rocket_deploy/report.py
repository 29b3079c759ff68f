"""Tables (plain-text, shared by the CLI, stages and benches) and plots of an artifact's allocation (matplotlib lazy)."""
from __future__ import annotations

import re
from typing import Any


def layer_rows(manifest: dict[str, Any]) -> tuple[list[str], list[list]]:
    headers = ["layer", "d_in x d_out", "kind", "rank", "keep", "kept bytes", "rel err (orig)", "rel err (whitened)"]
    rows = []
    for name, r in manifest["layers"].items():
        rows.append([name, f"{r['d_in']}x{r['d_out']}", r["kind"], r["rank"], r["keep"],
                     r["bytes"] / r["dense_bytes"], r["rel_original"], r["rel_whitened"]])
    return headers, rows


def _kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def allocation_plot(manifest: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = manifest["layers"]
    kinds = sorted({_kind_of(n) for n in layers})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for i, kind in enumerate(kinds):
        names = [n for n in layers if _kind_of(n) == kind]
        xs = [_block_of(n) + (i - len(kinds) / 2) * 0.1 for n in names]
        ax1.plot(xs, [layers[n]["bytes"] / layers[n]["dense_bytes"] for n in names], "o-", ms=3, label=kind)
        ax2.plot(xs, [layers[n]["rel_original"] for n in names], "o-", ms=3, label=kind)
    b = manifest["budget"]
    ax1.axhline(1 - b["target_removed_fraction"], color="k", ls="--", lw=0.8, label="uniform")
    ax1.set_ylabel("kept fraction of bytes")
    ax2.set_ylabel("relative error (original space)")
    ax2.set_xlabel("block")
    ax1.legend(ncol=min(len(kinds) + 1, 8), fontsize=8)
    ax1.set_title(f"{manifest['method']}: {b['removed_bytes_fraction']:.3f} of targeted bytes removed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGE_NOTES = {"selfgen": "sampling calibration text from the model", "calibration": "calibration text, tokens",
               "sensitivity": "output sensitivity (one backward pass)",
               "profile": "Grams, eigendecompositions, candidates", "allocate": "knapsack",
               "materialize": "factorize the chosen layers", "safeguard": "knapsack and uniform, built unrefitted",
               "evaluation": "held-out quality of both", "save": "write the artifact",
               "total": "wall time"}


def seconds_table(seconds: dict[str, Any]) -> tuple[list[str], list[list]]:
    """Headers and rows of a compress run's stage times (``manifest["seconds"]``): ``reused`` stages show the
    seconds they took when made (``profile_original``), stages that did not run ``-``."""
    original = seconds.get("profile_original") or {}
    rows = []
    for stage, v in seconds.items():
        if stage == "profile_original":
            continue
        if v == "reused" and stage in original:
            v = f"reused (0 s; made in {original[stage]} s)"
        elif v == "reused":
            v = "reused (0 s)"
        rows.append([stage, v, STAGE_NOTES.get(stage, "")])
    return ["stage", "seconds", "what"], rows


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
