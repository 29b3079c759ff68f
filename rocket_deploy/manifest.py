"""The artifact manifest (``rocket.json``): its schema, checked before any tensor is read, the per-file
SHA-256 record, and the checks of the tensor files' headers against the manifest.

Every failure is an :class:`ArtifactError` with one line naming the file and the field, e.g.
``a/rocket.json: layers['model.layers.0.self_attn.q_proj'].keep: keep (80) > rank (64)``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST = "rocket.json"
FORMAT_NAME = "rocket-deploy/artifact"
HASH_CHUNK = 1 << 22


class ArtifactError(ValueError):
    """The artifact directory is missing, incomplete, damaged or of an unsupported format version."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class QuantRecord(_Open):
    scheme: str
    group_size: int | None = Field(default=None, gt=0)


class LayerRecord(_Open):
    kind: Literal["rocket", "dense"]
    d_in: int = Field(gt=0)
    d_out: int = Field(gt=0)
    rank: int | None = None
    keep: int | None = None
    has_bias: bool = False
    quant: QuantRecord | None = None

    @model_validator(mode="after")
    def _rank_keep(self):
        if self.kind != "rocket":
            return self
        if self.rank is None or self.keep is None:
            raise ValueError("a rocket layer needs integer rank and keep")
        if not 1 <= self.rank <= min(self.d_in, self.d_out):
            raise ValueError(f"rank ({self.rank}) must be in [1, min(d_in, d_out) = {min(self.d_in, self.d_out)}]")
        if not 1 <= self.keep <= self.rank:
            raise ValueError(f"keep ({self.keep}) > rank ({self.rank})" if self.keep > self.rank
                             else f"keep ({self.keep}) must be at least 1")
        return self


class FileRecord(_Open):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(_Open):
    format: str
    format_version: int
    architecture: str
    architecture_kwargs: dict[str, bool] | None = None
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    layers: dict[str, LayerRecord]
    tied: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileRecord] | None = None

    @model_validator(mode="after")
    def _tied(self):
        for alias, target in self.tied.items():
            if not alias or not target or alias == target:
                raise ValueError(f"tied[{alias!r}] = {target!r} is not an alias of another tensor")
            if target in self.tied:
                raise ValueError(f"tied[{alias!r}] points at {target!r}, itself an alias")
        return self


def _loc(loc) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int) or (i and loc[i - 1] in ("layers", "tied", "files")):
            out += f"[{part!r}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validate_manifest(m: Any, mpath: str, max_version: int) -> dict[str, Any]:
    """Check a parsed ``rocket.json`` (format, version, schema); returns it unchanged or raises ArtifactError."""
    if not isinstance(m, dict):
        raise ArtifactError(f"{mpath}: the manifest is a JSON {type(m).__name__}, not an object; the artifact is "
                            f"damaged, compress again")
    if m.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath} is not a rocket-deploy manifest (format={m.get('format')!r})")
    try:
        version = int(m.get("format_version", -1))
    except (TypeError, ValueError):
        raise ArtifactError(f"{mpath}: format_version: {m.get('format_version')!r} is not an integer") from None
    if version > max_version:
        raise ArtifactError(f"artifact format version {m.get('format_version')} is newer than this rocket-deploy "
                            f"supports ({max_version}); upgrade rocket-deploy")
    try:
        Manifest.model_validate(m)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if p not in ("rocket", "dense")] if err["loc"][:1] == ("layers",) else err["loc"]
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ArtifactError(f"{mpath}: {_loc(tuple(loc))}: {msg}{more}; the artifact is damaged or was edited, "
                            f"compress again") from None
    return m


def read_json_manifest(mpath: str, max_version: int) -> dict[str, Any]:
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e.msg}); the artifact is damaged, compress again") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {mpath} ({e}); the artifact is damaged, compress again") from e
    return validate_manifest(m, mpath, max_version)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(directory: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``directory`` except the manifest."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, directory).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    return dict(sorted(out.items()))


def verify_files(directory: str, files: dict[str, dict[str, Any]] | None) -> None:
    """Check every file recorded in the manifest against its size and SHA-256 (no record: nothing to check)."""
    for rel, rec in (files or {}).items():
        p = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(p):
            raise ArtifactError(f"{p} is listed in {MANIFEST} but missing; the artifact is incomplete, compress again")
        size = os.path.getsize(p)
        if size != rec["bytes"]:
            raise ArtifactError(f"{p} has {size} bytes, {MANIFEST} records {rec['bytes']}: the file is truncated or "
                                f"damaged; copy or compress the artifact again (--no-verify skips this check)")
        if sha256_file(p) != rec["sha256"]:
            raise ArtifactError(f"{p} does not match its SHA-256 in {MANIFEST}: the file is corrupted; copy or "
                                f"compress the artifact again (--no-verify skips this check)")


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header (no tensor data read); ArtifactError when unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for every kind of damage
        raise ArtifactError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); the artifact is damaged, compress again") from None


def expected_factor_shapes(name: str, rec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a (non-quantized) rocket layer's tensors in factors.safetensors (docs/format.md)."""
    r, k, d_in, d_out = rec["rank"], rec["keep"], rec["d_in"], rec["d_out"]
    out = {f"{name}.u": (d_in, r), f"{name}.v_values": (d_out, k)}
    if k < r:
        out[f"{name}.v_mask"] = (d_out, math.ceil(r / 8))
    if rec.get("has_bias"):
        out[f"{name}.bias"] = (d_out,)
    return out


def check_factor_shapes(manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]], fpath: str) -> None:
    """Every rocket layer of the manifest has exactly the tensors its rank / keep / sizes imply."""
    for name, rec in manifest["layers"].items():
        if rec["kind"] != "rocket" or rec.get("quant"):
            continue
        for key, want in expected_factor_shapes(name, rec).items():
            have = shapes.get(key)
            if have is None:
                raise ArtifactError(f"{fpath} has no tensor {key} for layers[{name!r}] in {MANIFEST}; the artifact "
                                    f"is damaged, compress again")
            if tuple(have) != want:
                raise ArtifactError(f"{fpath}: {key} has shape {list(have)} but layers[{name!r}] in {MANIFEST} "
                                    f"(rank {rec['rank']}, keep {rec['keep']}) implies {list(want)}; the artifact "
                                    f"is damaged or was edited, compress again")


REPORT_BUDGET = ("target_removed_fraction", "removed_bytes_fraction", "dense_bytes", "compressed_bytes",
                 "params_ratio", "layers_compressed", "layers_dense")
REPORT_LAYER = ("bytes", "dense_bytes", "rel_original", "rel_whitened")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_report_fields(m: dict[str, Any], mpath: str) -> None:
    """The fields `rocket-deploy inspect` reports (written by `compress`), present and numeric."""
    b = m.get("budget")
    if not isinstance(b, dict):
        raise ArtifactError(f"{mpath}: budget: missing or not an object; the artifact is damaged, compress again")
    for k in REPORT_BUDGET:
        if not _number(b.get(k)):
            raise ArtifactError(f"{mpath}: budget.{k}: missing or not a number ({b.get(k)!r}); the artifact is "
                                f"damaged, compress again")
    if not isinstance(m.get("method"), str):
        raise ArtifactError(f"{mpath}: method: missing or not a string; the artifact is damaged, compress again")
    for name, r in m["layers"].items():
        for k in REPORT_LAYER:
            if not _number(r.get(k)) or (k == "dense_bytes" and r[k] <= 0):
                raise ArtifactError(f"{mpath}: layers[{name!r}].{k}: missing or not a number ({r.get(k)!r}); the "
                                    f"artifact is damaged, compress again")
