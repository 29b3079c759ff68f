"""rocket_deploy.safe_io: what --overwrite may replace, the recoverable swap, SIGTERM as Ctrl-C (issue 12)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rocket_deploy.safe_io import (OutputError, atomic_directory, check_output, recover_swap, sigterm_as_interrupt,
                                   stray_temporaries)


def _tree(path):
    """{relative path: content} of every file below ``path`` (what must survive a refused overwrite)."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def _write(path, files):
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def test_refuses_unrelated_folder_and_names_its_content(tmp_path):
    out = tmp_path / "photos"
    _write(out, {"a.jpg": "1", "b.jpg": "2"})
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match=r"not a rocket-deploy artifact \(no rocket.json; it holds a.jpg, b.jpg\)"):
        with atomic_directory(str(out), overwrite=True) as tmp:
            _write(tmp, {"rocket.json": "{}"})
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("which", ["cwd", "parent-of-cwd", "input", "parent-of-input"])
def test_refuses_cwd_input_and_their_parents(tmp_path, monkeypatch, which):
    work = tmp_path / "work" / "inner"
    model = tmp_path / "models" / "llama"
    # even when marked as ours: the current directory and the input are never replaced
    _write(work, {"rocket.json": "{}", "notes.txt": "keep"})
    _write(model, {"rocket.json": "{}", "config.json": "{}"})
    monkeypatch.chdir(work)
    target = {"cwd": work, "parent-of-cwd": work.parent, "input": model, "parent-of-input": model.parent}[which]
    _write(target, {"rocket.json": "{}"})
    before = _tree(tmp_path)
    what = "the current directory" if "cwd" in which else "the input"
    with pytest.raises(OutputError, match=f"refusing to overwrite .*: it (is|contains) {what}"):
        check_output(str(target), overwrite=True, kind="artifact", inputs=[str(model)])
    assert _tree(tmp_path) == before


def test_refuses_a_file_and_wrong_kind(tmp_path):
    f = tmp_path / "out"
    f.write_text("data")
    with pytest.raises(OutputError, match="it is a file"):
        check_output(str(f), overwrite=True)
    art = tmp_path / "art"
    _write(art, {"rocket.json": "{}"})
    with pytest.raises(OutputError, match=r"not a rocket-deploy export \(no export.json"):
        check_output(str(art), overwrite=True, kind="export")
    assert f.read_text() == "data" and (art / "rocket.json").exists()


def test_without_overwrite_existing_is_refused(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(OutputError, match="already exists; choose another --out or pass --overwrite"):
        check_output(str(tmp_path / "e"))


@pytest.mark.parametrize("kind,marker", [("artifact", "rocket.json"), ("export", "export.json"),
                                         ("triton", ".rocket-deploy-triton")])
def test_replaces_ours_and_empty_folders(tmp_path, kind, marker):
    out = tmp_path / "o"
    _write(out, {marker: "old", "x": "old"})
    with atomic_directory(str(out), overwrite=True, kind=kind, marker=kind == "triton") as tmp:
        _write(tmp, {marker: "new"} if kind != "triton" else {"config.pbtxt": "new"})
    assert (out / marker).exists() and not (out / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["o"]            # no .tmp-* / .old-* / journal left
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(str(empty), overwrite=True, kind=kind) as tmp:
        _write(tmp, {"f": "1"})
    assert (empty / "f").read_text() == "1"


def test_parent_not_writable_fails_before_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is not a writable directory"):
        check_output(str(blocker / "out"))
    if os.geteuid() != 0:           # root may write anywhere: the permission case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(OutputError, match=f"cannot write .*: {ro} is not a writable directory"):
                check_output(str(ro / "out"))
        finally:
            ro.chmod(0o755)


def _half_swapped(tmp_path, stage):
    """Reproduce the moment a killed run left: journal written, and ``stage`` renames done."""
    out = tmp_path / "art"
    _write(out, {"rocket.json": "old"})
    new = tmp_path / ".tmp-art-x"
    _write(new, {"rocket.json": "new"})
    journal = tmp_path / ".art.rocket-swap.json"
    journal.write_text(json.dumps({"out": "art", "new": new.name, "old": ".old-art-x"}))
    if stage >= 1:
        os.replace(out, tmp_path / ".old-art-x")
    return out


@pytest.mark.parametrize("stage", [0, 1])
def test_recover_finishes_a_half_done_swap(tmp_path, stage):
    out = _half_swapped(tmp_path, stage)
    assert recover_swap(str(out)) == "finished"
    assert (out / "rocket.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_recover_rolls_back_when_the_new_output_is_gone(tmp_path):
    out = _half_swapped(tmp_path, 1)
    import shutil
    shutil.rmtree(tmp_path / ".tmp-art-x")
    assert recover_swap(str(out)) == "rolled back"
    assert (out / "rocket.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["art"]


def test_read_manifest_recovers_a_swap_killed_between_the_renames(tmp_path):
    """A real process killed (SIGKILL) after ``out -> .old-*`` and before ``.tmp-* -> out``: ``--out`` does not
    exist; the next read_manifest / load finishes the swap."""
    from rocket_deploy.artifact import read_manifest
    out = tmp_path / "art"
    _write(out, {"rocket.json": json.dumps({"format": "old"})})
    script = textwrap.dedent(f"""
        import json, os, signal
        from rocket_deploy import safe_io
        real_replace, calls = os.replace, []
        def replace(a, b):
            real_replace(a, b)
            calls.append(b)
            if os.path.basename(str(b)).startswith(".old-"):
                os.kill(os.getpid(), signal.SIGKILL)
        safe_io.os.replace = replace
        with safe_io.atomic_directory({str(out)!r}, overwrite=True) as tmp:
            m = {{"format": "rocket-deploy/artifact", "format_version": 1, "architecture": "X", "layers": {{}}}}
            open(os.path.join(tmp, "rocket.json"), "w").write(json.dumps(m))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and any(n.startswith(".old-art-") for n in os.listdir(tmp_path))
    m = read_manifest(str(out))
    assert m["architecture"] == "X"
    assert sorted(os.listdir(tmp_path)) == ["art"] and stray_temporaries(str(out)) == []


def test_sigterm_becomes_keyboard_interrupt_and_cleans_up(tmp_path):
    """SIGTERM inside atomic_directory (real signal, real process): the temporary folder is removed, the old
    output is untouched, the process exits through the Ctrl-C path."""
    out = tmp_path / "art"
    _write(out, {"rocket.json": "old"})
    script = textwrap.dedent(f"""
        import os, sys, time
        from rocket_deploy.safe_io import atomic_directory, sigterm_as_interrupt
        try:
            with sigterm_as_interrupt(), atomic_directory({str(out)!r}, overwrite=True) as tmp:
                open(os.path.join(tmp, "rocket.json"), "w").write("new")
                print("READY", tmp, flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            sys.exit(130)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY"), line
    tmp = line.split()[1]
    assert os.path.isdir(tmp)
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "INTERRUPTED" in rest
    assert not os.path.exists(tmp) and sorted(os.listdir(tmp_path)) == ["art"]
    assert (out / "rocket.json").read_text() == "old"


def test_sigterm_handler_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
