"""Importing the package and asking the CLI for help stay light: no torch, onnxruntime or tensorrt."""
import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "tensorrt", "transformers", "onnx")


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {m for m in HEAVY if m in out}


def test_import_is_lean():
    assert _loaded_after("import rocket_deploy") == set()


def test_cli_help_is_lean():
    code = ("from click.testing import CliRunner\nfrom rocket_deploy.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0 and 'compress' in r.output")
    assert _loaded_after(code) == set()


def test_public_names_resolve():
    import rocket_deploy as rd
    for name in rd.__all__:
        assert getattr(rd, name) is not None
