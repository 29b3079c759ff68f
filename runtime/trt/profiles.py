"""Optimization-profile shapes: the user's batch / new-token / context ranges (:class:`DimRange`,
:class:`ShapeRanges`) turned into min / opt / max shapes for every input of an exported graph, including the past KV
cache (past length 0 .. max context) and the attention mask (past + new tokens); and the check that a call's shapes
fall inside an engine's profile, naming the ``rocket-deploy build`` option to change when they do not.

Pure Python: the graph inputs come from :mod:`.onnx_graph`, the I/O names from :mod:`rocket_deploy.onnx_contract`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from rocket_deploy.onnx_contract import ATTENTION_MASK, INPUT_IDS, PAST_RE, POSITION_IDS, TOKEN_TYPE_IDS
from rocket_deploy.report import format_table

from .onnx_graph import GraphInput, read_onnx_inputs

TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS, TOKEN_TYPE_IDS)   # [batch, new tokens]

Shape = tuple[int, ...]


class ProfileShape(NamedTuple):
    min: Shape
    opt: Shape
    max: Shape


@dataclasses.dataclass(frozen=True)
class DimRange:
    """``min <= opt <= max`` for one dimension (a batch size, a token count)."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        for v in (self.min, self.opt, self.max):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"range values must be integers, got {self.min!r}:{self.opt!r}:{self.max!r}")
        if self.min < 0:
            raise ValueError(f"range {self} has a negative minimum")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"range {self} must have min <= opt <= max "
                             f"(got min {self.min}, opt {self.opt}, max {self.max})")

    @classmethod
    def parse(cls, text: str | int, what: str = "range") -> "DimRange":
        """``"N"`` (fixed), ``"MIN:MAX"`` (opt = max) or ``"MIN:OPT:MAX"``."""
        if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
            return cls(int(text), int(text), int(text))
        parts = str(text).strip().split(":")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{what} {text!r} is not N, MIN:MAX or MIN:OPT:MAX with integers (e.g. 1:128:512)") \
                from None
        if len(vals) == 1:
            vals = vals * 3
        elif len(vals) == 2:
            vals = [vals[0], vals[1], vals[1]]
        elif len(vals) != 3:
            raise ValueError(f"{what} {text!r} has {len(vals)} parts; use N, MIN:MAX or MIN:OPT:MAX")
        try:
            return cls(*vals)
        except ValueError as e:
            raise ValueError(f"{what} {text!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclasses.dataclass(frozen=True)
class ShapeRanges:
    """The shapes one TensorRT optimization profile covers.

    * ``batch``: batch sizes; ``seq``: new tokens per call (prompt chunk on prefill, 1 on decode).
    * ``max_context``: decoders only -- the longest past + new tokens a call may see (default ``seq.max``). The past
      KV length ranges over ``0 .. max_context - seq.min`` (0 = empty cache, the first call).
    * ``past_opt``: the past length TensorRT tunes for (default: half the context, capped at the past maximum).
    * ``overrides``: ``{input name: (min shape, opt shape, max shape)}`` used verbatim, for inputs that are not part
      of the LLM I/O convention.

    TensorRT evaluates the graph's shape relations at each profile corner, so the attention mask (``past + seq``
    long) is set to exactly ``past + seq`` at min, opt and max: its max is ``max_context - seq.min + seq.max``. The
    runtime (:class:`TrtEngine`) enforces ``past + seq <= max_context`` itself.
    """
    batch: DimRange = DimRange(1, 1, 1)
    seq: DimRange = DimRange(1, 128, 512)
    max_context: int | None = None
    past_opt: int | None = None
    overrides: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] = \
        dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.batch.min < 1:
            raise ValueError(f"batch range {self.batch}: the minimum batch size must be >= 1")
        if self.seq.min < 1:
            raise ValueError(f"sequence range {self.seq}: the minimum number of new tokens must be >= 1")
        if self.max_context is not None:
            if isinstance(self.max_context, bool) or not isinstance(self.max_context, (int, np.integer)):
                raise ValueError(f"max context must be an integer, got {self.max_context!r}")
            if self.max_context < self.seq.max:
                raise ValueError(f"max context {self.max_context} is shorter than the longest sequence "
                                 f"{self.seq.max} (--seq max); raise the max context or lower --seq")
        if self.past_opt is not None:
            past_max = self.context - self.seq.min
            if isinstance(self.past_opt, bool) or not isinstance(self.past_opt, (int, np.integer)) \
                    or not 0 <= self.past_opt <= past_max:
                raise ValueError(f"past opt {self.past_opt} must be in [0, {past_max}] "
                                 f"(max context {self.context} - seq min {self.seq.min})")
        for name, shapes in self.overrides.items():
            if len(shapes) != 3:
                raise ValueError(f"override for {name!r} must be (min shape, opt shape, max shape)")
            lo, op, hi = (tuple(int(v) for v in s) for s in shapes)
            if not len(lo) == len(op) == len(hi):
                raise ValueError(f"override for {name!r}: min/opt/max shapes must have the same rank")
            if any(not (a <= b <= c) or a < 0 for a, b, c in zip(lo, op, hi)):
                raise ValueError(f"override for {name!r}: every dim needs 0 <= min <= opt <= max, "
                                 f"got {lo} / {op} / {hi}")

    @classmethod
    def parse(cls, batch: str | int = "1", seq: str | int = "1:128:512", max_context: int | None = None,
              past_opt: int | None = None, overrides=None) -> "ShapeRanges":
        return cls(DimRange.parse(batch, "batch range"), DimRange.parse(seq, "sequence range"),
                   max_context, past_opt, dict(overrides or {}))

    @property
    def context(self) -> int:
        return int(self.max_context) if self.max_context is not None else self.seq.max

    @property
    def past(self) -> DimRange:
        hi = self.context - self.seq.min
        opt = self.past_opt if self.past_opt is not None else min(hi, self.context // 2)
        return DimRange(0, opt, hi)

    @property
    def total(self) -> DimRange:
        """Attention-mask length of a decoder (past + new), consistent at every profile corner."""
        p = self.past
        return DimRange(p.min + self.seq.min, p.opt + self.seq.opt, p.max + self.seq.max)

    def as_dict(self) -> dict:
        return {"batch": str(self.batch), "seq": str(self.seq), "max_context": self.context,
                "past": str(self.past), "overrides": {k: [list(s) for s in v] for k, v in self.overrides.items()}}

    # -----------------------------------------------------------------------------------------------------------
    def profile(self, inputs: Iterable[GraphInput] | str | os.PathLike) -> dict[str, ProfileShape]:
        """min / opt / max shapes for every input of the graph (a path is read with :func:`read_onnx_inputs`)."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = read_onnx_inputs(inputs)
        inputs = list(inputs)
        unknown = set(self.overrides) - {i.name for i in inputs}
        if unknown:
            raise ValueError(f"overrides name inputs the graph does not have: {', '.join(sorted(unknown))} "
                             f"(graph inputs: {', '.join(i.name for i in inputs)})")
        decoder = any(PAST_RE.match(i.name) for i in inputs)
        b, s = self.batch, self.seq
        t = self.total if decoder else s
        out: dict[str, ProfileShape] = {}
        for inp in inputs:
            if inp.name in self.overrides:
                lo, op, hi = (tuple(int(v) for v in x) for x in self.overrides[inp.name])
                if len(lo) != inp.rank:
                    raise ValueError(f"override for {inp.name!r} has rank {len(lo)}, the graph input has rank "
                                     f"{inp.rank} ({_fmt_dims(inp.dims)})")
                shape = ProfileShape(lo, op, hi)
            elif PAST_RE.match(inp.name):
                if inp.rank != 4:
                    raise ValueError(f"{inp.name} has rank {inp.rank} ({_fmt_dims(inp.dims)}); the KV-cache inputs "
                                     f"must be [batch, kv_heads, past, head_dim]")
                heads, head_dim = inp.dims[1], inp.dims[3]
                for label, d in (("kv_heads", heads), ("head_dim", head_dim)):
                    if not isinstance(d, int) or d <= 0:
                        raise ValueError(f"{inp.name} has a dynamic {label} dimension ({d!r}); re-export with static "
                                         f"head dims or give its shapes in overrides")
                p = self.past
                shape = ProfileShape((b.min, heads, p.min, head_dim), (b.opt, heads, p.opt, head_dim),
                                     (b.max, heads, p.max, head_dim))
            elif inp.name == ATTENTION_MASK:
                _need_rank(inp, 2, "[batch, past + seq]" if decoder else "[batch, seq]")
                shape = ProfileShape((b.min, t.min), (b.opt, t.opt), (b.max, t.max))
            elif inp.name in TOKEN_INPUTS:
                _need_rank(inp, 2, "[batch, seq]")
                shape = ProfileShape((b.min, s.min), (b.opt, s.opt), (b.max, s.max))
            elif inp.dims and all(isinstance(d, int) for d in inp.dims):
                fixed = tuple(int(d) for d in inp.dims)
                shape = ProfileShape(fixed, fixed, fixed)
            else:
                raise ValueError(f"cannot choose shapes for input {inp.name!r} {_fmt_dims(inp.dims)}: it is not one "
                                 f"of input_ids / attention_mask / position_ids / token_type_ids / "
                                 f"past_key_values.N.key|value and has dynamic dims; give its (min, opt, max) "
                                 f"shapes in overrides")
            _check_static(inp, shape)
            out[inp.name] = shape
        return out


def parse_shape_override(text: str) -> tuple[str, tuple[Shape, Shape, Shape]]:
    """``"NAME:MIN,OPT,MAX"`` (each shape ``DxDx...``, e.g. ``input_ids:1x1,4x64,8x512``) or ``"NAME:SHAPE"``
    (fixed: min = opt = max) -> ``(name, (min, opt, max))``, the form of :attr:`ShapeRanges.overrides`. Raises
    ``ValueError`` naming the problem; the ranks and ``min <= opt <= max`` are checked by :class:`ShapeRanges`."""
    name, sep, spec = str(text).strip().rpartition(":")
    if not sep or not name or not spec:
        raise ValueError(f"shape {text!r} is not NAME:MIN,OPT,MAX or NAME:SHAPE (e.g. input_ids:1x1,4x64,8x512)")
    parts = spec.split(",")
    if len(parts) not in (1, 3):
        raise ValueError(f"shape {text!r} has {len(parts)} shapes; give one (fixed) or three (min,opt,max)")
    try:
        shapes = [tuple(int(d) for d in p.strip().lower().split("x")) for p in parts]
    except ValueError:
        raise ValueError(f"shape {text!r}: dimensions must be integers joined by 'x' (e.g. 1x128)") from None
    if len(shapes) == 1:
        shapes = shapes * 3
    return name, (shapes[0], shapes[1], shapes[2])


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _need_rank(inp: GraphInput, rank: int, layout: str) -> None:
    if inp.rank != rank:
        raise ValueError(f"{inp.name} has rank {inp.rank} ({_fmt_dims(inp.dims)}); expected {layout}")


_DIM_LABEL = {0: "batch"}


def _check_static(inp: GraphInput, shape: ProfileShape) -> None:
    """A static graph dimension must equal the profile's min = opt = max there."""
    for i, d in enumerate(inp.dims):
        if isinstance(d, int):
            got = {shape.min[i], shape.opt[i], shape.max[i]}
            if got != {d}:
                lo, hi = min(got), max(got)
                what = _DIM_LABEL.get(i, f"dim {i}")
                raise ValueError(f"{inp.name} has a fixed {what} of {d} in the ONNX graph {_fmt_dims(inp.dims)}, but "
                                 f"the requested ranges need {lo}..{hi} there; re-export with dynamic axes or build "
                                 f"with that {what} fixed to {d}")


def format_profile(profile: Mapping[str, ProfileShape]) -> str:
    """A plain-text table of the profile (for the CLI and logs)."""
    return format_table(["input", "min", "opt", "max"],
                        [[n, *("x".join(map(str, shape)) for shape in p)] for n, p in profile.items()])


def check_profile_shapes(shapes: Mapping[str, Sequence[int]], profile: Mapping[str, ProfileShape],
                         max_context: int | None = None, decoder: bool = True) -> None:
    """Raise ``ValueError`` naming the limit when a call's shapes fall outside the engine's profile."""
    problems: list[str] = []
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo):
            problems.append(f"{name} has rank {len(shape)}, the engine expects rank {len(lo)}")
            continue
        for i, (d, a, b) in enumerate(zip(shape, lo, hi)):
            if a <= d <= b:
                continue
            side = "more" if d > b else "fewer"
            if i == 0:
                msg = f"batch size {d} is outside the engine's range [{a}, {b}] (--batch)"
            elif name == ATTENTION_MASK and decoder:
                msg = (f"a context of {d} tokens (past + new) is {'longer' if d > b else 'shorter'} than the engine "
                       f"allows [{a}, {b}] (--max-context)")
            elif name in TOKEN_INPUTS or name == ATTENTION_MASK:
                msg = f"{d} new tokens per call is outside the engine's range [{a}, {b}] (--seq)"
            elif PAST_RE.match(name) and i == 2:
                msg = f"a past of {d} tokens is outside the engine's range [{a}, {b}] (--max-context)"
            else:
                msg = f"{name} dim {i} is {d}, {side} than the engine's range [{a}, {b}]"
            if msg not in problems:
                problems.append(msg)
    if max_context is not None and decoder and ATTENTION_MASK in shapes:
        total = int(tuple(shapes[ATTENTION_MASK])[1])
        if total > max_context:
            msg = (f"a context of {total} tokens (past + new) is longer than the max the engine was built for "
                   f"({max_context}; --max-context)")
            problems.insert(0, msg)
    if problems:
        raise ValueError("input shapes outside the engine's optimization profile: " + "; ".join(problems) +
                         ". Rebuild the engine with wider ranges: rocket-deploy build MODEL.onnx --batch MIN:OPT:MAX "
                         "--seq MIN:OPT:MAX --max-context N")
