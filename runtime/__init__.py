"""Runtime: one :class:`Engine` interface over torch, ONNX Runtime and TensorRT backends."""
from .engine import Engine, SamplingParams, open_engine

__all__ = ["Engine", "SamplingParams", "open_engine"]
