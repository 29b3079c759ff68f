"""Calibration on a device with the weights offloaded to the CPU: the block-by-block sensitivity pass equals one
whole-model backward pass, and on CUDA only one block's weights are on the device at a time."""
import pytest
import torch

from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.targets import find_blocks, select_targets
from rocket_deploy.testing import tiny_llama

from rocket_deploy.compress.calibration import block_on, non_blocks_on
from rocket_deploy.compress.sensitivity import output_sensitivity

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4, batch_size=4)


def _targets(model):
    return select_targets(model, RocketConfig().targets, RocketConfig().exclude)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_offloaded_sensitivity_equals_the_whole_model_backward(arch):
    model = tiny_llama(arch=arch, layers=3)
    targets = _targets(model)
    ids = torch.randint(0, 500, (5, 16), generator=torch.Generator().manual_seed(0))
    plain = output_sensitivity(model, targets, ids, batch_size=2, offload=False)
    off = output_sensitivity(model, targets, ids, batch_size=2, offload=True)
    assert plain.keys() == off.keys() == targets.keys()
    for n in plain:
        assert torch.allclose(off[n].double(), plain[n].double(), rtol=1e-4, atol=1e-12), n
        assert float(off[n].sum()) > 0
    assert all(p.requires_grad for p in model.parameters())           # as they were before the pass
    assert all("forward" not in vars(b) for b in model.model.layers)    # the replayed forwards are gone


def test_offload_contexts_restore_everything():
    model = tiny_llama()
    _, blocks = find_blocks(model, _targets(model))
    before = {n: (p.device, p.data_ptr()) for n, p in model.named_parameters()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    with non_blocks_on(model, blocks, "cpu"), block_on(blocks[0], "cpu"):
        pass
    assert {n: (p.device, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def _cuda_profile(model, tok, device):
    from rocket_deploy.compress.pipeline import prepare_calibration, run_profile
    data = prepare_calibration(tok, CAL, model)
    return run_profile(model, tok, RocketConfig(), CAL, data=data, progress=False, device=device)


@pytest.mark.gpu
def test_cuda_profile_keeps_the_weights_on_the_cpu_and_matches(tiny_tok):
    model = tiny_llama(layers=3)
    _, blocks = find_blocks(model, _targets(model))
    seen = []

    def check(mod, _args):      # while a block runs, it alone (of the blocks) is on the GPU (or none: replays)
        seen.append((blocks_index[id(mod)], [i for i, b in enumerate(blocks) if next(b.parameters()).is_cuda]))
    blocks_index = {id(b): i for i, b in enumerate(blocks)}
    hs = [b.register_forward_pre_hook(check) for b in blocks]
    try:
        gpu = _cuda_profile(model, tiny_tok, "cuda")
    finally:
        for h in hs:
            h.remove()
    assert all(on in ([], [i]) for i, on in seen), seen
    assert sum(on == [i] for i, on in seen) >= len(blocks), seen
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert gpu.run_info["device"].startswith("cuda:")
    cpu = _cuda_profile(model, tiny_tok, "cpu")
    for n, lp in cpu.layers.items():
        for a, b in zip(lp.options, gpu.layers[n].options):
            assert (a.rank, a.keep, a.bytes) == (b.rank, b.keep, b.bytes)
            assert b.rel_whitened == pytest.approx(a.rel_whitened, rel=1e-3, abs=1e-6), n
            assert b.fisher == pytest.approx(a.fisher, rel=1e-2, abs=1e-9), n


@pytest.mark.gpu
def test_cuda_sensitivity_matches_cpu():
    model = tiny_llama(layers=3)
    targets = _targets(model)
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))
    cpu = output_sensitivity(model, targets, ids, batch_size=2)
    gpu = output_sensitivity(model, targets, ids, batch_size=2, device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    for n in cpu:
        assert torch.allclose(gpu[n].double(), cpu[n].double(), rtol=1e-3, atol=1e-10), n
