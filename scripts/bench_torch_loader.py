"""Images/s of torchvision's CIFAR augmentation pipeline on the digits data, in one
process: RandomCrop(32, padding=4) + RandomHorizontalFlip + AutoAugment(CIFAR10) on
uint8 tensors, then float conversion and Normalize, stacked into batches of 128.
The baseline for `cargo bench --bench loader` (loader_autoaugment_1_workers).

Run from the repo root: python3 scripts/bench_torch_loader.py [--pil]
(--pil: the same transforms on PIL images, the classic torchvision recipe)
"""
import argparse
import os
import time

import torch
from torchvision import transforms as T

RECORD = 1 + 3 * 32 * 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pil", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = open(os.path.join("data", "digits", "data_batch_1.bin"), "rb").read()
    n = len(raw) // RECORD
    imgs = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(n, RECORD)[:, 1:].reshape(n, 3, 32, 32)
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)]
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    if args.pil:
        pil = [T.functional.to_pil_image(x) for x in imgs]
        tf = T.Compose(aug + [T.ToTensor(), norm])
        items = pil
    else:
        tf = T.Compose(aug + [T.ConvertImageDtype(torch.float32), norm])
        items = list(imgs)
    best = 0.0
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n)
        batches = n // 128
        for b in range(batches):
            torch.stack([tf(items[i]) for i in order[b * 128:(b + 1) * 128].tolist()])
        rate = batches * 128 / (time.perf_counter() - t0)
        best = max(best, rate)
    print(f"torchvision {'PIL' if args.pil else 'tensor'} pipeline, 1 process: {best:.0f} images/s (best of {args.epochs} epochs)")


if __name__ == "__main__":
    main()
