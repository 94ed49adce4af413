"""Plain PyTorch ViT whose parameter names and math match ferrovit's Rust ViT exactly.

Run `python3 scripts/torch_vit.py` for a self-check of the preset parameter counts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "vit_tiny_patch4_32": dict(dim=512, depth=6, heads=8, mlp_dim=512),
    "vit_lite_depth7_patch4_32": dict(dim=256, depth=7, heads=4, mlp_dim=512),
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, img):
        return self.proj(img).flatten(2).transpose(1, 2)  # [B, L, dim]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def core(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        p = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, t, d)

    def forward(self, x):
        return self.proj(self.core(x))


class Mlp(nn.Module):
    def __init__(self, dim, mlp_dim, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="none")))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    def __init__(self, image_size=32, patch_size=4, in_channels=3, num_classes=10, *,
                 dim, depth, heads, mlp_dim, dropout=0.0, eps=1e-6):
        super().__init__()
        assert image_size % patch_size == 0
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, tokens, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, img):
        x = self.patch_embed(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def num_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    torch.set_num_threads(1)
    expected = {"vit_tiny_patch4_32": 9_532_938, "vit_lite_depth7_patch4_32": 3_722_250}
    for name, cfg in PRESETS.items():
        n = num_params(ViT(**cfg))
        print(f"{name}: {n:,} params")
        assert n == expected[name], (name, n, expected[name])
    m = ViT(dim=32, depth=2, heads=4, mlp_dim=64)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    print("ok")
