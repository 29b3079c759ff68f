"""CLI: compress / inspect / eval on tiny random Llama and BERT directories, and every documented error."""
import json
import os

import pytest
from click.testing import CliRunner

from rocket_deploy.cli import main

FAST = ["--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet"]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def last_json(output):
    return json.loads(getattr(output, "stdout", output).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_artifact(tiny_llama_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "llama-0.3")
    r = run(["compress", tiny_llama_dir, "--budget", "0.3", "--out", out, *FAST])
    assert r.exit_code == 0, r.output
    return out, last_json(r)


def test_compress_llama(llama_artifact):
    out, summary = llama_artifact
    assert os.path.isfile(os.path.join(out, "rocket.json"))
    assert summary["removed_bytes_fraction"] >= 0.3 - 1e-9
    assert summary["layers_compressed"] > 0


def test_inspect(llama_artifact, tmp_path):
    out, _ = llama_artifact
    png = tmp_path / "alloc.png"
    r = run(["inspect", out, "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "q_proj" in r.output and "rank" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval(llama_artifact, tiny_llama_dir):
    out, _ = llama_artifact
    r = run(["eval", out, "--domains", "stdlib", "--samples", "2", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    res = last_json(r)["domains"]["stdlib"]
    assert res["dense"] > 1 and res["compressed"] > 1


def test_compress_bert_and_eval(tiny_bert_dir, tmp_path):
    out = str(tmp_path / "bert")
    r = run(["compress", tiny_bert_dir, "--budget", "0.3", "--out", out, *FAST])
    assert r.exit_code == 0, r.output
    m = json.load(open(os.path.join(out, "rocket.json")))
    names = list(m["layers"])
    assert any("attention.self.query" in n for n in names) and any("intermediate.dense" in n for n in names)
    r = run(["eval", out, "--domains", "stdlib", "--samples", "2", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    assert "hidden-state" in r.output


def test_profile_dir_reuse(tiny_llama_dir, tmp_path):
    prof = str(tmp_path / "prof")
    for b in ("0.2", "0.4"):
        r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", b, "--out", str(tmp_path / b),
                                      "--profile-dir", prof, *FAST[:-1]])
        assert r.exit_code == 0, r.output
    assert "reusing profile" in r.output
    assert os.path.isfile(os.path.join(prof, "profile.json"))


@pytest.mark.parametrize("budget", ["0", "1", "1.5", "-0.2"])
def test_budget_out_of_range(tiny_llama_dir, tmp_path, budget):
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", budget, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--budget" in r.output and "Traceback" not in r.output


def test_infeasible_budget(tiny_llama_dir, tmp_path):
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", "0.95", "--out", str(tmp_path / "x"), *FAST])
    assert r.exit_code == 1 and "infeasible budget" in r.output and "lower --budget" in r.output
    assert not os.path.exists(tmp_path / "x")


def test_missing_model(tmp_path):
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not found" in r.output and "Traceback" not in r.output


def test_unreadable_model(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    r = CliRunner().invoke(main, ["compress", str(d), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "could not load model" in r.output


def test_no_matching_targets(tiny_llama_dir, tmp_path):
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--targets", "nothing_matches_this", "--out",
                                  str(tmp_path / "x"), *FAST])
    assert r.exit_code == 1 and "no nn.Linear layer matches" in r.output


def test_empty_calibration(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--calib", str(empty), "--out", str(tmp_path / "x"), *FAST])
    assert r.exit_code == 1 and "contains no text" in r.output


def test_bad_jsonl(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nottext": 1}\n')
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--calib", str(bad), "--out", str(tmp_path / "x"), *FAST])
    assert r.exit_code == 1 and "bad.jsonl:2" in r.output


def test_user_jsonl_calibration(tiny_llama_dir, tmp_path):
    from rocket_deploy.corpus import stdlib_docstrings
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps({"text": d.text}) for d in stdlib_docstrings(60)))
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--calib", str(src), "--out", str(tmp_path / "x"), *FAST])
    assert r.exit_code == 0, r.output
    m = json.load(open(tmp_path / "x" / "rocket.json"))
    assert m["calibration"]["config"]["sources"] == [str(src)]


def test_existing_output(tiny_llama_dir, tmp_path):
    (tmp_path / "x").mkdir()
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_eval_not_an_artifact(tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and "not a rocket-deploy artifact" in r.output


def test_cli_reference_is_current():
    """docs/cli.md is regenerated from the commands' help (python tools/gen_cli_docs.py).

    Rendered in a fresh interpreter: click caches each command's help option on first use, so rendering inside
    the test process would depend on which tests ran before."""
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "gen_cli_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


@pytest.mark.parametrize("command", [["eval", "x"], ["sweep", "x", "--budgets", "0.3", "--out", "y"], ["heal", "x", "--out", "y"]])
def test_commands_other_than_compress_refuse_torchrun(command, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run(command)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"'{command[0]}' runs in one process" in r.output and "WORLD_SIZE=2" in r.output, r.output
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "runs in one process" not in run(command).output      # one process: the command's own checks apply
