#!/usr/bin/env python3
"""Writes tests/fixtures/lr_schedule_timm.json: the learning rate of every update under
timm's CosineLRScheduler, driven as timm's train.py drives it with t_in_epochs=False
(the scheduler sets the first update's rate when it is built, then
`step_update(num_updates)` after each update), for the schedules `ferrovit train`
builds (`LrSchedule::Cosine`): tests/core/optim.rs compares them.

timm's own code runs: pip install timm (and torch). Without torch (this machine could
not download it), the two timm files the scheduler needs — timm/scheduler/scheduler.py
and cosine_lr.py, unchanged — are loaded from the installed timm with a stand-in
`torch` module: they use torch only for type hints and `torch.optim.Optimizer`
objects, of which the scheduler reads `param_groups` alone. The fixture records which
way it was made.

    python3 scripts/make_lr_schedule_fixture.py [OUT.json]
"""
import importlib.util
import json
import os
import sys
import types


def timm_cosine_class():
    try:
        import torch  # noqa: F401
        from timm.scheduler.cosine_lr import CosineLRScheduler
        return CosineLRScheduler, "timm with torch"
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None:
        sys.exit("needs timm: pip install timm")
    sched_dir = os.path.join(spec.submodule_search_locations[0], "scheduler")
    torch = types.ModuleType("torch")
    torch.optim = types.SimpleNamespace(Optimizer=object)
    torch.Tensor = object
    sys.modules["torch"] = torch
    pkg = types.ModuleType("timm_scheduler")
    pkg.__path__ = [sched_dir]
    sys.modules["timm_scheduler"] = pkg
    for name in ("scheduler", "cosine_lr"):
        s = importlib.util.spec_from_file_location(
            f"timm_scheduler.{name}", os.path.join(sched_dir, f"{name}.py"))
        m = importlib.util.module_from_spec(s)
        sys.modules[s.name] = m
        s.loader.exec_module(m)
    return sys.modules["timm_scheduler.cosine_lr"].CosineLRScheduler, \
        "timm's scheduler.py and cosine_lr.py with a stand-in torch (torch not installed)"


class Optimizer:
    """What the scheduler reads of a torch optimizer: its parameter groups."""

    def __init__(self, lr):
        self.param_groups = [{"lr": lr}]


# (base lr, warmup steps, total steps, min_lr, warmup_lr): ferrovit's default (warm-up
# from 0, decay to 0), both rates set, no warm-up, and a run continued past its total
CASES = [
    (2e-3, 5, 40, 0.0, 0.0),
    (1e-3, 7, 50, 1e-5, 1e-6),
    (5e-4, 0, 30, 1e-6, 0.0),
    (1e-2, 3, 12, 1e-4, 1e-3),
]


def rates(cls, base, warmup, total, min_lr, warmup_lr, extra=4):
    opt = Optimizer(base)
    sched = cls(opt, t_initial=total, lr_min=min_lr, warmup_t=warmup,
                warmup_lr_init=warmup_lr, t_in_epochs=False)
    out = []
    for num_updates in range(total + extra):
        out.append(opt.param_groups[0]["lr"])  # the rate update `num_updates` runs at
        sched.step_update(num_updates=num_updates + 1)
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "fixtures", "lr_schedule_timm.json")
    cls, how = timm_cosine_class()
    from importlib.metadata import version
    cases = [{"lr": b, "warmup": w, "total": t, "min_lr": m, "warmup_lr": wl,
              "rates": rates(cls, b, w, t, m, wl)} for b, w, t, m, wl in CASES]
    doc = {"source": f"timm {version('timm')} CosineLRScheduler ({how})", "cases": cases}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out}: {len(cases)} schedules")


if __name__ == "__main__":
    main()
