"""The optimizer's parameter groups (optim.decay_biases, optim.bias_lr_scale) against torch.optim.SGD built
by hand with the groups they mean, on the schedule and through a resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nin_dist.config import OptimConfig
from nin_dist.optim import apply_hyperparameters, build_optimizer, build_scheduler, lr_factor

SGD = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}


def tiny_model() -> nn.Sequential:
    """Every kind of parameter NiN has: conv weights and biases, BatchNorm scales and shifts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with torch.no_grad():  # BatchNorm starts at scale 1, shift 0: move them off, so decay has something to act on
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def by_kind(model: nn.Sequential) -> dict[str, list[nn.Parameter]]:
    """The tiny model's parameters, named by hand."""
    conv1, bn, conv2 = model[0], model[1], model[3]
    return {"weights": [conv1.weight, conv2.weight], "scales": [bn.weight], "shifts": [bn.bias],
            "biases": [conv1.bias, conv2.bias]}


def steps(model: nn.Module, opt: torch.optim.Optimizer, count: int, scheduler=None, first: int = 0) -> None:
    """`count` SGD steps on fixed random batches (batch k is the same whichever run takes it)."""
    for k in range(first, first + count):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_decay_biases_false_leaves_biases_and_batchnorm_undecayed():
    ours, reference = tiny_model(), tiny_model()
    steps(ours, build_optimizer(ours, OptimConfig(**SGD, decay_biases=False)), 3)
    kinds = by_kind(reference)
    steps(reference, torch.optim.SGD([
        {"params": kinds["weights"]},  # SGD's weight_decay
        {"params": kinds["scales"] + kinds["shifts"] + kinds["biases"], "weight_decay": 0.0}], **SGD), 3)
    assert_same_parameters(ours, reference)

    decayed = tiny_model()  # the default: one group, every parameter decayed
    steps(decayed, build_optimizer(decayed, OptimConfig(**SGD)), 3)
    for kind in ("scales", "shifts", "biases"):  # so the groups above are not the default's
        assert not any(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in
                       zip(by_kind(decayed)[kind], by_kind(ours)[kind], strict=True)), kind


@pytest.mark.parametrize("decay_biases", [True, False])
def test_bias_lr_scale_multiplies_the_learning_rate_of_biases_and_batchnorm_shifts(decay_biases):
    ours, reference = tiny_model(), tiny_model()
    cfg = OptimConfig(**SGD, decay_biases=decay_biases, bias_lr_scale=8.0)
    steps(ours, build_optimizer(ours, cfg), 3)
    kinds, undecayed = by_kind(reference), {} if decay_biases else {"weight_decay": 0.0}
    steps(reference, torch.optim.SGD([
        {"params": kinds["weights"]},
        {"params": kinds["scales"], **undecayed},  # BatchNorm's scales: the weights' rate
        {"params": kinds["shifts"] + kinds["biases"], "lr": 8 * SGD["lr"], **undecayed}], **SGD), 3)
    assert_same_parameters(ours, reference)


def test_the_schedule_scales_every_groups_rate_and_a_resume_restores_them():
    cfg = OptimConfig(**{**SGD, "lr": 0.05}, schedule="onecycle", warmup_epochs=1, decay_biases=False,
                      bias_lr_scale=4.0)
    per_epoch, epochs, cut = 4, 3, 6  # 12 steps, the one-cycle rise over 4, resumed after 6
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    scheduler = build_scheduler(opt, cfg, per_epoch, epochs)
    rates = []
    for k in range(per_epoch * epochs):
        rates.append([group["lr"] for group in opt.param_groups])
        steps(model, opt, 1, scheduler, first=k)
    weights, scales, biases = zip(*rates, strict=True)
    for k in range(per_epoch * epochs):
        assert weights[k] == pytest.approx(0.05 * lr_factor(k, 12, 4, "onecycle"), rel=1e-12, abs=1e-15)
        assert scales[k] == weights[k] and biases[k] == pytest.approx(4 * weights[k], rel=1e-12, abs=1e-15)
    assert len(set(weights)) > 3, "the schedule moved the rates"

    # Interrupted after `cut` steps: a fresh optimizer loads the state, as nin_dist.train restores it.
    first = tiny_model()
    opt = build_optimizer(first, cfg)
    steps(first, opt, cut, build_scheduler(opt, cfg, per_epoch, epochs))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = tiny_model()
    resumed.load_state_dict(saved_model)
    opt = build_optimizer(resumed, cfg)
    opt.load_state_dict(saved_opt)
    apply_hyperparameters(opt, cfg)
    scheduler = build_scheduler(opt, cfg, per_epoch, epochs, step=cut)
    assert [group["lr"] for group in opt.param_groups] == list(rates[cut])
    assert [group["weight_decay"] for group in opt.param_groups] == [0.05, 0.0, 0.0]
    steps(resumed, opt, per_epoch * epochs - cut, scheduler, first=cut)
    assert_same_parameters(resumed, model)


def test_the_defaults_keep_one_group_of_every_parameter():
    model = tiny_model()
    (group,) = build_optimizer(model, OptimConfig(**SGD)).param_groups
    assert group["params"] == list(model.parameters()) and group["weight_decay"] == 0.05 and group["lr"] == 0.1
