//! The ViT presets and model structure.

use crate::common::{max_rel_err, randn};
use ferrovit::nn::PRESETS;
use ferrovit::{ForwardCtx, Graph, ParamStore, Vit, VitConfig};

#[test]
fn preset_parameter_counts_are_exact() {
    for (name, want) in [
        ("vit_tiny_patch4_32", 9_532_938),
        ("vit_lite_depth7_patch4_32", 3_722_250),
    ] {
        let cfg = VitConfig::preset(name).unwrap();
        let mut store = ParamStore::new();
        Vit::new(&cfg, &mut store, 0).unwrap();
        assert_eq!(store.num_elements(), want, "{name}: built model");
        assert_eq!(cfg.num_params(), want, "{name}: formula");
        assert_eq!(
            (cfg.tokens(), cfg.dropout, cfg.layernorm_eps),
            (65, 0.1, 1e-6),
            "{name}"
        );
    }
    assert_eq!(PRESETS.len(), 2);
}

#[test]
fn unknown_preset_is_a_clear_error() {
    let e = VitConfig::preset("vit_huge").unwrap_err().to_string();
    assert!(
        e.contains("vit_huge") && e.contains("vit_tiny_patch4_32"),
        "{e}"
    );
}

#[test]
fn invalid_configs_name_the_field() {
    let base = VitConfig::preset("vit_lite_depth7_patch4_32").unwrap();
    let cases: Vec<(VitConfig, &str)> = vec![
        (
            VitConfig {
                heads: 3,
                ..base.clone()
            },
            "heads",
        ),
        (
            VitConfig {
                patch_size: 5,
                ..base.clone()
            },
            "patch_size",
        ),
        (
            VitConfig {
                depth: 0,
                ..base.clone()
            },
            "depth",
        ),
        (
            VitConfig {
                dropout: 1.0,
                ..base.clone()
            },
            "dropout",
        ),
    ];
    for (cfg, field) in cases {
        let e = Vit::new(&cfg, &mut ParamStore::new(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn parameter_names_are_global_and_ordered() {
    let cfg = VitConfig::preset("vit_lite_depth7_patch4_32").unwrap();
    let mut store = ParamStore::new();
    Vit::new(&cfg, &mut store, 0).unwrap();
    let names: Vec<&str> = store.named_parameters().map(|(n, _)| n).collect();
    assert_eq!(
        &names[..4],
        [
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
            "cls_token",
            "pos_embed"
        ]
    );
    assert_eq!(
        &names[4..16],
        [
            "blocks.0.norm1.weight",
            "blocks.0.norm1.bias",
            "blocks.0.attn.qkv.weight",
            "blocks.0.attn.qkv.bias",
            "blocks.0.attn.proj.weight",
            "blocks.0.attn.proj.bias",
            "blocks.0.norm2.weight",
            "blocks.0.norm2.bias",
            "blocks.0.mlp.fc1.weight",
            "blocks.0.mlp.fc1.bias",
            "blocks.0.mlp.fc2.weight",
            "blocks.0.mlp.fc2.bias",
        ]
    );
    assert!(names.contains(&"blocks.6.mlp.fc2.bias"));
    assert_eq!(
        &names[names.len() - 4..],
        ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    );
    let dims = |n: &str| store.get(store.id(n).unwrap()).value.dims().to_vec();
    assert_eq!(dims("patch_embed.proj.weight"), [256, 3, 4, 4]);
    assert_eq!(dims("pos_embed"), [1, 65, 256]);
    assert_eq!(dims("blocks.3.attn.qkv.weight"), [768, 256]);
}

#[test]
fn initialisation_follows_pytorch_defaults_and_is_seeded() {
    let cfg = VitConfig::preset("vit_lite_depth7_patch4_32").unwrap();
    let (mut a, mut b, mut c) = (ParamStore::new(), ParamStore::new(), ParamStore::new());
    Vit::new(&cfg, &mut a, 1).unwrap();
    Vit::new(&cfg, &mut b, 1).unwrap();
    Vit::new(&cfg, &mut c, 2).unwrap();
    let get = |s: &ParamStore, n: &str| s.get(s.id(n).unwrap()).value.to_vec_f32();
    assert_eq!(
        get(&a, "blocks.2.mlp.fc1.weight"),
        get(&b, "blocks.2.mlp.fc1.weight")
    );
    assert_ne!(
        get(&a, "blocks.2.mlp.fc1.weight"),
        get(&c, "blocks.2.mlp.fc1.weight")
    );
    // nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fc1 fan_in = 256
    let w = get(&a, "blocks.2.mlp.fc1.weight");
    let bound = 1.0 / 16.0;
    assert!(w.iter().all(|v| v.abs() <= bound));
    let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    assert!(
        (var - bound * bound / 3.0).abs() < 0.05 * bound * bound / 3.0,
        "variance {var}"
    );
    assert!(get(&a, "blocks.0.norm1.weight").iter().all(|&v| v == 1.0));
    assert!(get(&a, "norm.bias").iter().all(|&v| v == 0.0));
    let pos = get(&a, "pos_embed");
    assert!(pos.iter().all(|v| v.abs() <= 0.04) && pos.iter().any(|v| v.abs() > 0.02));
}

#[test]
fn cls_only_last_block_equals_full_computation() {
    let cfg = VitConfig {
        image_size: 16,
        depth: 3,
        dim: 32,
        heads: 4,
        mlp_dim: 48,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let images = randn(&[3, 3, 16, 16], 5);
    let labels = [4, 0, 9];
    let ctx = ForwardCtx::train(77, vec![3u64, 1, 8]);
    let run = |full: bool| {
        let mut store = ParamStore::new();
        let vit = Vit::new(&cfg, &mut store, 9).unwrap();
        let mut g = Graph::new(&mut store);
        let logits = if full {
            let f = vit.forward_features(&mut g, images.clone(), &ctx).unwrap();
            vit.head(&mut g, f).unwrap()
        } else {
            vit.forward(&mut g, images.clone(), &ctx).unwrap()
        };
        let out = g.value(logits).to_vec_f32();
        let loss = g.cross_entropy(logits, &labels, 0.0).unwrap();
        g.backward(loss).unwrap();
        drop(g);
        let grads: Vec<Vec<f32>> = store.iter().map(|p| p.grad.to_vec_f32()).collect();
        (out, grads)
    };
    let (full, full_grads) = run(true);
    let (pruned, pruned_grads) = run(false);
    assert!(max_rel_err(&pruned, &full).0 < 1e-6);
    for (a, b) in pruned_grads.iter().zip(&full_grads) {
        assert!(max_rel_err(a, b).0 < 1e-5);
    }
}

/// The position embedding resampled to another patch grid equals timm's
/// `resample_abs_pos_embed` (tests/fixtures/pos_embed.safetensors, written by
/// scripts/make_pos_embed_fixture.py): 8×8 → 12×12 and 8×8 → 4×4, the cls row kept.
#[test]
fn pos_embed_resampling_matches_timm() {
    use ferrovit::nn::pos_embed::resample_pos_embed;
    const FIXTURE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pos_embed.safetensors"
    ));
    let st = safetensors::SafeTensors::deserialize(FIXTURE).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let input = f32s("input");
    assert_eq!(input.len(), 65 * 5);
    for to in [12, 4] {
        let want = f32s(&format!("to{to}"));
        let got = resample_pos_embed(&input, 5, 8, to);
        assert_eq!(got.len(), want.len());
        assert_eq!(got[..5], input[..5], "the cls position is kept");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "8×8 → {to}×{to}: max |diff| {worst}");
    }
}
