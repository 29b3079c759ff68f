"""ONNX Runtime GenAI runs an `ort` export folder (genai_config.json written by the export) with the same greedy
tokens as our ORT engine (export/genai_config.py)."""
import json
import os

import numpy as np
import pytest
import torch
from _rocket_fixtures import make_artifact

from rocket_deploy.export.genai_config import GENAI_CONFIG, genai_config
from rocket_deploy.onnx_contract import decoder_io_names
from rocket_deploy.testing import tiny_llama, tiny_tokenizer

PROMPT = [1, 5, 9, 33, 70, 101, 7]


def test_genai_config_follows_the_contract():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
           "vocab_size": 512, "max_position_embeddings": 256, "eos_token_id": 2, "pad_token_id": 3,
           "bos_token_id": 0, "model_type": "qwen2"}
    ins, outs = decoder_io_names(2)
    g = genai_config(cfg, ins, outs)["model"]
    assert g["type"] == "qwen2" and g["decoder"]["head_size"] == 16 and g["decoder"]["num_key_value_heads"] == 2
    assert g["decoder"]["inputs"]["past_key_names"] % 1 == ins[5] and g["decoder"]["outputs"]["present_value_names"] % 0 == outs[2]
    with pytest.raises(ValueError, match="decoder contract"):
        genai_config(cfg, ["input_ids", "attention_mask"], ["last_hidden_state"])


def test_genai_generates_our_greedy_tokens(tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (dev extra) is not installed")
    from rocket_deploy.export.onnx_export import export_artifact
    from rocket_deploy.runtime.bench import greedy_tokens
    from rocket_deploy.runtime.ort_backend import OrtEngine
    model = tiny_llama(seed=3)
    gen_w = torch.Generator().manual_seed(0)
    with torch.no_grad():           # larger weights than the default init: varied greedy tokens, not one repeated
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.25, generator=gen_w)
    art = make_artifact(model, tiny_tokenizer(), str(tmp_path / "art"))
    out = str(tmp_path / "ort")
    export_artifact(art, out, target="ort", validate=False)
    assert json.load(open(os.path.join(out, GENAI_CONFIG)))["model"]["decoder"]["filename"] == "model.onnx"
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    steps = 12
    want = greedy_tokens(OrtEngine(os.path.join(out, "model.onnx")), PROMPT, steps)
    model = og.Model(out)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert len(set(want)) > 3 and got == want
