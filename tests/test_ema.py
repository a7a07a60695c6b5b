"""The moving average of the weights against one computed by hand, step by step."""

from __future__ import annotations

import torch
from torch import nn

from nin_dist.ema import WeightEMA

# d_t = min(0.6, (1 + t) / (10 + t)) written out: the ramp 1/10, 2/11, ..., 13/22, then the cap.
DECAYS = [1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 9 / 18, 10 / 19, 11 / 20, 12 / 21,
          13 / 22, 0.6, 0.6]


def test_the_average_equals_a_hand_computed_ema_of_weights_and_buffers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ema = WeightEMA(model, decay=0.6)
    by_hand = {name: t.clone() for name, t in model.state_dict().items()}
    for step, decay in enumerate(DECAYS):
        x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(model, step)
        for name, current in model.state_dict().items():
            by_hand[name] = decay * by_hand[name] + (1 - decay) * current if current.is_floating_point() else \
                current.clone()
    averaged = ema.state_dict()
    assert averaged["1.num_batches_tracked"].item() == len(DECAYS)  # integers are copied, not averaged
    for name, expected in by_hand.items():
        torch.testing.assert_close(averaged[name], expected, rtol=1e-13, atol=1e-15, msg=name)
    # It is an average, not the model: the weights moved on since.
    assert not torch.allclose(averaged["5.weight"], model.state_dict()["5.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())
