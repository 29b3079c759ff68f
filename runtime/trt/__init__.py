"""The TensorRT backend: build engines from ``--target trt`` ONNX exports and run them behind :class:`Engine`.

=================  ===============================================================================================
module             job
=================  ===============================================================================================
``importing``      ``import tensorrt`` for the whole project (:func:`import_tensorrt`), the process's logger
``plugins``        find ``librocket_trt_plugins.so`` and load it into TensorRT's plugin registry
``onnx_graph``     an ONNX graph's real inputs and whether it uses the plugin's op (``onnx`` only)
``profiles``       :class:`DimRange` / :class:`ShapeRanges` -> min / opt / max shapes; shape checks against a profile
``plan_file``      the plan and its JSON sidecar on disk (atomic writes)
``builder``        :func:`build_engine`: ONNX -> serialized plan
``engine``         :class:`TrtEngine` (plan -> ``forward``) and its GPU KV cache :class:`TrtKVCache`
=================  ===============================================================================================

Importing this package does not import TensorRT, torch or onnx: everything but the build and the engine works
without them.
"""
from .builder import build_engine, format_parser_errors
from .engine import TrtEngine, TrtKVCache, position_ids_from_mask, trt_dtype_to_torch
from .importing import MIN_TENSORRT, TensorRTUnavailable, get_logger, import_tensorrt
from .onnx_graph import GraphInput, graph_inputs, onnx_uses_op, read_onnx_inputs
from .plan_file import atomic_write_bytes, plan_metadata_path, read_plan_metadata
from .plugins import (PLUGIN_BUILD_COMMAND, PLUGIN_ENV, PLUGIN_FILENAME, PluginLibraryNotFound, find_plugin_library,
                      load_plugins, missing_plugin_message, plugin_search_paths)
from .profiles import DimRange, ProfileShape, ShapeRanges, check_profile_shapes, format_profile

__all__ = ["DimRange", "GraphInput", "MIN_TENSORRT", "PLUGIN_BUILD_COMMAND", "PLUGIN_ENV", "PLUGIN_FILENAME",
           "PluginLibraryNotFound", "ProfileShape", "ShapeRanges", "TensorRTUnavailable", "TrtEngine", "TrtKVCache",
           "atomic_write_bytes", "build_engine", "check_profile_shapes", "find_plugin_library", "format_parser_errors",
           "format_profile", "get_logger", "graph_inputs", "import_tensorrt", "load_plugins",
           "missing_plugin_message", "onnx_uses_op", "plan_metadata_path", "plugin_search_paths",
           "position_ids_from_mask", "read_onnx_inputs", "read_plan_metadata", "trt_dtype_to_torch"]
