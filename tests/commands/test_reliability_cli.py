"""Issue 12 through the CLI: nothing lost (--overwrite rules, SIGTERM cleanup, writable parent checked first),
nothing run (trust_remote_code), nothing silently wrong (hashes, manifest schema, tokenizer, profile and dense
model fingerprints, --seq-len, --calib DIR). Every test asserts the message and that nothing was deleted."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from rocket_deploy.cli import main

FAST = ["--calib", "stdlib", "--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet"]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def snapshot(path):
    """{relative path: sha256} of every file below ``path``."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def clean_error(r, code=None):
    assert "Traceback" not in r.output, r.output
    if code is not None:
        assert r.exit_code == code, r.output
    else:
        assert r.exit_code != 0, r.output
    return r.output


def save_model(path, seed=0, tok=None):
    from rocket_deploy.testing import tiny_llama, tiny_tokenizer
    tiny_llama(seed=seed).save_pretrained(path)
    (tok or tiny_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("src") / "model")


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("art") / "art")
    r = run(["compress", model_dir, "--budget", "0.3", "--out", out, *FAST])
    assert r.exit_code == 0, r.output
    return out


def _forbid_model_loading(monkeypatch):
    """For the refusal tests: loading the model at all means the check came too late."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr("rocket_deploy.models.load_model", boom)


@pytest.mark.parametrize("where", ["unrelated", "source-model", "cwd", "parent-of-input"])
def test_compress_overwrite_refuses_what_is_not_ours(tmp_path, monkeypatch, where):
    src = save_model(tmp_path / "models" / "llama")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("1")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    _forbid_model_loading(monkeypatch)
    out = {"unrelated": str(other), "source-model": src, "cwd": ".", "parent-of-input": str(tmp_path / "models")}[where]
    before = snapshot(tmp_path)
    r = run(["compress", src, "--out", out, "--overwrite", *FAST])
    msg = clean_error(r, 1)
    assert "refusing to overwrite" in msg
    assert {"unrelated": "not a rocket-deploy artifact (no rocket.json; it holds a.jpg)",
            "source-model": "it is the input", "cwd": "it is the current directory",
            "parent-of-input": "it contains the input"}[where] in msg
    assert snapshot(tmp_path) == before


def test_compress_unwritable_parent_fails_before_work(tmp_path, monkeypatch, model_dir):
    _forbid_model_loading(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = run(["compress", model_dir, "--out", str(blocker / "art"), *FAST])
    assert f"{blocker} is not a writable directory" in clean_error(r, 1)
    assert os.listdir(tmp_path) == ["file.txt"]


def test_export_overwrite_refuses_its_input_and_foreign_folders(artifact, tmp_path, monkeypatch):
    before = snapshot(artifact)
    r = run(["export", artifact, "--out", artifact, "--overwrite", "--no-validate"])
    assert "refusing to overwrite" in clean_error(r, 1) and "it is the input" in r.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_text("x")
    r = run(["export", artifact, "--out", str(foreign), "--overwrite", "--no-validate"])
    assert "not a rocket-deploy export (no export.json; it holds data.bin)" in clean_error(r, 1)
    # the Triton model folder is checked before the export runs: nothing is written at --out either
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text("someone else's")
    r = run(["export", artifact, "--out", str(tmp_path / "onnx"), "--triton-repo", str(repo), "--triton-name", "m",
             "--overwrite", "--no-validate"])
    assert "not a rocket-deploy triton (no .rocket-deploy-triton" in clean_error(r, 1)
    assert not (tmp_path / "onnx").exists() and (repo / "m" / "config.pbtxt").read_text() == "someone else's"
    assert snapshot(artifact) == before and (foreign / "data.bin").exists()


def _signal_script(tmpdir, patch_target, args):
    """A real ``rocket-deploy`` process that prints READY and sleeps inside ``patch_target``."""
    return textwrap.dedent(f"""
        import os, sys, time, importlib
        os.environ["TMPDIR"] = {tmpdir!r}
        import tempfile; tempfile.tempdir = None
        mod_name, attr = {patch_target!r}.rsplit(":", 1)
        mod = importlib.import_module(mod_name)
        real = getattr(mod, attr)
        def slow(*a, **k):
            out = real(*a, **k)
            print("READY", flush=True)
            time.sleep(120)
            return out
        setattr(mod, attr, slow)
        from rocket_deploy.cli import main
        main({args!r})
    """)


@pytest.mark.parametrize("stage,target", [
    ("profile", "rocket_deploy.compress.pipeline:output_sensitivity"),     # the profile cache exists in TMPDIR
    ("save", "rocket_deploy.artifact:file_records"),                       # the .tmp-* output exists beside --out
])
def test_sigterm_cleans_up_and_keeps_the_old_artifact(artifact, tmp_path, model_dir, stage, target):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = snapshot(out)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = _signal_script(str(tmpdir), target, ["compress", model_dir, "--out", str(out), "--overwrite", *FAST])
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = p.stdout.readline()
    assert line.strip() == "READY", p.communicate(timeout=60)
    if stage == "profile":
        assert any(n.startswith("rocket-profile-") for n in os.listdir(tmpdir))
    else:
        assert any(n.startswith(".tmp-art-") for n in os.listdir(tmp_path))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Aborted" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["art", "tmp"]                  # no .tmp-art-* / .old-art-* / journal
    assert os.listdir(tmpdir) == []                                        # no rocket-profile-*
    assert snapshot(out) == before


def test_trust_remote_code_off_by_default(tmp_path, monkeypatch):
    """A folder whose config/tokenizer point at its own Python (auto_map): without --trust-remote-code nothing
    runs and nothing asks; with it, the code does run (so the test would see it)."""
    src = save_model(tmp_path / "evil")
    marker = tmp_path / "MARKER"
    code = (f"open({str(marker)!r}, 'a').write('ran\\n')\n"
            "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
            "class EvilTok(PreTrainedTokenizerFast):\n    pass\n"
            "class EvilConfig(LlamaConfig):\n    pass\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    (tmp_path / "evil" / "evil.py").write_text(code)
    for fname, amap in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
                        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTok"]})):
        p = tmp_path / "evil" / fname
        p.write_text(json.dumps({**json.loads(p.read_text()), "auto_map": amap}))
    art = str(tmp_path / "art")
    r = run(["compress", src, "--out", art, *FAST], input="y\n")
    assert r.exit_code == 0, r.output
    assert not marker.exists() and "custom code" not in r.output and "[y/N]" not in r.output
    # the artifact carries the auto_map and the code: loading it (eval, the API) runs nothing either
    shutil.copy(tmp_path / "evil" / "evil.py", art)
    from rocket_deploy.manifest import file_records
    m = json.load(open(os.path.join(art, "rocket.json")))
    m["files"] = file_records(art)
    json.dump(m, open(os.path.join(art, "rocket.json"), "w"))
    import rocket_deploy as rd
    rd.load_artifact(art)
    r = run(["eval", art, "--domains", "stdlib", "--samples", "1", "--seq-len", "16", "--json"], input="y\n")
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    r = run(["eval", art, "--domains", "stdlib", "--samples", "1", "--seq-len", "16", "--json", "--trust-remote-code"])
    assert r.exit_code == 0, r.output
    assert marker.exists()                  # the flag is wired: the folder's code ran, as documented


def test_export_fails_on_damaged_factors_and_exits_nonzero_when_validation_fails(artifact, tmp_path):
    q = tmp_path / "nan"
    shutil.copytree(artifact, q)
    f = q / "factors.safetensors"
    raw = bytearray(f.read_bytes())             # same size, still a valid file: one fp16 value of U becomes NaN
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    k = next(k for k in header if k.endswith(".u"))
    assert header[k]["dtype"] == "F16"
    start = 8 + hlen + header[k]["data_offsets"][0]
    raw[start:start + 2] = (0x7E00).to_bytes(2, "little")
    f.write_bytes(bytes(raw))
    r = run(["export", str(q), "--out", str(tmp_path / "o1")])
    assert "factors.safetensors does not match its SHA-256 in rocket.json" in clean_error(r, 2)
    assert not (tmp_path / "o1").exists()
    r = run(["export", str(q), "--out", str(tmp_path / "o2"), "--no-verify", "--json"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["passed"] is False
    assert "does NOT match torch" in r.stderr


def _edited(artifact, tmp_path, edit):
    q = tmp_path / "bad"
    shutil.copytree(artifact, q)
    mpath = q / "rocket.json"
    m = json.loads(mpath.read_text())
    r = edit(m)
    if isinstance(r, list) or (isinstance(r, dict) and "format" in r):     # a replacement, not pop()'s value
        m = r
    mpath.write_text(json.dumps(m))
    return str(q)


def _keep_above_rank(m):
    n = next(n for n, r in m["layers"].items() if r["kind"] == "rocket")
    m["layers"][n]["keep"] = m["layers"][n]["rank"] + 1


CASES = {"array": (lambda m: [m], "rocket.json: the manifest is a JSON list, not an object"),
         "no-layers": (lambda m: {k: v for k, v in m.items() if k != "layers"}, "rocket.json: layers: Field required"),
         "keep>rank": (_keep_above_rank, "rocket.json: layers['model.layers."),
         "tied": (lambda m: m["tied"].update({"lm_head.weight": "nope"}), "tied['lm_head.weight']: the target 'nope'")}


@pytest.mark.parametrize("case,command", [(c, cmd) for c in CASES for cmd in ("inspect", "export", "eval")
                                          if not (c == "tied" and cmd == "inspect")])   # inspect reads no tensors
def test_damaged_manifest_is_a_one_line_error_everywhere(artifact, tmp_path, case, command):
    edit, pattern = CASES[case]
    q = _edited(artifact, tmp_path, edit)
    before = snapshot(q)
    args = {"inspect": ["inspect", q, "--plot", "-"], "export": ["export", q, "--out", str(tmp_path / "o")],
            "eval": ["eval", q, "--domains", "stdlib", "--samples", "1"]}[command]
    r = run(args)
    out = clean_error(r, 2)
    # export's progress lines ("[export  0.0s] loading ...") go to stderr before the error; the error is still one line
    out = "".join(ln for ln in out.splitlines(keepends=True) if not ln.startswith("[export "))
    assert pattern in out and out.count("\n") <= 4
    assert snapshot(q) == before and not (tmp_path / "o").exists()


def test_inspect_names_missing_report_fields(artifact, tmp_path):
    q = _edited(artifact, tmp_path, lambda m: m["budget"].pop("dense_bytes"))
    r = run(["inspect", q, "--plot", "-"])
    assert "rocket.json: budget.dense_bytes: missing or not a number" in clean_error(r, 2)


def test_eval_needs_a_tokenizer(artifact, tmp_path):
    q = tmp_path / "notok"
    shutil.copytree(artifact, q)
    (q / "tokenizer.json").write_text("{broken")
    r = run(["eval", str(q), "--domains", "stdlib", "--samples", "1", "--no-verify"])
    assert "has no usable tokenizer" in clean_error(r, 2) and "text input needs one" in r.output


def test_eval_finds_its_dense_model_and_checks_it(tmp_path, monkeypatch):
    """The relative source spec is not resolved against the current directory: from another directory holding
    a different model of that name, eval still compares against the recorded model; moved together with its
    model, the artifact finds it relative to itself; a different model in its place is refused."""
    home = tmp_path / "home"
    home.mkdir()
    save_model(home / "model", seed=0)
    monkeypatch.chdir(home)
    r = run(["compress", "model", "--out", "art", *FAST])
    assert r.exit_code == 0, r.output
    args = ["eval", str(home / "art"), "--domains", "stdlib", "--samples", "2", "--seq-len", "32", "--json"]
    ref = json.loads(run(args).stdout.strip().splitlines()[-1])["domains"]["stdlib"]["dense"]
    decoy = tmp_path / "elsewhere"
    decoy.mkdir()
    save_model(decoy / "model", seed=7)
    monkeypatch.chdir(decoy)
    r = run(args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["domains"]["stdlib"]["dense"] == ref
    moved = tmp_path / "moved"
    shutil.move(str(home), str(moved))
    r = run(["eval", str(moved / "art"), *args[2:]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["domains"]["stdlib"]["dense"] == ref
    shutil.rmtree(moved / "model")
    save_model(moved / "model", seed=7)
    before = snapshot(moved)
    r = run(["eval", str(moved / "art"), *args[2:]])
    msg = clean_error(r, 2)
    assert "is not the model" in msg and "was compressed from (fingerprint" in msg and "--dense" in msg
    r = run(["eval", str(moved / "art"), *args[2:], "--dense", str(decoy / "model")])   # explicit: warned
    assert r.exit_code == 0 and "warning: the dense model" in r.stderr
    assert snapshot(moved) == before


def test_seq_len_longer_than_positions(artifact, model_dir, tmp_path):
    r = run(["compress", model_dir, "--out", str(tmp_path / "a"), *FAST[:-3], "--seq-len", "512", "--quiet"])
    assert "--seq-len 512 is longer than the model's 256 positions; pass --seq-len 256 or less" in clean_error(r, 1)
    r = run(["eval", artifact, "--domains", "stdlib", "--samples", "1", "--seq-len", "300"])
    assert "--seq-len 300 is longer than the model's 256 positions" in clean_error(r, 1)
    assert not (tmp_path / "a").exists()


def test_calib_directory_message(model_dir, tmp_path):
    (tmp_path / "texts").mkdir()
    r = run(["compress", model_dir, "--out", str(tmp_path / "a"), "--calib", str(tmp_path / "texts"),
             "--calib-samples", "8", "--seq-len", "32", "--quiet"])
    msg = clean_error(r, 1)
    assert "is a directory; pass a .txt or .jsonl file" in msg and "does not exist" not in msg


def test_profile_dir_of_another_model_is_refused(model_dir, tmp_path):
    prof = tmp_path / "prof"
    r = run(["compress", model_dir, "--out", str(tmp_path / "a"), "--profile-dir", str(prof), *FAST])
    assert r.exit_code == 0, r.output
    before = snapshot(prof)
    other = save_model(tmp_path / "other", seed=5)
    r = run(["compress", other, "--out", str(tmp_path / "b"), "--profile-dir", str(prof), *FAST])
    msg = clean_error(r, 1)
    assert f"the profile in {prof} was made from another model (fingerprint" in msg and "--profile-dir" in msg
    assert snapshot(prof) == before and not (tmp_path / "b").exists()
    r = run(["compress", model_dir, "--out", str(tmp_path / "c"), "--profile-dir", str(prof), *FAST[:-1]])
    assert r.exit_code == 0 and "reusing profile" in r.output          # the same model still reuses it
