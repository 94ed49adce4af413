"""Writes tests/fixtures/vit_parity.safetensors: a small ViT's initial params, one batch,
its logits/loss/grads, and the params after 3 AdamW steps, for Rust parity tests.

Run from the repo root: python3 scripts/make_parity_fixture.py
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_vit import ViT  # noqa: E402

OUT = os.path.join("tests", "fixtures", "vit_parity.safetensors")
CFG = dict(image_size=32, patch_size=4, in_channels=3, num_classes=10,
           dim=32, depth=2, heads=4, mlp_dim=64, eps=1e-6)
LABEL_SMOOTHING = 0.1
LR, BETA1, BETA2, ADAM_EPS, WEIGHT_DECAY = 1e-3, 0.9, 0.999, 1e-8, 0.05
STEPS = 3
BATCH = 4


def snapshot(prefix, tensors):
    return {f"{prefix}.{n}": t.detach().clone().float().contiguous() for n, t in tensors}


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    model = ViT(dropout=0.0, **CFG).float().train()
    with torch.no_grad():  # make LayerNorm / cls / pos gradients non-trivial
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        model.cls_token.copy_(0.02 * torch.randn_like(model.cls_token))
        model.pos_embed.copy_(0.02 * torch.randn_like(model.pos_embed))

    images = torch.randn(BATCH, CFG["in_channels"], CFG["image_size"], CFG["image_size"])
    labels = torch.randint(0, CFG["num_classes"], (BATCH,), dtype=torch.int64)

    out = snapshot("param", model.named_parameters())
    out["input.images"] = images.contiguous()
    out["input.labels"] = labels.contiguous()

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=ADAM_EPS,
                            weight_decay=WEIGHT_DECAY, foreach=False)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        if step == 0:
            out["out.logits"] = logits.detach().clone().contiguous()
            out["out.loss"] = loss.detach().reshape(1).clone()
            out.update(snapshot("grad", ((n, p.grad) for n, p in model.named_parameters())))
            print(f"loss = {loss.item():.8f}  max|logit| = {logits.abs().max().item():.8f}")
        opt.step()
    out.update(snapshot(f"step{STEPS}", model.named_parameters()))

    meta = {k: str(v) for k, v in CFG.items()}
    meta.update(label_smoothing=str(LABEL_SMOOTHING), lr=str(LR), beta1=str(BETA1),
                beta2=str(BETA2), adam_eps=str(ADAM_EPS), weight_decay=str(WEIGHT_DECAY),
                steps=str(STEPS), torch_version=torch.__version__)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(out)} tensors, {os.path.getsize(OUT):,} bytes")


if __name__ == "__main__":
    main()
