"""Writes tests/fixtures/pos_embed.safetensors: timm's `resample_abs_pos_embed` of a
position embedding over an 8x8 patch grid (plus the cls token's row, dim 5) to 12x12
and to 4x4 (bicubic, align_corners=False, antialias=False, one prefix token), for
`--init` across image sizes (tests/core/vit.rs compares ferrovit's resampling).

Run from the repo root: python3 scripts/make_pos_embed_fixture.py
(needs torch, timm, safetensors; written with torch 2.15.0 and timm 1.0.31)
"""
import os

import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

OUT = os.path.join("tests", "fixtures", "pos_embed.safetensors")


def main():
    g = torch.Generator().manual_seed(0)
    # smooth structure plus noise, as a trained embedding has both
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.stack([torch.sin(xx / 2 + k) * torch.cos(yy / 3 - k) for k in range(5)], -1)
    grid = smooth.reshape(64, 5) + 0.3 * torch.randn(64, 5, generator=g)
    cls = torch.randn(1, 5, generator=g)
    pos = torch.cat([cls, grid]).reshape(1, 65, 5).contiguous()
    out = {"input": pos}
    for side in (12, 4):
        out[f"to{side}"] = resample_abs_pos_embed(
            pos, new_size=[side, side], num_prefix_tokens=1, interpolation="bicubic",
            antialias=False,
        ).contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT)
    print(f"wrote {OUT}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
