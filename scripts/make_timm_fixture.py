"""Writes tests/fixtures/timm/: two seeded timm `VisionTransformer`s of shapes other than
ferrovit's presets, each as `<name>.safetensors` (timm's state dict, as
`model.state_dict()` has it), `<name>-<i>.png` (a few fixed RGB images of the model's
size) and `<name>-probs.safetensors` (`probs`: timm's softmax probabilities for those
images, `[images, classes]`, normalised with ImageNet's mean and std as
`ferrovit ckpt import --mean/--std` is told to record); and `strict_keys.json`: for each
timm constructor call ferrovit's `ckpt export` prints in the tests, the names and shapes
of that model's state dict — what `load_state_dict(..., strict=True)` requires, so the
test checks an export against it where torch is not installed (CI).

tests/io/timm_interop.rs imports each model with `ferrovit ckpt import`, runs
`ferrovit infer` on the PNGs and compares with `probs`; then exports it again and has
timm load the export with strict=True (scripts/check_timm_export.py; skipped where timm
is not installed).

Run from the repo root: python3 scripts/make_timm_fixture.py
(needs torch, timm, safetensors, pillow; written with torch 2.15.0 and timm 1.0.31)
"""
import json
import os

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

OUT = os.path.join("tests", "fixtures", "timm")
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, timm's IMAGENET_DEFAULT_MEAN
STD = (0.229, 0.224, 0.225)
IMAGES = 3

# name: VisionTransformer arguments (embed_dim, depth, num_heads, mlp width, patch, image, classes)
MODELS = {
    "vit_d64_l2_h4_p4_s32_c10": dict(dim=64, depth=2, heads=4, mlp=128, patch=4, img=32, classes=10),
    "vit_d48_l2_h3_p8_s48_c7": dict(dim=48, depth=2, heads=3, mlp=96, patch=8, img=48, classes=7),
}


def build(m):
    return VisionTransformer(
        img_size=m["img"], patch_size=m["patch"], embed_dim=m["dim"], depth=m["depth"],
        num_heads=m["heads"], mlp_ratio=m["mlp"] / m["dim"], num_classes=m["classes"],
    ).eval()


# constructor calls as `ferrovit ckpt export` prints them (tests/io/timm_interop.rs)
EXPORT_CALLS = [
    "timm.models.vision_transformer.VisionTransformer(img_size=48, patch_size=8, in_chans=3, "
    "embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)",
]


def strict_keys():
    keys = {}
    for call in EXPORT_CALLS:
        model = eval(call, {"timm": timm})
        keys[call] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(OUT, "strict_keys.json"), "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    strict_keys()
    for seed, (name, m) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = build(m)
        with torch.no_grad():
            # timm zero-initialises the head and LayerNorms are 1/0: perturb every
            # tensor so that a swapped or ignored one changes the probabilities
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(OUT, f"{name}.safetensors"))
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, size=(IMAGES, m["img"], m["img"], 3), dtype=np.uint8)
        for i, px in enumerate(pixels):
            Image.fromarray(px, "RGB").save(os.path.join(OUT, f"{name}-{i}.png"))
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            probs = model(x).softmax(-1).contiguous()
        save_file({"probs": probs}, os.path.join(OUT, f"{name}-probs.safetensors"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"probs {tuple(probs.shape)}")


if __name__ == "__main__":
    main()
