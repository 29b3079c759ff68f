"""Damaged artifacts: one-line ArtifactError naming the file and the field, never a traceback or a silently
wrong model (issue 12). Schema: rocket_deploy.manifest; per-file SHA-256 checked on load."""
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load as load_bytes, save_file

from rocket_deploy.artifact import ArtifactWarning, load_artifact, read_manifest
from rocket_deploy.manifest import ArtifactError, file_records, sha256_file


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_tok):
    from _rocket_fixtures import make_artifact

    from rocket_deploy.testing import tiny_llama
    return make_artifact(tiny_llama(), tiny_tok, str(tmp_path_factory.mktemp("m") / "a"))


def _copy(artifact, tmp_path, edit_manifest=None, rehash=False):
    """A copy of the artifact; ``edit_manifest(m)`` mutates (or returns a replacement of) rocket.json;
    ``rehash`` re-records the file hashes (a damaged file that its manifest agrees with)."""
    q = str(tmp_path / "v")
    shutil.copytree(artifact, q)
    mpath = os.path.join(q, "rocket.json")
    m = json.load(open(mpath))
    if rehash:
        m["files"] = file_records(q)
    if edit_manifest is not None:
        r = edit_manifest(m)
        if isinstance(r, list) or (isinstance(r, dict) and "format" in r):     # a replacement, not pop()'s value
            m = r
    with open(mpath, "w") as f:
        json.dump(m, f)
    return q


