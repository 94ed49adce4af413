"""Writes tests/fixtures/autoaugment.safetensors: torchvision's AutoAugment operations
(tensor path: nearest interpolation, zero fill) applied to three 32x32 images at the
CIFAR-10 policy's magnitudes, for tests/core/autoaugment.rs.

Run from the repo root: python3 scripts/make_autoaugment_fixture.py
(needs torch, torchvision, safetensors)
"""
import os

import torch
from safetensors.torch import save_file
from torchvision.transforms import AutoAugment, AutoAugmentPolicy
from torchvision.transforms.autoaugment import _apply_op
from torchvision.transforms import InterpolationMode

OUT = os.path.join("tests", "fixtures", "autoaugment.safetensors")
RECORD = 1 + 3 * 32 * 32
OPS = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"]
BINS = [2, 5, 9]


def main():
    raw = open(os.path.join("data", "digits", "test_batch.bin"), "rb").read()
    images = [torch.frombuffer(bytearray(raw[i * RECORD + 1:(i + 1) * RECORD]), dtype=torch.uint8)
              .reshape(3, 32, 32) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    # a colourful image: smooth gradients plus noise, so colour and geometric ops matter
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    base = torch.stack([xx * 8, yy * 8, (xx + yy) * 4]).float()
    noise = torch.randint(0, 64, (3, 32, 32), generator=g).float()
    images.append((base * 0.75 + noise).clamp(0, 255).to(torch.uint8))

    space = AutoAugment(AutoAugmentPolicy.CIFAR10)._augmentation_space(10, (32, 32))
    out = {}
    for k, img in enumerate(images):
        out[f"input.{k}"] = img.contiguous()
    for op in OPS:
        mags, signed = space[op]
        if mags.ndim == 1:
            out[f"magnitudes.{op}"] = mags.float().contiguous()
        bins = BINS if mags.ndim == 1 else [0]
        for b in bins:
            m = float(mags[b].item()) if mags.ndim == 1 else 0.0
            for sign in ([1.0, -1.0] if signed else [1.0]):
                for k, img in enumerate(images):
                    y = _apply_op(img, op, sign * m, interpolation=InterpolationMode.NEAREST, fill=None)
                    s = "neg" if sign < 0 else "pos"
                    out[f"{op}.{b}.{s}.{k}"] = y.contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT)
    print(f"wrote {OUT}: {len(out)} tensors")


if __name__ == "__main__":
    main()
