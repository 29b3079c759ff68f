"""The ``trtexec`` command line equivalent to a :func:`~.builder.build_engine` call (``rocket-deploy build
--dry-run``): the same ONNX file, plan, optimization profile, plugin library and builder settings.

Pure: a profile (``{input: ProfileShape}``) and paths in, an argv list out (:func:`trtexec_argv`); no TensorRT.

What it mirrors of the builder:

* ``--minShapes / --optShapes / --maxShapes``: the profile, one ``name:DxDxD`` per input, in graph order;
* ``--stronglyTyped``: the builder creates a strongly typed network, so precisions come from the graph (an fp16 /
  bf16 export gives an fp16 / bf16 engine). trtexec refuses ``--fp16`` / ``--bf16`` together with
  ``--stronglyTyped`` (those are weakly-typed precision hints), so they are never emitted;
* ``--dynamicPlugins=LIB``: the builder loads the plugin library with ``IPluginRegistry::loadLibrary`` (the
  library's ``getCreators``), which is what ``--dynamicPlugins`` does; ``--staticPlugins`` (plain ``dlopen``) works
  only for a library built with ``-DROCKET_STATIC_REGISTRATION=ON`` (``plugin_mode="static"``);
* ``--builderOptimizationLevel``, ``--memPoolSize=workspace:NM`` (only when a limit is set) and
  ``--timingCacheFile`` (read if present, written back: the builder's behaviour too).
"""
from __future__ import annotations

import os
import shlex
from typing import Mapping, Sequence

from .profiles import ProfileShape

PLUGIN_MODES = ("dynamic", "static")


def default_plugin_build_path():
    """Where ``cmake -S plugins_trt -B plugins_trt/build`` puts the plugin library in the source checkout."""
    from . import plugins
    return plugins._SOURCE_ROOT / "plugins_trt" / "build" / plugins.PLUGIN_FILENAME


def dims_text(shape: Sequence[int]) -> str:
    """``(1, 2, 0, 16)`` -> ``"1x2x0x16"`` (trtexec's shape syntax; a scalar is ``""``)."""
    return "x".join(str(int(d)) for d in shape)


def _name(name: str) -> str:
    """An input name as trtexec parses it: names holding its separators (``:`` / ``,``) are single-quoted."""
    if any(c in name for c in ":,'"):
        if "'" in name:
            raise ValueError(f"input name {name!r} contains a single quote, which trtexec's --*Shapes cannot express")
        return f"'{name}'"
    return name


def shapes_arg(profile: Mapping[str, ProfileShape], which: str) -> str:
    """The value of ``--minShapes`` (``which="min"``), ``--optShapes`` ("opt") or ``--maxShapes`` ("max")."""
    if which not in ("min", "opt", "max"):
        raise ValueError(f"which must be 'min', 'opt' or 'max', got {which!r}")
    return ",".join(f"{_name(n)}:{dims_text(getattr(p, which))}" for n, p in profile.items())


def trtexec_argv(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, profile: Mapping[str, ProfileShape], *,
                 plugin_library: str | os.PathLike | None = None, plugin_mode: str = "dynamic",
                 builder_optimization_level: int = 3, workspace_gb: float | None = None,
                 timing_cache: str | os.PathLike | None = None, strongly_typed: bool = True,
                 executable: str = "trtexec") -> list[str]:
    """The ``trtexec`` argv that builds what :func:`~.builder.build_engine` would build (see the module doc).
    ``plugin_library``: the library to load (None: the graph needs none)."""
    if plugin_mode not in PLUGIN_MODES:
        raise ValueError(f"plugin_mode must be one of {PLUGIN_MODES}, got {plugin_mode!r}")
    if not 0 <= int(builder_optimization_level) <= 5:
        raise ValueError(f"builder optimization level must be in 0..5, got {builder_optimization_level}")
    if workspace_gb is not None and not workspace_gb > 0:
        raise ValueError(f"workspace must be > 0 GB, got {workspace_gb}")
    argv = [executable, f"--onnx={os.fspath(onnx_path)}", f"--saveEngine={os.fspath(plan_path)}"]
    if profile:
        argv += [f"--minShapes={shapes_arg(profile, 'min')}", f"--optShapes={shapes_arg(profile, 'opt')}",
                 f"--maxShapes={shapes_arg(profile, 'max')}"]
    if strongly_typed:
        argv.append("--stronglyTyped")
    argv.append(f"--builderOptimizationLevel={int(builder_optimization_level)}")
    if workspace_gb is not None:
        argv.append(f"--memPoolSize=workspace:{float(workspace_gb) * 1024:g}M")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    if plugin_library is not None:
        argv.append(f"--{plugin_mode}Plugins={os.fspath(plugin_library)}")
    return argv


def format_command(argv: Sequence[str]) -> str:
    """One shell-quoted line (paste-able into a POSIX shell)."""
    return shlex.join(list(argv))
