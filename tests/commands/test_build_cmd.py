"""``rocket-deploy build`` (commands/build_cmd.py): the profile printed before TensorRT is needed, ``--dry-run``,
option errors by name, a clear error without TensorRT (no traceback), and a build through the fake TensorRT."""
from __future__ import annotations

import numpy as np
import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import tiny_matmul
from click.testing import CliRunner
from fake_tensorrt import fake_build, no_plugin, no_tensorrt  # noqa: F401 -- fixtures


def _cli(*args):
    from rocket_deploy.cli import main
    return CliRunner().invoke(main, list(args))


def test_build_command_without_tensorrt(decoder_onnx, tmp_path, no_tensorrt):
    res = _cli("build", str(decoder_onnx), "--out", str(tmp_path / "m.plan"), "--batch", "1:1:4",
               "--seq", "1:128:512", "--max-context", "2048")
    assert res.exit_code == 1
    assert "TensorRT is not installed" in res.output and "pip install 'rocket-deploy[tensorrt]'" in res.output
    assert "build --dry-run` shows the profile without TensorRT" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert "past_key_values.0.key" in res.output   # the profile was printed before trying TensorRT
    assert not (tmp_path / "m.plan").exists()


def test_build_command_directory_and_dry_run(decoder_onnx, no_tensorrt):
    res = _cli("build", str(decoder_onnx.parent), "--seq", "1:4:8", "--max-context", "16", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "1x2x15x8" in res.output and "attention_mask" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--batch", "4:2:1"], "--batch"),
    (["--seq", "x"], "--seq"),
    (["--seq", "1:128:512", "--max-context", "100"], "shorter than the longest sequence"),
    (["--opt-level", "7"], "--opt-level"),
    (["--max-context", "0"], "--max-context"),
])
def test_build_command_bad_options(decoder_onnx, args, needle, no_tensorrt):
    res = _cli("build", str(decoder_onnx), *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_build_command_missing_model(tmp_path):
    res = _cli("build", str(tmp_path / "nope.onnx"))
    assert res.exit_code == 2 and "does not exist" in res.output


def test_build_command_profile_error(tmp_path, no_tensorrt):
    res = _cli("build", str(tiny_matmul(tmp_path / "mm.onnx", np.ones((4, 4), np.float32))))
    assert res.exit_code == 1 and "cannot choose shapes for input 'x'" in res.output


def test_build_command_with_fake_builder(fake_build, decoder_onnx, tmp_path):
    fake_build()
    res = _cli("build", str(decoder_onnx), "--out", str(tmp_path / "m.plan"), "--seq", "1:4:8", "--max-context",
               "32", "--timing-cache", str(tmp_path / "c.cache"), "--quiet")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (tmp_path / "m.plan").read_bytes() == b"SERIALIZED-PLAN"
    assert (tmp_path / "c.cache").is_file()


def test_build_command_too_old_tensorrt(decoder_onnx, tmp_path, monkeypatch):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    res = _cli("build", str(decoder_onnx), "--out", str(tmp_path / "m.plan"), "--seq", "1:4:8")
    assert res.exit_code == 1 and "TensorRT 8.6.1 is too old" in res.output and "Traceback" not in res.output
