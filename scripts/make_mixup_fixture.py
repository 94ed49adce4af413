#!/usr/bin/env python3
"""Writes tests/fixtures/mixup_timm.json: timm's Mixup/CutMix (`timm.data.Mixup`,
mode='batch', correct_lam=True) on small batches with scripted random draws, and
PyTorch's cross-entropy on soft targets. tests/core/mixup.rs replays the same draws
through ferrovit's `Mixup::draw` and compares the mixed images, lambda and soft targets
(to 1e-6), and the soft-target loss and its gradient.

timm draws with numpy's global generator (`np.random.rand`, `np.random.beta`,
`np.random.randint`); the script replaces the `np` that timm.data.mixup sees by one
whose `random` returns the scripted values and records each call with its arguments,
so the test also checks that ferrovit asks for the same draws in the same order.

    python3 scripts/make_mixup_fixture.py [OUT.json]
"""
import json
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
import timm
import timm.data.mixup as tm


class ScriptedRandom:
    """np.random's rand/beta/randint returning scripted values, logging each call."""

    def __init__(self, values):
        self.values = list(values)
        self.log = []

    def _next(self):
        if not self.values:
            raise RuntimeError("timm asked for more draws than scripted")
        return self.values.pop(0)

    def rand(self):
        v = self._next()
        self.log.append({"kind": "rand", "value": v})
        return v

    def beta(self, a, b):
        assert a == b
        v = self._next()
        self.log.append({"kind": "beta", "alpha": a, "value": v})
        return v

    def randint(self, lo, hi, size=None):
        assert size is None
        v = self._next()
        assert lo <= v < hi
        self.log.append({"kind": "randint", "lo": int(lo), "hi": int(hi), "value": int(v)})
        return v


def run_case(name, cfg, values, batch, side, classes, smoothing, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, side, side, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    scripted = ScriptedRandom(values)
    fake_np = types.SimpleNamespace(random=scripted, sqrt=np.sqrt, clip=np.clip)
    real_np, tm.np = tm.np, fake_np
    try:
        mix = tm.Mixup(mixup_alpha=cfg["mixup_alpha"], cutmix_alpha=cfg["cutmix_alpha"],
                       prob=cfg["prob"], switch_prob=cfg["switch_prob"], mode="batch",
                       correct_lam=True, label_smoothing=smoothing, num_classes=classes)
        x_in = x.clone()
        lam, use_cutmix = None, None
        # what __call__ does, keeping lambda: _mix_batch then mixup_target
        lam = mix._mix_batch(x)
        target = tm.mixup_target(y, classes, lam, smoothing)
    finally:
        tm.np = real_np
    assert not scripted.values, f"{name}: draws left over: {scripted.values}"
    return {
        "name": name,
        **cfg,
        "smoothing": smoothing,
        "batch": batch,
        "side": side,
        "classes": classes,
        "draws": scripted.log,
        "x": x_in.flatten().tolist(),
        "labels": y.tolist(),
        "lam": float(lam),
        "mixed": x.flatten().tolist(),
        "targets": target.flatten().tolist(),
    }


def loss_case(name, logits, targets):
    z = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(z, targets)
    loss.backward()
    return {
        "name": name,
        "rows": logits.shape[0],
        "classes": logits.shape[1],
        "logits": logits.flatten().tolist(),
        "targets": targets.flatten().tolist(),
        "loss": loss.item(),
        "grad": z.grad.flatten().tolist(),
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/mixup_timm.json"
    both = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}
    cutmix = {"mixup_alpha": 0.0, "cutmix_alpha": 1.0, "prob": 0.7, "switch_prob": 0.5}
    cases = [
        # rand < prob, rand >= switch_prob: Mixup with lambda 0.62
        run_case("mixup chosen", both, [0.3, 0.9, 0.62], 4, 8, 10, 0.1, 1),
        # lambda below 0.5: the partner's label dominates
        run_case("mixup only", mixup, [0.99, 0.23], 6, 5, 7, 0.0, 2),
        # rand < switch_prob: CutMix, box inside the image
        run_case("cutmix chosen", both, [0.1, 0.2, 0.55, 4, 3], 4, 8, 10, 0.1, 3),
        # CutMix only, box clipped at the corner: lambda corrected by the clipped area
        run_case("cutmix clipped", cutmix, [0.5, 0.3, 0, 8], 4, 9, 10, 0.2, 4),
        # the box of an odd side, at the far edge
        run_case("cutmix far edge", cutmix, [0.0, 0.05, 6, 6], 2, 7, 3, 0.0, 5),
        # not drawn (rand >= prob): unchanged images, smoothed one-hot targets
        run_case("not applied", cutmix, [0.7], 4, 4, 5, 0.1, 6),
    ]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 10, generator=g) * 3
    mixed_targets = torch.tensor(cases[0]["targets"]).view(4, 10)
    losses = [
        loss_case("mixed targets", logits[:4], mixed_targets),
        # rows not summing to 1: the gradient is softmax * sum(t) - t
        loss_case("unnormalised", logits, torch.rand(6, 10, generator=g)),
        loss_case("wide", torch.randn(3, 1000, generator=g) * 4,
                  torch.softmax(torch.randn(3, 1000, generator=g), dim=1)),
    ]
    fixture = {
        "made_by": f"scripts/make_mixup_fixture.py, timm {timm.__version__}, torch {torch.__version__}",
        "cases": cases,
        "losses": losses,
    }
    with open(out, "w") as f:
        json.dump(fixture, f)
        f.write("\n")
    print(f"wrote {out}: {len(cases)} mixing cases, {len(losses)} loss cases")


if __name__ == "__main__":
    main()
