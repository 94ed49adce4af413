"""PyTorch side of the ViT throughput benchmark (compare with `ferrovit bench`): the
training step (forward, backward, AdamW) and inference (forward in eval mode under
torch.inference_mode, predictions read), each the median of --steps after --warmup,
in f32 or under torch.autocast(device, torch.bfloat16).

Examples: python3 scripts/bench_torch.py --preset all --batch 128 --threads 2 --steps 10
          python3 scripts/bench_torch.py --device cuda --autocast bf16 --compile --batch 512
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_vit import PRESETS, ViT  # noqa: E402


def bench(preset, args):
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = ViT(dropout=0.1, **PRESETS[preset]).train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                            fused=args.device == "cuda")
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (args.batch,), device=dev)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast == "bf16")

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(step_model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)

    step_s = statistics.median(times)
    infer_s = time_inference(step_model, images, autocast, args)
    framework = ("pytorch-compile" if args.compile else "pytorch-eager") + (
        "-bf16" if args.autocast == "bf16" else "")
    print(f"{preset} [{framework}] batch={args.batch} threads={args.threads}: "
          f"{args.batch / step_s:.1f} img/s, {step_s * 1e3:.1f} ms/step (median of {len(times)}), "
          f"loss={loss.item():.4f}; inference {args.batch / infer_s:.1f} img/s")
    print(json.dumps({
        "preset": preset, "framework": framework, "batch": args.batch, "threads": args.threads,
        "device": args.device,
        "images_per_s_median": args.batch / step_s, "step_s_median": step_s,
        "infer_images_per_s_median": args.batch / infer_s, "infer_s_median": infer_s,
        "torch_version": torch.__version__,
    }))


def time_inference(model, images, autocast, args):
    """Median seconds per inference batch: eval mode, no autograd, predictions read."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with autocast:
                predictions = model(images).argmax(-1)
            predictions.cpu()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
    model.train()
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="vit_tiny_patch4_32", choices=[*PRESETS, "all"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="bf16 autocast (mixed precision) for the forward pass")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    for preset in PRESETS if args.preset == "all" else [args.preset]:
        bench(preset, args)


if __name__ == "__main__":
    main()
