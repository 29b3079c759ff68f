"""Healing (compress/heal.py): the loss falls, masks and frozen tensors stay, resume == uninterrupted run."""
import copy

import pytest
import torch

from _rocket_fixtures import rocketize
from rocket_deploy.compress.heal import HealError, TrainableRocket, check_healable, heal_model, lr_factor
from rocket_deploy.config import ConfigError, HealConfig
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import unpack_bits
from rocket_deploy.testing import tiny_llama


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    teacher = tiny_llama().eval()
    student = copy.deepcopy(teacher)
    rocketize(student, rank_frac=0.5)
    ids = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    return teacher, student, ids


def factors(model):
    return {n: (m.u.clone(), m.v_values.clone(), unpack_bits(m.v_mask, m.rank).clone())
            for n, m in model.named_modules() if isinstance(m, RocketLinear)}


def frozen(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rpartition(".")[2] not in ("u", "v_values", "v_mask")}


@torch.no_grad()
def full_kl(student, teacher, ids):
    from rocket_deploy.compress.heal import distill_loss
    return distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits)[1]


CFG = HealConfig(steps=12, lr=3e-3, batch_size=4, seq_len=32, warmup_steps=1, checkpoint_every=4)


def test_loss_falls_masks_and_frozen_tensors_stay(pair):
    teacher, student, ids = pair
    before, fixed = factors(student), frozen(student)
    kl0 = full_kl(student, teacher, ids)
    res = heal_model(student, teacher, ids, CFG, progress=False)
    assert res["steps"] == 12 and res["tokens"] == 12 * 4 * 32
    assert full_kl(student, teacher, ids) < 0.7 * kl0
    after = factors(student)
    assert set(after) == set(before)
    changed = 0
    for n, (u, vals, mask) in after.items():
        assert torch.equal(mask, before[n][2]), n                       # same support
        assert bool((mask.sum(1) == student.get_submodule(n).keep).all())  # exactly k kept per column
        changed += int(not torch.equal(u, before[n][0])) + int(not torch.equal(vals, before[n][1]))
    assert changed == 2 * len(after)
    for k, v in frozen(student).items():
        assert torch.equal(v, fixed[k]), k


def test_trainable_layer_matches_rocket_linear(pair):
    _, student, _ = pair
    for n, m in student.named_modules():
        if isinstance(m, RocketLinear) and not m.is_dense_v:
            x = torch.randn(3, m.in_features)
            t = TrainableRocket(m)
            torch.testing.assert_close(t(x), m(x))
            back = t.to_rocket()
            assert torch.equal(back.v_mask, m.v_mask) and torch.equal(back.v_values, m.v_values)
            return
    pytest.fail("no sparse-V layer")


def test_resume_equals_uninterrupted_run(pair, tmp_path):
    teacher, student, ids = pair
    s1, s2 = copy.deepcopy(student), copy.deepcopy(student)
    torch.manual_seed(5)
    heal_model(s1, teacher, ids, CFG, checkpoint=str(tmp_path / "a.pt"), key="k", progress=False)
    ck = str(tmp_path / "b.pt")
    torch.manual_seed(5)
    part = heal_model(copy.deepcopy(student), teacher, ids, CFG, checkpoint=ck, key="k", progress=False, stop_after=8)
    assert part["steps"] == 8
    res = heal_model(s2, teacher, ids, CFG, checkpoint=ck, key="k", resume=True, progress=False)
    assert res["steps"] == 12
    f1, f2 = factors(s1), factors(s2)
    for n in f1:
        torch.testing.assert_close(f1[n][0], f2[n][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(f1[n][1], f2[n][1], rtol=0, atol=1e-6)


def test_resume_refuses_other_settings(pair, tmp_path):
    teacher, student, ids = pair
    ck = str(tmp_path / "c.pt")
    heal_model(copy.deepcopy(student), teacher, ids, CFG, checkpoint=ck, key="k", progress=False, stop_after=4)
    with pytest.raises(HealError, match="another artifact or heal settings"):
        heal_model(student, teacher, ids, HealConfig(steps=20, checkpoint_every=4), checkpoint=ck, key="k",
                   resume=True, progress=False)
    with pytest.raises(HealError, match="no checkpoint"):
        heal_model(student, teacher, ids, CFG, checkpoint=str(tmp_path / "none.pt"), resume=True, progress=False)


def test_hidden_mse_term_runs(pair):
    teacher, student, ids = pair
    res = heal_model(student, teacher, ids, HealConfig(steps=3, batch_size=2, seq_len=16, hidden_mse=1.0),
                     progress=False)
    assert res["steps"] == 3 and all(x > 0 for x in res["losses"])


def test_schedule_and_config():
    cfg = HealConfig(steps=10, warmup_steps=2)
    assert lr_factor(0, cfg) < lr_factor(1, cfg) < lr_factor(2, cfg) == 1.0
    assert lr_factor(9, cfg) < 0.1
    assert lr_factor(9, HealConfig(steps=10, schedule="constant")) == 1.0
    assert HealConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"steps": 0}, {"lr": 0}, {"schedule": "step"}, {"grad_clip": -1}, {"version": 99}):
        with pytest.raises(ConfigError):
            HealConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        HealConfig.from_dict({"stepz": 3})


def test_quantized_or_dense_artifacts_refused():
    with pytest.raises(HealError, match="quantized"):
        check_healable({"layers": {"a": {"kind": "rocket", "quant": {"scheme": "int4"}}}}, "x")
    with pytest.raises(HealError, match="no factorized layer"):
        check_healable({"method": "dense-quant", "layers": {"a": {"kind": "dense"}}}, "x")
