"""transformers loads rocket-deploy artifacts natively (quant_method "rocket"), bit-exact with rd.load, and refuses
them loudly when rocket-deploy is not imported (rocket_deploy/hf_quantizer.py, rocket_deploy/hf_register.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from _rocket_fixtures import make_artifact, make_quant_artifact

import rocket_deploy as rd
from rocket_deploy.testing import tiny_bert, tiny_llama, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])


def _out(model):
    with torch.no_grad():
        return model(IDS)[0]


@pytest.fixture(scope="module")
def llama_art(tmp_path_factory):
    return make_artifact(tiny_llama(), tiny_tokenizer(), str(tmp_path_factory.mktemp("hfq") / "llama"))


@pytest.mark.parametrize("kind", ["rocket", "int8", "int4", "int4s", "fp8", "bert"])
def test_from_pretrained_and_save_round_trip_bit_exact(kind, llama_art, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    kw = {"add_pooling_layer": False} if kind == "bert" else {}    # as compressed (rocket.json: architecture_kwargs)
    if kind == "rocket":
        art = llama_art
    elif kind == "bert":
        art = make_artifact(tiny_bert(), tiny_tokenizer(), str(tmp_path / "bert"))
    else:
        scheme = "int4" if kind == "int4s" else kind                # int4s: int4 with 4-bit V values
        art = make_quant_artifact(tiny_llama(hidden=128), tiny_tokenizer(), str(tmp_path / kind), scheme,
                                  group=32 if scheme == "int4" else 128, v_bits=4 if kind == "int4s" else 8)
    ref = rd.load(art)
    model = auto.from_pretrained(art, dtype=torch.float32, **kw)
    types = {type(m).__name__ for m in model.modules()}
    assert types & {"RocketLinear", "QuantRocketLinear", "QuantDenseLinear"}
    expected = _out(ref)
    assert torch.equal(_out(model), expected)
    # fp16: the same stored tensors (rd.load also casts the rotary tables to fp16, transformers keeps them fp32)
    half, ref_half = auto.from_pretrained(art, dtype=torch.float16, **kw), rd.load(art, dtype=torch.float16)
    sa, sb = ref_half.state_dict(), half.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    # save_pretrained of a from_pretrained model and of an rd.load model: loadable, bit-exact, still guarded
    for name, m in (("hf", model), ("rd", ref)):
        out = tmp_path / f"saved-{name}"
        m.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "rocket" and "rocket-deploy" in cfg["transformers_weights"]
        assert torch.equal(_out(auto.from_pretrained(out, dtype=torch.float32, **kw)), expected)


def test_pipeline_generates_like_rd_load(llama_art):
    from transformers import pipeline
    pipe = pipeline("text-generation", model=llama_art, dtype=torch.float32)
    ref = rd.load(llama_art)
    tok = tiny_tokenizer()
    ids = tok("def f(x):", return_tensors="pt").input_ids
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    got = pipe("def f(x):", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == tok.decode(want, skip_special_tokens=True)


def test_artifact_config_carries_the_layer_table(llama_art):
    cfg = json.load(open(os.path.join(llama_art, "config.json")))
    man = json.load(open(os.path.join(llama_art, "rocket.json")))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "rocket" and set(q["layers"]) == {n for n, r in man["layers"].items()
                                                                   if r["kind"] == "rocket"}


def test_transformers_refuses_without_rocket_deploy(llama_art):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({llama_art!r})\n"
            "except ValueError as e:\n    print('REFUSED', e)\n    sys.exit(0)\n"
            "print('LOADED'); sys.exit(1)")
    env = dict(os.environ, PYTHONPATH="")      # no rocket_deploy import anywhere in the child
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "REFUSED" in r.stdout and "rocket-deploy" in r.stdout and "import rocket_deploy" in r.stdout


def test_registration_is_lazy_and_fires_on_transformers_import():
    code = ("import sys, rocket_deploy\nassert 'transformers' not in sys.modules\n"
            "import transformers.quantizers.auto as a\nassert 'rocket' in a.AUTO_QUANTIZER_MAPPING\n"
            "assert 'rocket' in a.AUTO_QUANTIZATION_CONFIG_MAPPING\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr


def test_missing_factors_file_is_refused_not_random(llama_art, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM
    broken = tmp_path / "broken"
    shutil.copytree(llama_art, broken)
    os.remove(broken / "factors.safetensors")
    with pytest.raises(ValueError, match="factors.safetensors"):
        AutoModelForCausalLM.from_pretrained(broken)
