"""A CUDA-graph backend without CUDA, for the engines' capture/replay control flow (runtime/cuda_graphs.py):
capture records the step and runs nothing, replay runs the recorded step; ``log`` lists what was asked for."""
from __future__ import annotations


class FakeGraphs:
    def __init__(self, fail: bool = False):
        self.fail, self.log = fail, []

    def eager(self, fn):
        self.log.append("eager")
        return fn()

    def capture(self, fn):
        self.log.append("capture")
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    def replay(self, captured):
        self.log.append("replay")
        captured()
