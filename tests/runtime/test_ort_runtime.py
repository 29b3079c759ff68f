"""OrtEngine: the KV protocol against TorchEngine (greedy tokens identical), empty-past prefill, raw runs, model
bytes with external data, encoders, provider / thread options, open_engine dispatch."""
import os

import numpy as np
import pytest

from rocket_deploy.artifact import load_artifact
from rocket_deploy.export import export_artifact
from rocket_deploy.runtime import SamplingParams, open_engine
from rocket_deploy.runtime.ort_backend import OrtEngine, default_providers
from rocket_deploy.runtime.torch_backend import TorchEngine
from rocket_deploy.testing import tiny_llama

from _rocket_fixtures import make_artifact

NEVER = (10 ** 9,)          # a stop id no model emits: generate the full length


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp(f"ort-{request.param}")
    art = make_artifact(tiny_llama(arch=request.param, seed=3), tiny_tok, str(root / "art"))
    res = export_artifact(art, str(root / "onnx"), target="ort", validate=False)
    return art, res.path


def test_generation_matches_torch(exported, tiny_tok):
    art, path = exported
    te = TorchEngine.from_path(art, device="cpu")
    oe = OrtEngine(path)
    assert oe.tokenizer is not None and oe.is_decoder
    params = SamplingParams(max_new_tokens=24, stop_token_ids=NEVER)
    for prompt in ("def parse(self, text):", "Return the number of"):
        a = te.generate(prompt, params=params)
        b = oe.generate(prompt, params=params)
        assert len(a.token_ids) == 24
        assert a.token_ids == b.token_ids, prompt
        assert a.text == b.text and b.prompt_tokens == a.prompt_tokens
    streamed = list(oe.stream_tokens(oe.encode_prompt("Return the number of"), params))
    assert streamed == b.token_ids


def test_empty_past_prefill_and_decode(exported):
    art, path = exported
    oe = OrtEngine(path)
    model = load_artifact(art)[0]
    ids = np.array([[5, 17, 99, 4, 250, 31]], dtype=np.int64)
    logits, present = oe.forward(ids, np.ones_like(ids), None)
    assert logits.shape == (1, 6, 512) and logits.dtype == np.float32
    assert len(present) == 4 and present[0].shape == (1, 2, 6, 16)
    import torch
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-3)
    # one decode step through the numpy KV cache == the full sequence at once
    nxt = np.array([[7]], dtype=np.int64)
    step, present2 = oe.forward(nxt, np.ones((1, 7), dtype=np.int64), present)
    full, _ = oe.forward(np.concatenate([ids, nxt], 1), np.ones((1, 7), dtype=np.int64), None)
    assert present2[0].shape == (1, 2, 7, 16)
    np.testing.assert_allclose(step[0, -1], full[0, -1], atol=1e-4, rtol=1e-3)


def test_left_padding_batch(exported):
    _, path = exported
    oe = OrtEngine(path)
    a = np.array([[11, 12, 13, 14]], dtype=np.int64)
    batch = np.array([[3, 3, 11, 12, 13, 14][2:], [20, 21, 22, 23]], dtype=np.int64)
    padded = np.array([[3, 3, 11, 12, 13, 14], [19, 20, 21, 22, 23, 24]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=np.int64)
    single, _ = oe.forward(a, np.ones_like(a), None)
    both, _ = oe.forward(padded, mask, None)
    np.testing.assert_allclose(both[0, -1], single[0, -1], atol=1e-4, rtol=1e-3)
    assert batch.shape == (2, 4)


def test_run_and_model_bytes(exported):
    _, path = exported
    oe = OrtEngine(path, providers=["CPUExecutionProvider"], threads=1)
    assert oe.providers == ["CPUExecutionProvider"]
    assert oe.model_bytes() == os.path.getsize(path)
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "position_ids": np.array([[0, 1, 2]], dtype=np.int64)}
    for i in range(2):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    out = oe.run(feeds)
    assert out["logits"].shape == (1, 3, 512) and out["present.1.value"].shape == (1, 2, 3, 16)
    assert isinstance(open_engine(path), OrtEngine)
    assert isinstance(open_engine(os.path.dirname(path)), OrtEngine)      # an export folder
    assert "CPUExecutionProvider" in default_providers()


def test_external_data_engine(tmp_path, tiny_tok):
    art = make_artifact(tiny_llama(seed=5), tiny_tok, str(tmp_path / "art"))
    res = export_artifact(art, str(tmp_path / "onnx"), external_data=True, validate=False)
    oe = OrtEngine(res.path)
    data = os.path.join(os.path.dirname(res.path), "model.onnx.data")
    assert oe.model_bytes() == os.path.getsize(res.path) + os.path.getsize(data)
    te = TorchEngine.from_path(art, device="cpu")
    p = SamplingParams(max_new_tokens=16, stop_token_ids=NEVER)
    assert oe.generate(prompt_ids=[5, 6, 7], params=p).token_ids == te.generate(prompt_ids=[5, 6, 7], params=p).token_ids


def test_encoder_engine(tmp_path, tiny_tok):
    import torch
    import transformers as tf
    from rocket_deploy.testing import tiny_bert
    b = tiny_bert()
    m = tf.BertModel(b.config)
    m.load_state_dict(b.state_dict(), strict=False)
    art = make_artifact(m.eval(), tiny_tok, str(tmp_path / "bert"))
    res = export_artifact(art, str(tmp_path / "onnx"), validate=False)
    oe = OrtEngine(res.path)
    assert not oe.is_decoder
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int64)
    hid, state = oe.forward(ids, np.ones_like(ids), None)
    assert state is None and hid.shape == (2, 4, 64)
    ref = load_artifact(art)[0]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(hid, want, atol=1e-4, rtol=1e-3)
    with pytest.raises(RuntimeError, match="decoder"):
        oe.generate(prompt_ids=[1, 2])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="rocket-deploy export"):
        OrtEngine(str(tmp_path / "nope.onnx"))
