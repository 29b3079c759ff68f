"""Profiling spread over several processes (torch.distributed, gloo on the CPU) gives the single-process profile:
every layer option, the whitening and eigenbasis files, and through torchrun the same artifact."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rocket_deploy.compress.distributed import assign, barrier, broadcast, gather, world
from rocket_deploy.compress.pipeline import prepare_calibration, run_profile
from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.testing import tiny_llama

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4, sources=("stdlib",))
GRID = {"byte_fractions": (0.3, 0.6), "keep_ratios": (1.0, 0.5)}      # small: the test is about who computes
CONFIGS = {
    "fp16": RocketConfig(**GRID),
    "int8": RocketConfig(quantize="int8", budget=0.6, **GRID),
    "dense-int4": RocketConfig(method="dense-quant", quantize="int4", quant_group_size=32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ROCKET_DIST_BACKEND="gloo", **extra)
    return env


def _tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path) if path.endswith(".safetensors") else {}


def test_single_process_world_and_helpers():
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    w = world()
    assert (w.rank, w.size, w.main) == (0, 1, True)
    assert broadcast({"a": 1}) == {"a": 1} and gather(3) == [3]
    # longest first to the least-loaded rank: deterministic, balanced, every rank used
    assert assign([5, 1, 4, 1, 3, 1], 2) == [0, 0, 1, 0, 1, 0]        # loads 8 and 7
    assert assign([2.0, 2.0, 2.0], 1) == [0, 0, 0]
    assert assign([3, 3], 4) == [0, 1]


def _rank(rank: int, port: int, data, work: str) -> None:
    """One rank, forked from the test process (no second interpreter start, no second import of torch): profiles
    under each of ``CONFIGS`` into ``work/<config>/cache`` (shared by the ranks) and writes ``rank<r>.json`` there
    (the Profile's JSON without its timing, and the layers this rank profiled itself); then profiles once without
    a cache directory (``work/temp-rank<r>.json``)."""
    os.environ.update(_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    torch.set_num_threads(1)
    import rocket_deploy.compress.profile as P
    mine: list[str] = []
    orig = P._profile_one

    def counting(name, *a, **kw):          # the layers this rank profiles itself
        mine.append(name)
        return orig(name, *a, **kw)

    P._profile_one = counting
    w = world()
    for key, cfg in CONFIGS.items():
        mine.clear()
        prof = run_profile(tiny_llama(), None, cfg, CAL, data=data, cache_dir=os.path.join(work, key, "cache"),
                           progress=False)
        d = prof.to_json()
        d.pop("seconds")
        with open(os.path.join(work, key, f"rank{w.rank}.json"), "w") as f:
            json.dump({"profile": d, "mine": list(mine), "world": [w.rank, w.size]}, f)
    # no cache_dir: rank 0 makes the temporary one and owns it (removes it with the Profile), all ranks use it
    prof = run_profile(tiny_llama(), None, CONFIGS["fp16"], CAL, data=data, progress=False)
    with open(os.path.join(work, f"temp-rank{w.rank}.json"), "w") as f:
        json.dump({"cache_dir": prof.cache_dir, "owned": prof.owned, "files": sorted(os.listdir(prof.cache_dir))}, f)
    barrier()
    del prof        # rank 0: the temporary directory goes with the Profile
    os._exit(0)     # a forked child: leave without the parent's exit handlers


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the ranks are forked from the test process")
def test_two_gloo_ranks_give_the_single_process_profile(tiny_tok, tmp_path):
    import multiprocessing as mp
    data = prepare_calibration(tiny_tok, CAL, tiny_llama())
    work = tmp_path / "dist"
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, data, str(work))) for r in range(2)]
    for p in procs:
        p.start()
    # meanwhile, the same profiles in this one process
    single = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as the ranks (and fast on a busy machine)
    try:
        for key, cfg in CONFIGS.items():
            prof = run_profile(tiny_llama(), tiny_tok, cfg, CAL, data=data,
                               cache_dir=str(tmp_path / "single" / key), progress=False)
            d = prof.to_json()
            d.pop("seconds")
            single[key] = d
    finally:
        torch.set_num_threads(threads)
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():        # a rank that failed leaves the other waiting in a collective
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    for key, cfg in CONFIGS.items():
        ranks = [json.load(open(work / key / f"rank{r}.json")) for r in range(2)]
        assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]
        # the layers were shared out: each rank profiled some, none twice, all together every layer
        mine = [set(r["mine"]) for r in ranks]
        assert mine[0] and mine[1] and not mine[0] & mine[1]
        assert mine[0] | mine[1] == set(single[key]["layers"])
        for r in ranks:      # the same Profile on every rank as in one process: every LayerOption field
            assert r["profile"] == single[key]
            assert list(r["profile"]["layers"]) == list(single[key]["layers"])      # same order too
        # the cache: the same files, every tensor equal bit for bit
        dist_dir, single_dir = work / key / "cache", tmp_path / "single" / key
        names = sorted(os.listdir(single_dir))
        assert sorted(os.listdir(dist_dir)) == names
        assert json.load(open(dist_dir / "profile.json"))["layers"] == single[key]["layers"]
        for n in names:
            a, b = _tensors(str(dist_dir / n)), _tensors(str(single_dir / n))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (key, n)
        n_eig = sum(not n.startswith(("group.", "profile", "sensitivity", "timings")) for n in names)
        assert n_eig == (0 if cfg.method == "dense-quant" else len(single[key]["layers"]))

    # without a cache directory: one temporary directory, made and owned by rank 0, removed when it is done
    tmp = [json.load(open(work / f"temp-rank{r}.json")) for r in range(2)]
    files = [[n for n in t["files"] if n != "timings.json"] for t in tmp]    # rank 0 adds it after profiling
    assert tmp[0]["cache_dir"] == tmp[1]["cache_dir"] and files[0] == files[1]
    assert [t["owned"] for t in tmp] == [True, False]
    assert files[0] == sorted(n for n in os.listdir(tmp_path / "single" / "fp16") if n != "timings.json")
    assert not os.path.exists(tmp[0]["cache_dir"])


def _artifact_equal(a: str, b: str) -> None:
    names = sorted(os.listdir(a))
    assert sorted(os.listdir(b)) == names
    for n in names:
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        if n == "rocket.json":
            ma, mb = json.load(open(pa)), json.load(open(pb))
            for m in (ma, mb):          # how long each stage took differs, nothing else may
                m.pop("timings_s", None), m.pop("seconds", None)
                m["files"] = sorted(m.get("files", {}))    # hashes: safetensors metadata order may vary
            assert ma == mb
        elif n.endswith(".safetensors"):
            with safe_open(pa, "pt") as fa, safe_open(pb, "pt") as fb:
                assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), n
        else:
            assert open(pa, "rb").read() == open(pb, "rb").read(), n


def test_torchrun_cli_writes_the_single_process_artifact(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from rocket_deploy.cli import main
    fast = ["--calib", "stdlib", "--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet",
            "--json", "--budget", "0.4"]
    two = str(tmp_path / "two")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "rocket_deploy.cli", "compress", tiny_llama_dir, "--out", two, *fast],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    one = str(tmp_path / "one")      # meanwhile, in this process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--out", one, *fast], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1      # rank 0 prints the summary; the other rank exits quietly
    assert json.loads(lines[0])["out"] == two
    _artifact_equal(one, two)
