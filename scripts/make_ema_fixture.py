#!/usr/bin/env python3
"""Writes tests/fixtures/ema_timm.json: timm's ModelEmaV3 (timm.utils.model_ema) driven
as timm's train.py drives it — `model_ema.update(model, step=num_updates)` after each
optimizer update, num_updates counting from 1 — over a fixed sequence of weights, with
and without its warm-up (use_warmup=True and the other defaults: warmup_gamma 1,
warmup_power 2/3, min_decay 0, update_after_step 0). tests/core/optim.rs feeds the same
weights to ferrovit's `Ema` and compares the averages after every update.

    python3 scripts/make_ema_fixture.py [OUT.json]
"""
import json
import sys

import torch
from timm.utils.model_ema import ModelEmaV3

STEPS = 12
SHAPE = (3, 5)


def weights(step):
    """The weights after update `step` (1-based): a fixed pseudo-random walk."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(SHAPE, generator=g, dtype=torch.float32)


def run(decay, warmup):
    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weights(0))
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
    out = []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            model.weight.copy_(weights(step))
        ema.update(model, step=step)
        out.append({
            "decay": ema.get_decay(step),
            "ema": ema.module.weight.flatten().tolist(),
        })
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/ema_timm.json"
    fixture = {
        "shape": list(SHAPE),
        "weights": [weights(s).flatten().tolist() for s in range(STEPS + 1)],
        "runs": [
            {"decay": d, "warmup": w, "steps": run(d, w)}
            for d, w in [(0.9, False), (0.9, True), (0.5, True)]
        ],
    }
    with open(out, "w") as f:
        json.dump(fixture, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
