"""Artifact save / load: bit-exact round trip, atomic writes, manifest contents."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import rocket_deploy as rd
from rocket_deploy.artifact import ArtifactError, read_manifest
from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.testing import tiny_llama

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4)


@pytest.fixture(scope="module")
def setup(tiny_tok):
    model = tiny_llama()
    data = prepare_calibration(tiny_tok, CAL, model)
    prof = run_profile(model, tiny_tok, RocketConfig(), CAL, data=data, progress=False)
    return model, data, prof


def test_roundtrip_bit_exact(setup, tiny_tok, tmp_path):
    model, data, prof = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.4), CAL, data=data, profile=prof, progress=False,
                   out=str(tmp_path / "a"))
    loaded, tok, manifest = rd.load_artifact(res.path)
    # every tensor of the saved artifact equals the in-memory compressed model's, bit for bit (fp16 storage)
    saved = {**load_file(os.path.join(res.path, "factors.safetensors")), **load_file(os.path.join(res.path, "model.safetensors"))}
    live = res.model.state_dict()
    for k, t in saved.items():
        assert torch.equal(t, live[k].to(t.dtype)), k
    x = data.heldout.ids[:2]
    assert torch.equal(loaded(x).logits, res.model(x).logits)
    assert any(isinstance(m, RocketLinear) for m in loaded.modules())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight          # tied weights stay tied
    out = loaded.generate(x[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 13
    assert tok is not None and tok.chat_template


def test_manifest_contents(setup, tiny_tok, tmp_path):
    model, data, prof = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False,
                   out=str(tmp_path / "b"))
    m = read_manifest(res.path)
    assert m["format_version"] == 1 and m["method"] == "rocket"
    assert RocketConfig.from_dict(m["config"]).budget == 0.3
    b = m["budget"]
    assert b["compressed_bytes"] <= 0.7 * b["dense_bytes"] + 1
    assert b["compressed_bytes"] == sum(r["bytes"] for r in m["layers"].values())
    assert m["calibration"]["calib_sha256_16"] == data.info["calib_sha256_16"]
    assert set(m["calibration"]["sources"]) == {"stdlib", "pyref", "licenses", "selfgen"}
    assert m["calibration"]["selfgen_docs"] > 0
    assert os.path.getsize(os.path.join(res.path, "calibration-selfgen.jsonl")) > 0   # model text saved beside
    assert m["allocation"]["objective"] == "fisher"
    assert m["allocation"]["safeguard"]["chosen"] in ("knapsack", "uniform")
    for r in m["layers"].values():
        assert r["kind"] in ("rocket", "dense")
        if r["kind"] == "rocket":
            assert 0 < r["keep"] <= r["rank"] and r["rel_original"] > 0


def test_masks_only_for_sparse_layers(setup, tiny_tok, tmp_path):
    model, data, prof = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.4), CAL, data=data, profile=prof, progress=False,
                   out=str(tmp_path / "c"))
    f = load_file(os.path.join(res.path, "factors.safetensors"))
    for name, r in read_manifest(res.path)["layers"].items():
        if r["kind"] == "rocket":
            assert (f"{name}.v_mask" in f) == (r["keep"] < r["rank"])
            assert f[f"{name}.u"].dtype == torch.float16


def test_failed_save_leaves_nothing(setup, tiny_tok, tmp_path, monkeypatch):
    model, data, prof = setup
    import rocket_deploy.artifact as art

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(art, "save_file", boom)
    with pytest.raises(OSError):
        compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False,
                 out=str(tmp_path / "d"))
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(setup, tiny_tok, tmp_path):
    model, data, prof = setup
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False, out=str(out))
    # --overwrite replaces only an artifact (or an empty folder): a folder of other files is kept (issue 12)
    with pytest.raises(FileExistsError, match="not a rocket-deploy artifact"):
        compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False,
                 out=str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    for _ in range(2):
        compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False,
                 out=str(out), overwrite=True)
    assert (out / "rocket.json").exists() and os.listdir(tmp_path) == ["e"]


def test_bad_artifacts(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        read_manifest(str(tmp_path / "nope"))
    with pytest.raises(ArtifactError, match="no rocket.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "rocket.json").write_text(json.dumps({"format": "rocket-deploy/artifact", "format_version": 99}))
    with pytest.raises(ArtifactError, match="newer"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("method", ["rocket-uniform", "svd-llm"])
def test_baselines_at_equal_bytes(setup, tiny_tok, method):
    model, data, prof = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.3, method=method), CAL, data=data, profile=prof, progress=False)
    b = res.manifest["budget"]
    assert b["compressed_bytes"] <= 0.7 * b["dense_bytes"]
    if method == "svd-llm":
        assert all(r["keep"] == r["rank"] for r in res.manifest["layers"].values() if r["kind"] == "rocket")


def test_public_api_one_call(tiny_tok, tmp_path):
    """rd.compress_model(model, tokenizer, config, out=...) does calibration, profile, safeguard and save in one call."""
    model = tiny_llama(seed=3)
    res = rd.compress_model(model, tiny_tok, RocketConfig(budget=0.3), CAL, out=str(tmp_path / "one"), progress=False)
    m = read_manifest(res.path)
    assert m["allocation"]["safeguard"]["chosen"] in ("knapsack", "uniform")
    assert os.path.isfile(os.path.join(res.path, "calibration-selfgen.jsonl"))
    assert isinstance(rd.load(res.path), torch.nn.Module)


def _bert(kind: str):
    import transformers as tf

    from rocket_deploy.testing import tiny_bert
    if kind == "BertModel-no-pooler":
        return tiny_bert()
    torch.manual_seed(1)
    cfg = tiny_bert().config
    if kind == "BertForSequenceClassification":
        cfg.num_labels = 3
    return getattr(tf, kind)(cfg).eval()


def _drop_manifest_field(path: str, field: str) -> None:
    mpath = os.path.join(path, "rocket.json")
    m = json.load(open(mpath))
    m.pop(field)
    json.dump(m, open(mpath, "w"))


@pytest.mark.parametrize("kind", ["BertModel-no-pooler", "BertModel", "BertForMaskedLM",
                                  "BertForSequenceClassification"])
def test_encoder_artifacts_rebuild_their_module_tree(kind, tmp_path):
    """The skeleton is built with the constructor arguments the model was built with (add_pooling_layer=False);
    manifests written before architecture_kwargs existed still load (the arguments are inferred from the keys)."""
    from _rocket_fixtures import make_artifact
    model = _bert(kind)
    path = make_artifact(model, None, str(tmp_path / "a"))
    m = read_manifest(path)
    assert m["architecture"] == type(model).__name__
    assert m["architecture_kwargs"] == ({"add_pooling_layer": False} if kind == "BertModel-no-pooler" else {})
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids)
    for legacy in (False, True):
        if legacy:
            _drop_manifest_field(path, "architecture_kwargs")
            assert "architecture_kwargs" not in read_manifest(path)
        loaded = rd.load(path)
        assert type(loaded) is type(model)
        assert sorted(loaded.state_dict()) == sorted(model.state_dict())
        if kind.startswith("BertModel"):
            assert (loaded.pooler is None) == (model.pooler is None)
        with torch.no_grad():
            out = loaded(input_ids=ids)
        for k in ref.keys():
            if isinstance(ref[k], torch.Tensor):
                assert torch.equal(out[k], ref[k]), (kind, legacy, k)
    if kind == "BertForMaskedLM":     # tied decoder stays tied
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_legacy_manifest_without_architecture_kwargs(setup, tiny_tok, tmp_path):
    """Format-1 decoder artifacts written before the field existed load unchanged."""
    model, data, prof = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False,
                   out=str(tmp_path / "old"))
    assert read_manifest(res.path)["architecture_kwargs"] == {}
    _drop_manifest_field(res.path, "architecture_kwargs")
    x = data.heldout.ids[:1]
    assert torch.equal(rd.load(res.path)(x).logits, res.model(x).logits)


def test_unbuildable_quant_record_is_a_one_line_artifact_error(tiny_tok, tmp_path):
    """A layer record no module can be built from (here V's value format edited to one that does not exist)."""
    from _rocket_fixtures import make_quant_artifact
    art = make_quant_artifact(tiny_llama(hidden=128), tiny_tok, str(tmp_path / "q"), "int4", group=32, v_bits=4)
    mpath = os.path.join(art, "rocket.json")
    m = json.load(open(mpath))
    name = next(n for n, r in m["layers"].items() if r["kind"] == "rocket")
    m["layers"][name]["quant"]["v"] = "int2"
    json.dump(m, open(mpath, "w"))
    with pytest.raises(ArtifactError, match=r"layers\[.*\].*'int2'.*compress again"):
        rd.load(art)
