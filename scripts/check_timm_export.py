"""Loads a `ferrovit ckpt export` file into timm with strict=True and prints timm's
softmax probabilities for images, as JSON ([[p, ...], ...], one list per image), for
tests/io/timm_interop.rs to compare with `ferrovit infer`.

    python3 scripts/check_timm_export.py --call "timm.models.vision_transformer.VisionTransformer(...)" \
        --weights model.safetensors --ckpt out/checkpoints/step-... IMAGE...

--call is the line `ferrovit ckpt export` prints after "timm: " (up to
".load_state_dict"); --ckpt's index.json gives the normalisation (training.normalize).
Images must already be the model's size (no resize here). Needs torch, timm, pillow.
"""
import argparse
import functools  # noqa: F401  (a --call may use functools.partial)
import json
from pathlib import Path

import numpy as np
import timm  # noqa: F401  (the --call names timm.models…)
import torch
from PIL import Image
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--call", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()
    model = eval(a.call, {"timm": timm, "torch": torch, "functools": functools}).eval()
    model.load_state_dict(load_file(a.weights), strict=True)
    norm = json.loads((Path(a.ckpt) / "index.json").read_text())["training"]["normalize"]
    px = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in a.images])
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    print(json.dumps(probs.tolist()))


if __name__ == "__main__":
    main()
