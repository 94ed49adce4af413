"""Time to first prediction and resident memory: `ferrovit infer` on a checkpoint
against PyTorch loading the same weights exported as one safetensors file (the
`safetensors` library, the ViT of scripts/torch_vit.py) and classifying the same image.

    python3 scripts/bench_infer.py --ckpt out/checkpoints --image data/examples/seven.png

Each run is a fresh process, timed from start to exit (what a user waits for), and its
peak resident memory comes from the kernel (wait4). "cold" evicts the weight files from
the page cache first (posix_fadvise DONTNEED; the programs and libraries stay cached),
"warm" runs right after another run. Medians of --runs runs each.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(cmd):
    """Wall seconds and peak RSS (MiB) of a child process; its stdout."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        sys.exit(f"{cmd} failed: {err.decode()}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def torch_child(weights, image, cfg):
    """The PyTorch side: import, build, load, preprocess, predict; prints top-3."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from torch_vit import ViT

    t = time.perf_counter()
    model = ViT(
        num_classes=cfg["num_classes"],
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
        mlp_dim=cfg["mlp_dim"],
        patch_size=cfg["patch_size"],
        eps=cfg["layernorm_eps"],
    )
    model.load_state_dict(load_file(weights))
    model.eval()
    img = Image.open(image).convert("RGB")
    w, h = img.size
    s = 32 / min(w, h)
    img = img.resize((max(32, round(w * s)), max(32, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 32) // 2, (h - 32) // 2
    img = img.crop((left, top, left + 32, top + 32))
    x = torch.tensor(list(img.getdata()), dtype=torch.float32).view(32, 32, 3) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    x = ((x - mean) / std).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)[0]
    top = torch.topk(p, 3)
    print(", ".join(f"{i} {v:.4f}" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    print(f"after the imports: {time.perf_counter() - t:.3f} s to build, load and predict")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrovit", default="target/release/ferrovit")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory or root")
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--torch-child", nargs=3, metavar=("WEIGHTS", "IMAGE", "CONFIG"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_child:
        weights, image, cfg = a.torch_child
        return torch_child(weights, image, json.loads(cfg))

    ckpt = Path(a.ckpt)
    if not (ckpt / "index.json").exists():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    index = json.loads((ckpt / "index.json").read_text())
    shards = sorted({c["file"] for t in index["tensors"].values() for c in t["chunks"]})
    weights = Path("/tmp") / f"bench-infer-{os.getpid()}.safetensors"
    subprocess.run([a.ferrovit, "ckpt", "export", str(ckpt), "--safetensors", str(weights)], check=True,
                   stdout=subprocess.DEVNULL)
    cfg = json.dumps(index["model"])
    sides = {
        "ferrovit infer": ([a.ferrovit, "infer", "--ckpt", str(ckpt), "--top-k", "3", a.image],
                           [ckpt / s for s in shards]),
        "PyTorch + safetensors": ([sys.executable, __file__, "--ckpt", "-", "--image", "-",
                                   "--torch-child", str(weights), a.image, cfg], [weights]),
    }
    m = index["model"]
    size = sum(os.path.getsize(ckpt / s) for s in shards) / 2**20
    print(f"model dim {m['dim']} depth {m['depth']} ({size:.0f} MiB of shards incl. optimizer state; "
          f"weights {os.path.getsize(weights) / 2**20:.0f} MiB), {a.runs} runs each, medians")
    print(f"{'':24} {'cold s':>8} {'warm s':>8} {'peak RSS MiB':>13}")
    for name, (cmd, files) in sides.items():
        cold, warm, rss = [], [], []
        for _ in range(a.runs):
            evict(files)
            t, r, out = run(cmd)
            cold.append(t)
            t, r, out = run(cmd)
            warm.append(t)
            rss.append(r)
        print(f"{name:24} {statistics.median(cold):8.3f} {statistics.median(warm):8.3f} "
              f"{statistics.median(rss):13.1f}   ({'; '.join(out.strip().splitlines())})")
    weights.unlink()


if __name__ == "__main__":
    main()
