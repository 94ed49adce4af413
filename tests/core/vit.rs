//! The ViT presets and model structure.

use crate::common::{max_rel_err, randn};
use ferrovit::backend::DropoutKey;
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
        (
            VitConfig {
                drop_path: 1.0,
                ..base.clone()
            },
            "drop_path",
        ),
        (
            VitConfig {
                drop_path: f32::NAN,
                ..base.clone()
            },
            "drop_path",
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
fn param_shapes_are_the_built_models() {
    let odd = VitConfig {
        image_size: 24,
        patch_size: 8,
        in_channels: 1,
        num_classes: 7,
        dim: 12,
        depth: 3,
        heads: 3,
        mlp_dim: 20,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let presets = PRESETS.iter().map(|n| VitConfig::preset(n).unwrap());
    for cfg in presets.chain([odd.clone()]) {
        let mut store = ParamStore::new();
        Vit::skeleton(&cfg, &mut store).unwrap();
        let built: Vec<(String, Vec<usize>)> = store
            .named_parameters()
            .map(|(n, t)| (n.to_string(), t.dims().to_vec()))
            .collect();
        assert_eq!(Vit::param_shapes(&cfg).unwrap(), built, "{cfg:?}");
    }
    let bad = VitConfig { dim: 0, ..odd };
    assert!(Vit::param_shapes(&bad).is_err());
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
    for drop_path in [0.0, 0.5] {
        cls_only_equals_full(VitConfig {
            image_size: 16,
            depth: 3,
            dim: 32,
            heads: 4,
            mlp_dim: 48,
            drop_path,
            ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
        });
    }
}

fn cls_only_equals_full(cfg: VitConfig) {
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

#[test]
fn drop_path_rates_rise_linearly_over_depth() {
    let cfg = VitConfig {
        depth: 5,
        drop_path: 0.2,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let rates: Vec<f32> = (0..5).map(|i| cfg.drop_path_rate(i)).collect();
    // torch.linspace(0, 0.2, 5)
    assert_eq!(rates, [0.0, 0.05, 0.1, 0.15, 0.2]);
    let one = VitConfig { depth: 1, ..cfg };
    assert_eq!(one.drop_path_rate(0), 0.0, "linspace(0, P, 1) is [0]");
}

/// splitmix64's finaliser, written out again: the documented mask hash.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stochastic depth keeps sample `s` iff 16-bit lane 0 of mix64(mix64(site key ^ s))
/// is at least round(p · 2^16), the site key being mix64(mix64(seed) ^ site · φ), and
/// scales what it keeps by 1 / (1 − p): recomputed here by hand for 400 samples.
#[test]
fn drop_path_masks_whole_samples_as_documented() {
    let (p, seed, site) = (0.3f32, 17u64, 5u64);
    let samples: std::sync::Arc<[u64]> = (0..400u64).map(|s| s * 7 + 3).collect();
    let n = samples.len();
    let x = randn(&[n, 3, 5], 1);
    let r = randn(&[n, 3, 5], 2);
    let mut store = ParamStore::new();
    let mut g = Graph::new(&mut store);
    let (xv, rv) = (g.input(x.clone()), g.input(r.clone()));
    let key = DropoutKey {
        seed,
        site,
        per_sample: true,
    };
    let out = g.dropout_add(rv, xv, p, key, &samples).unwrap();
    let out = g.value(out).to_vec_f32();
    let site_key = mix64(mix64(seed) ^ site.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let threshold = (p as f64 * 65536.0).round() as u64;
    let (x, r) = (x.to_vec_f32(), r.to_vec_f32());
    let mut dropped = 0;
    for (i, &s) in samples.iter().enumerate() {
        let keep = mix64(mix64(site_key ^ s)) & 0xffff >= threshold;
        dropped += usize::from(!keep);
        let m = if keep { 1.0 / (1.0 - p) } else { 0.0 };
        for e in i * 15..(i + 1) * 15 {
            assert_eq!(out[e], r[e] + x[e] * m, "sample {s}, element {e}");
        }
    }
    assert!(
        (90..150).contains(&dropped),
        "{dropped} of 400 dropped at p = 0.3"
    );
}

/// With a rate that rounds to "always drop", the last block of a depth-2 model (rate
/// P) adds nothing and the first (rate 0) is untouched: training logits equal the
/// logits of block 0 alone, and the training step's gradients skip block 1.
#[test]
fn drop_path_near_one_drops_the_last_block_and_spares_the_first() {
    let cfg = VitConfig {
        image_size: 8,
        depth: 2,
        dim: 16,
        heads: 2,
        mlp_dim: 24,
        dropout: 0.0,
        drop_path: 0.999_995,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let images = randn(&[4, 3, 8, 8], 3);
    let mut store = ParamStore::new();
    let vit = Vit::new(&cfg, &mut store, 4).unwrap();
    let mut g = Graph::new(&mut store);
    let ctx = ForwardCtx::train(9, vec![0u64, 1, 2, 3]);
    let logits = vit.forward(&mut g, images.clone(), &ctx).unwrap();
    let trained = g.value(logits).to_vec_f32();
    let loss = g.cross_entropy(logits, &[0, 1, 2, 3], 0.0).unwrap();
    g.backward(loss).unwrap();
    let eval = ForwardCtx::eval(4);
    let x = vit.embed(&mut g, images, &eval).unwrap();
    let x = vit.blocks(&mut g, x, 0..1, &eval).unwrap();
    let logits = vit.head(&mut g, x).unwrap();
    assert_eq!(trained, g.value(logits).to_vec_f32());
    drop(g);
    for p in store.iter() {
        let zero = p.grad.to_vec_f32().iter().all(|&v| v == 0.0);
        let in_last = p.name.starts_with("blocks.1.");
        assert_eq!(
            zero, in_last,
            "`{}`: gradient zero iff in the dropped block",
            p.name
        );
    }
}
