"""Load a ferrovit checkpoint's weights in PyTorch with the `safetensors` library only.

    python3 examples/load_in_pytorch.py out/checkpoints/step-0000000460

Every shard is a plain safetensors file; `index.json` maps each tensor to its shard
(`weight_map`, as Hugging Face sharded checkpoints do). Without PyTorch installed, the
tensors are loaded as NumPy arrays instead.
"""

import json
import sys
from pathlib import Path

from safetensors import safe_open


def load(ckpt: Path, framework: str) -> dict:
    index = json.loads((ckpt / "index.json").read_text())
    weights = {}
    for name, file in sorted(index["weight_map"].items()):
        with safe_open(ckpt / file, framework=framework) as f:
            weights[name] = f.get_tensor(name)
    return index, weights


def main() -> None:
    ckpt = Path(sys.argv[1])
    try:
        import torch  # noqa: F401

        framework = "pt"
    except ImportError:
        framework = "numpy"
    index, weights = load(ckpt, framework)
    model = index["model"]
    total = sum(int(w.numel() if framework == "pt" else w.size) for w in weights.values())
    print(
        f"{len(weights)} tensors, {total} parameters ({framework}); "
        f"ViT dim {model['dim']} depth {model['depth']} heads {model['heads']}, "
        f"{model['num_classes']} classes"
    )
    for name in ("patch_embed.proj.weight", "head.weight"):
        print(f"{name}: {tuple(weights[name].shape)}")


if __name__ == "__main__":
    main()
