"""ONNX export of ROCKET artifacts and dense models: custom op, standard-op lowering, validation, Triton repos.

    from rocket_deploy.export import export_artifact
    res = export_artifact("smol-0.3", "smol-0.3-onnx", target="ort", dtype="fp32")
    print(res.path, res.file_bytes, res.validation["passed"])
"""
from rocket_deploy.onnx_contract import onnx_file_bytes

from .graph_io import io_names
from .onnx_export import ExportResult, export_artifact, export_model
from .options import DTYPES, TARGETS, ExportError

__all__ = ["DTYPES", "TARGETS", "ExportError", "ExportResult", "export_artifact", "export_model", "io_names",
           "onnx_file_bytes"]