def _layer(m, sparse=True):
    return next(n for n, r in m["layers"].items() if r["kind"] == "rocket" and (r["keep"] < r["rank"]) == sparse)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_sha256_recorded_per_file(artifact):
    m = read_manifest(artifact)
    names = set(m["files"])
    assert {"factors.safetensors", "model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "rocket.json" not in names
    for n, rec in m["files"].items():
        assert rec["sha256"] == sha256_file(os.path.join(artifact, n))
        assert rec["bytes"] == os.path.getsize(os.path.join(artifact, n))


def test_flipped_bytes_are_caught_and_no_verify_skips(artifact, tmp_path):
    q = _copy(artifact, tmp_path)
    f = os.path.join(q, "factors.safetensors")
    b = bytearray(open(f, "rb").read())
    b[-100] ^= 0xFF                             # inside tensor data: the file still parses
    open(f, "wb").write(bytes(b))
    with pytest.raises(ArtifactError) as e:
        load_artifact(q)
    assert f"{f} does not match its SHA-256 in rocket.json" in _one_line(e) and "--no-verify" in str(e.value)
    model, _, _ = load_artifact(q, verify=False)        # the escape hatch loads (the damage is the user's call)
    assert isinstance(model, torch.nn.Module)


def test_truncated_file(artifact, tmp_path):
    q = _copy(artifact, tmp_path)
    f = os.path.join(q, "factors.safetensors")
    b = open(f, "rb").read()
    open(f, "wb").write(b[: len(b) // 2])
    with pytest.raises(ArtifactError, match="truncated or damaged") as e:
        load_artifact(q)
    assert f in _one_line(e)
    with pytest.raises(ArtifactError, match="is not a readable safetensors file") as e:
        load_artifact(q, verify=False)
    assert f in _one_line(e)


@pytest.mark.parametrize("kind", ["garbage", "pickle"])
def test_garbage_or_pickle_instead_of_safetensors(artifact, tmp_path, kind):
    q = _copy(artifact, tmp_path)
    f = os.path.join(q, "model.safetensors")
    if kind == "pickle":
        torch.save(load_bytes(open(f, "rb").read()), f)      # (not mmap'd: the file is rewritten)
    else:
        open(f, "wb").write(os.urandom(4096))
    json.dump({**json.load(open(os.path.join(q, "rocket.json"))), "files": file_records(q)},
              open(os.path.join(q, "rocket.json"), "w"))      # hashes agree: only the format check can catch it
    with pytest.raises(ArtifactError, match="is not a readable safetensors file") as e:
        load_artifact(q)
    assert f in _one_line(e)


def _keep_above_rank(m):
    n = _layer(m)
    m["layers"][n]["keep"] = m["layers"][n]["rank"] + 1


def _rank_too_large(m):
    n = _layer(m)
    m["layers"][n]["rank"] = 10 ** 6


def _unknown_dense_layer(m):
    n = _layer(m)
    m["layers"]["model.layers.9.mlp.up_proj"] = dict(m["layers"][n], kind="dense", rank=None, keep=None)


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: [m], r"rocket.json: the manifest is a JSON list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "layers"}, r"rocket.json: layers: Field required"),
    (lambda m: m.update(layers=[1]), r"rocket.json: layers: Input should be a valid dictionary"),
    (_keep_above_rank, r"rocket.json: layers\['model\.layers\.\d\.[a-z_.]+'\]: keep \(\d+\) > rank \(\d+\)"),
    (_rank_too_large, r"rocket.json: layers\['[^']+'\]: rank \(1000000\) must be in \[1, min\(d_in, d_out\)"),
    (lambda m: m["layers"][_layer(m)].update(kind="lowrank"), r"layers\['[^']+'\]\.kind: Input should be"),
    (lambda m: m["layers"][_layer(m)].pop("d_in"), r"layers\['[^']+'\]\.d_in: Field required"),
    (lambda m: m["tied"].update({"lm_head.weight": 5}), r"rocket.json: tied\['lm_head.weight'\]: Input should be a valid string"),
    (lambda m: m["tied"].update({"lm_head.weight": "lm_head.weight"}), r"tied\['lm_head.weight'\] = 'lm_head.weight' is not an alias"),
    (lambda m: m["tied"].update({"lm_head.weight": "nope"}), r"rocket.json: tied\['lm_head.weight'\]: the target 'nope' is not in model.safetensors"),
    (lambda m: m["tied"].update({"no.such.weight": "model.embed_tokens.weight"}), r"rocket.json: tied\['no.such.weight'\]: LlamaForCausalLM has no tensor"),
    (_unknown_dense_layer, r"rocket.json: layers\['model.layers.9.mlp.up_proj'\]: LlamaForCausalLM has no linear layer of that name"),
    (lambda m: m["layers"][_layer(m)].update(d_in=65, kind="dense"), r"layers\['[^']+'\]: d_in x d_out 65x\d+ but the model's layer is 64x\d+"),
    (lambda m: m.update(format_version="x"), r"rocket.json: format_version: 'x' is not an integer"),
], ids=["array", "no-layers", "layers-list", "keep>rank", "rank>min", "kind", "no-d_in", "tied-type", "tied-self",
        "tied-target", "tied-alias", "unknown-layer", "wrong-d_in", "version"])
def test_bad_manifest_one_line_error(artifact, tmp_path, edit, pattern):
    q = _copy(artifact, tmp_path, edit)
    with pytest.raises(ArtifactError, match=pattern) as e:
        load_artifact(q)
    _one_line(e)
    assert os.path.isfile(os.path.join(q, "factors.safetensors"))        # nothing deleted


def test_wrong_rank_against_the_tensors(artifact, tmp_path):
    """A rank the schema accepts but the stored factors contradict: named by file, tensor and layer."""
    def edit(m):
        m["layers"][_layer(m, sparse=False)]["rank"] -= 8
        m["layers"][_layer(m, sparse=False)]["keep"] -= 8
    q = _copy(artifact, tmp_path, edit)
    with pytest.raises(ArtifactError, match=r"factors.safetensors: model\.[a-z0-9_.]+\.u has shape \[\d+, \d+\] but "
                                            r"layers\['[^']+'\] in rocket.json \(rank \d+, keep \d+\) implies") as e:
        load_artifact(q)
    _one_line(e)


def test_factor_tensor_of_wrong_shape(artifact, tmp_path):
    q = _copy(artifact, tmp_path)
    f = os.path.join(q, "factors.safetensors")
    t = load_bytes(open(f, "rb").read())
    k = next(k for k in t if k.endswith(".v_values"))
    t[k] = t[k][:, :-1].contiguous()
    save_file(t, f)
    with pytest.raises(ArtifactError, match=rf"factors.safetensors: {k} has shape"):
        load_artifact(q, verify=False)


def test_missing_tokenizer_warns_and_errors_where_text_is_needed(artifact, tmp_path):
    q = _copy(artifact, tmp_path)
    for n in os.listdir(q):
        if n.startswith("tokenizer") or n in ("special_tokens_map.json", "chat_template.jinja"):
            os.remove(os.path.join(q, n))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model, tok, _ = load_artifact(q, verify=False)
    assert tok is None and isinstance(model, torch.nn.Module)
    msgs = [str(x.message) for x in w if issubclass(x.category, ArtifactWarning)]
    assert len(msgs) == 1 and "has no usable tokenizer" in msgs[0] and q in msgs[0]
    with pytest.raises(ArtifactError, match="has no usable tokenizer .*text input needs one") as e:
        load_artifact(q, verify=False, need_tokenizer=True)
    _one_line(e)


def test_broken_tokenizer_file(artifact, tmp_path):
    q = _copy(artifact, tmp_path)
    with open(os.path.join(q, "tokenizer.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="has no usable tokenizer"):
        load_artifact(q, verify=False, need_tokenizer=True)
    with pytest.warns(ArtifactWarning, match="has no usable tokenizer"):
        load_artifact(q, verify=False)


def test_old_artifacts_without_file_records_still_load(artifact, tmp_path):
    q = _copy(artifact, tmp_path, lambda m: m.pop("files"))
    model, tok, m = load_artifact(q)
    assert "files" not in m and tok is not None
