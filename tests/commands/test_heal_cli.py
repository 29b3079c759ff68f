"""``rocket-deploy heal`` end to end on a tiny random Llama artifact: the healed artifact loads (SHA-256 checked),
its loss on the calibration text fell, the masks did not move; an interrupted run resumed gives the uninterrupted
run's artifact; bad input gives one-line errors."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

import rocket_deploy as rd
from rocket_deploy.cli import main
from rocket_deploy.models import load_model
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import unpack_bits

COMPRESS = ["--calib", "stdlib", "--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet"]
HEAL = ["--steps", "8", "--lr", "3e-3", "--batch", "4", "--seq-len", "32", "--warmup", "1",
        "--checkpoint-every", "4", "--quiet"]


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_line_error(r, *words):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.output
    for w in words:
        assert w in errors[0], r.output


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("heal") / "llama-0.3")
    r = run(["compress", tiny_llama_dir, "--budget", "0.5", "--out", out, *COMPRESS])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def healed(artifact, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("healed") / "healed")
    r = run(["heal", artifact, "--out", out, *HEAL])
    assert r.exit_code == 0, r.output
    return out, last_json(r)


def factors(model):
    return {n: (m.u.clone(), m.v_values.clone(), unpack_bits(m.v_mask, m.rank).clone())
            for n, m in model.named_modules() if isinstance(m, RocketLinear)}


@torch.no_grad()
def calib_kl(model, dense, ids):
    from rocket_deploy.compress.heal import distill_loss
    return distill_loss(model(input_ids=ids).logits, dense(input_ids=ids).logits)[1]


def calibration_ids(path, dense):
    from rocket_deploy.artifact import load_tokenizer, read_manifest
    from rocket_deploy.compress.pipeline import prepare_calibration
    from rocket_deploy.config import CalibrationConfig
    cal = CalibrationConfig.from_dict(read_manifest(path)["calibration"]["config"])
    return prepare_calibration(load_tokenizer(path, required=True), cal, dense).calib.ids


def test_heal_writes_a_loadable_artifact_whose_calibration_loss_fell(artifact, healed, tiny_llama_dir):
    out, summary = healed
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 32
    assert not os.path.exists(out + ".heal-checkpoint.pt")          # removed once the artifact is written
    manifest = json.load(open(os.path.join(out, "rocket.json")))
    rec = manifest["heal"]
    assert rec["steps"] == 8 and len(rec["loss_curve"]) == 8 and rec["from_artifact"] == os.path.abspath(artifact)
    assert manifest["source"]["fingerprint"] == json.load(open(os.path.join(artifact, "rocket.json")))["source"]["fingerprint"]
    before, after = rd.load(artifact), rd.load(out)                   # verify=True: every SHA-256 checked
    dense = load_model(tiny_llama_dir).model.eval()
    ids = calibration_ids(artifact, dense)
    kl0, kl1 = calib_kl(before, dense, ids), calib_kl(after, dense, ids)
    assert kl1 < 0.9 * kl0, (kl0, kl1)
    f0, f1 = factors(before), factors(after)
    assert set(f0) == set(f1) and f0
    moved = 0
    for n, (u, vals, mask) in f1.items():
        assert torch.equal(mask, f0[n][2]), n                          # the support of V is fixed
        assert bool((mask.sum(1) == after.get_submodule(n).keep).all()), n
        moved += int(not torch.equal(u, f0[n][0])) + int(not torch.equal(vals, f0[n][1]))
    assert moved == 2 * len(f1)
    b0, b1 = before.state_dict(), after.state_dict()
    for k, v in b0.items():                                            # nothing else trained
        if k.rpartition(".")[2] not in ("u", "v_values", "v_mask"):
            assert torch.equal(v, b1[k]), k


def test_eval_reads_the_healed_artifact(healed):
    out, _ = healed
    r = run(["eval", out, "--domains", "stdlib", "--samples", "2", "--seq-len", "32", "--json"])
    assert r.exit_code == 0, r.output
    assert last_json(r)["domains"]["stdlib"]["compressed"] > 1


def test_resume_after_interrupt_equals_uninterrupted_run(artifact, healed, tmp_path, monkeypatch):
    from rocket_deploy.compress import heal as heal_mod
    out = str(tmp_path / "resumed")
    ckpt = out + ".heal-checkpoint.pt"
    real_loss, calls = heal_mod.distill_loss, []

    def interrupt_in_step_6(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt                # Ctrl-C in step 6: step 5 is done, the checkpoint holds step 4
        return real_loss(*a, **kw)

    monkeypatch.setattr(heal_mod, "distill_loss", interrupt_in_step_6)
    r = CliRunner().invoke(main, ["heal", artifact, "--out", out, *HEAL])
    assert r.exit_code != 0 and "holds step 4" in r.output and "--resume" in r.output, r.output
    assert os.path.isfile(ckpt) and not os.path.exists(out)          # nothing half-written
    monkeypatch.setattr(heal_mod, "distill_loss", real_loss)
    r = run(["heal", artifact, "--out", out, *HEAL[:-1], "--resume"])  # progress on: the message goes to stderr
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stderr and "at step 4" in r.stderr, r.stderr
    assert not os.path.exists(ckpt)
    want, got = factors(rd.load(healed[0])), factors(rd.load(out))
    for n in want:
        for a, b in zip(want[n], got[n]):
            assert torch.equal(a, b), n
    rec = json.load(open(os.path.join(out, "rocket.json")))["heal"]
    assert rec["loss_curve"] == json.load(open(os.path.join(healed[0], "rocket.json")))["heal"]["loss_curve"]


def test_resume_with_other_options_or_no_checkpoint_refused(artifact, tmp_path):
    out = str(tmp_path / "x")
    one_line_error(run(["heal", artifact, "--out", out, *HEAL, "--resume"]), "no checkpoint", "without --resume")


def test_missing_artifact(tmp_path):
    one_line_error(run(["heal", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]), "not a directory")


def test_out_is_the_input(artifact):
    one_line_error(run(["heal", artifact, "--out", artifact, *HEAL]), "is the input artifact", "another --out")
    one_line_error(run(["heal", artifact, "--out", artifact, "--overwrite", *HEAL]), "is the input artifact")
    assert os.path.isfile(os.path.join(artifact, "rocket.json"))


def test_not_a_rocket_folder(tiny_llama_dir, tmp_path):
    one_line_error(run(["heal", tiny_llama_dir, "--out", str(tmp_path / "o")]), "no rocket.json")


def test_out_holding_user_files_is_never_replaced(artifact, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    one_line_error(run(["heal", artifact, "--out", str(user), "--overwrite", *HEAL]), "not a rocket-deploy artifact")
    assert (user / "notes.txt").read_text() == "keep me"


def test_quantized_artifact_refused(tiny_llama_dir, tmp_path):
    q = str(tmp_path / "int8")
    r = run(["compress", tiny_llama_dir, "--budget", "0.3", "--quantize", "int8", "--out", q, *COMPRESS])
    assert r.exit_code == 0, r.output
    one_line_error(run(["heal", q, "--out", str(tmp_path / "o"), *HEAL]), "quantized", "fp16 artifact")


def test_wrong_dense_teacher_refused(artifact, tmp_path, tiny_tok):
    from rocket_deploy.testing import tiny_llama
    other = tmp_path / "other"
    tiny_llama(seed=7).save_pretrained(other)
    tiny_tok.save_pretrained(other)
    one_line_error(run(["heal", artifact, "--out", str(tmp_path / "o"), "--dense", str(other), *HEAL]),
                   "fingerprint", "--dense")


def test_sources_added_by_healing_count_as_calibrated(artifact, tmp_path):
    """Text healing trained on is held out by eval and never reported as never-calibrated."""
    from rocket_deploy.config import CalibrationConfig
    from rocket_deploy.evaluation import expand_domains
    out = str(tmp_path / "pkg")
    r = run(["heal", artifact, "--out", out, "--steps", "2", *HEAL[2:], "--calib", "stdlib", "--calib", "pkgdocs"])
    assert r.exit_code == 0, r.output
    m = rd.artifact.read_manifest(out)
    cal = CalibrationConfig.from_dict(m["calibration"]["config"])
    assert "pkgdocs" in cal.sources and m["calibration"]["heal_added_sources"] == ["pkgdocs"]
    assert m["heal"]["calibration"]["config"]["sources"] == ["stdlib", "pkgdocs"]
    assert "pkgdocs" not in expand_domains(["never-calibrated"], cal)
    assert "pkgdocs" in expand_domains(["never-calibrated"], CalibrationConfig.from_dict(
        rd.artifact.read_manifest(artifact)["calibration"]["config"]))
