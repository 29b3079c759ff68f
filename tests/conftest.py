import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Test modules live in folders mirroring the source tree; shared fixtures (_rocket_fixtures, fake_tensorrt) sit here.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model-sampled calibration text is cached under ROCKET_CACHE; keep tests out of the user's cache."""
    old = os.environ.get("ROCKET_CACHE")
    os.environ["ROCKET_CACHE"] = str(tmp_path_factory.mktemp("rocket-cache"))
    yield
    if old is None:
        os.environ.pop("ROCKET_CACHE", None)
    else:
        os.environ["ROCKET_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_tok():
    from rocket_deploy.testing import tiny_tokenizer
    return tiny_tokenizer()


def _save_hf_dir(tmp_path_factory, name: str, model, tok) -> str:
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tok):
    """A tiny random Llama saved as a Hugging Face directory (config, weights, tokenizer)."""
    from rocket_deploy.testing import tiny_llama
    return _save_hf_dir(tmp_path_factory, "tiny-llama", tiny_llama(), tiny_tok)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tok):
    from rocket_deploy.testing import tiny_bert
    return _save_hf_dir(tmp_path_factory, "tiny-bert", tiny_bert(), tiny_tok)
