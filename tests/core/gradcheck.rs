//! Finite-difference gradient checks for every op and for a whole small ViT, on
//! random inputs.
//!
//! Method: central differences in f32 with step `EPS`, the objective `sum(r ⊙ out)`
//! for a random `r` accumulated in f64; each input is probed at a sample of elements.
//! Tolerance: |analytic − numeric| ≤ ATOL + RTOL·max(|analytic|, |numeric|). A wrong
//! backward formula misses by O(1); f32 rounding and O(EPS²) truncation stay far below.

use crate::common::randn;
use ferrovit::backend::DropoutKey;
use ferrovit::rng::Rng;
use ferrovit::{Activation, ForwardCtx, Graph, ParamStore, Result, Tensor, Var, Vit, VitConfig};
use std::sync::Arc;

const EPS: f32 = 3e-3;
const ATOL: f64 = 2e-3;
const RTOL: f64 = 1e-2;
const PROBES: usize = 16;

type Build = dyn Fn(&mut Graph, &[Var]) -> Result<Var>;

/// sum(r ⊙ build(inputs)) in f64.
fn objective(inputs: &[Tensor], r: &Tensor, build: &Build) -> f64 {
    let mut store = ParamStore::new();
    let mut g = Graph::new(&mut store);
    let vars: Vec<Var> = inputs.iter().map(|t| g.input(t.clone())).collect();
    let out = build(&mut g, &vars).expect("forward");
    let out = g.value(out).f32s().expect("f32");
    out.iter()
        .zip(r.f32s().expect("f32"))
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

/// Checks d sum(r ⊙ out) / d input for every input listed in `wrt`.
fn check(name: &str, inputs: Vec<Tensor>, wrt: &[usize], build: &Build) {
    let mut store = ParamStore::new();
    let mut g = Graph::new(&mut store);
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if wrt.contains(&i) {
                g.input_with_grad(t.clone())
            } else {
                g.input(t.clone())
            }
        })
        .collect();
    let out = build(&mut g, &vars).expect("forward");
    let r = randn(g.value(out).dims(), 99);
    g.backward_from(out, r.clone()).expect("backward");
    let grads: Vec<Vec<f32>> = wrt
        .iter()
        .map(|&i| g.grad(vars[i]).expect("input grad").to_vec_f32())
        .collect();
    drop(g);

    let mut rng = Rng::new(7);
    for (gi, &i) in wrt.iter().enumerate() {
        let n = inputs[i].numel();
        for probe in 0..PROBES.min(n) {
            let j = if n <= PROBES {
                probe
            } else {
                (rng.next_u64() % n as u64) as usize
            };
            let mut plus = inputs.clone();
            let mut minus = inputs.clone();
            plus[i].f32s_mut().unwrap()[j] += EPS;
            minus[i].f32s_mut().unwrap()[j] -= EPS;
            let num =
                (objective(&plus, &r, build) - objective(&minus, &r, build)) / (2.0 * EPS as f64);
            let ana = grads[gi][j] as f64;
            let tol = ATOL + RTOL * num.abs().max(ana.abs());
            assert!(
                (ana - num).abs() <= tol,
                "{name}: d/d input{i}[{j}]: analytic {ana:.6}, numeric {num:.6}"
            );
        }
    }
}

#[test]
fn linear_with_bias() {
    check(
        "linear",
        vec![randn(&[2, 5, 7], 1), randn(&[6, 7], 2), randn(&[6], 3)],
        &[0, 1, 2],
        &|g, v| g.linear(v[0], v[1], Some(v[2]), Activation::None),
    );
}

#[test]
fn linear_without_bias() {
    check(
        "linear_nobias",
        vec![randn(&[9, 4], 1), randn(&[3, 4], 2)],
        &[0, 1],
        &|g, v| g.linear(v[0], v[1], None, Activation::None),
    );
}

#[test]
fn linear_with_fused_gelu() {
    check(
        "linear_gelu",
        vec![randn(&[3, 4, 6], 4), randn(&[5, 6], 5), randn(&[5], 6)],
        &[0, 1, 2],
        &|g, v| g.linear(v[0], v[1], Some(v[2]), Activation::Gelu),
    );
}

#[test]
fn patch_embedding_conv_weight() {
    // images are data (no gradient); the conv weight [d, c, p, p] and bias are checked.
    check(
        "patch_embed",
        vec![
            randn(&[2, 3, 8, 8], 7),
            randn(&[5, 3, 4, 4], 8),
            randn(&[5], 9),
        ],
        &[1, 2],
        &|g, v| {
            let p = g.patchify(v[0], 4)?;
            g.linear(p, v[1], Some(v[2]), Activation::None)
        },
    );
}

#[test]
fn cls_and_position_embedding() {
    check(
        "embed",
        vec![
            randn(&[3, 4, 6], 10),
            randn(&[1, 1, 6], 11),
            randn(&[1, 5, 6], 12),
        ],
        &[0, 1, 2],
        &|g, v| g.embed(v[0], v[1], v[2]),
    );
}

#[test]
fn layernorm() {
    let gamma = randn(&[8], 14);
    check(
        "layernorm",
        vec![randn(&[3, 5, 8], 13), gamma, randn(&[8], 15)],
        &[0, 1, 2],
        &|g, v| g.layernorm(v[0], v[1], v[2], 1e-6),
    );
}

#[test]
fn multi_head_attention_core() {
    // batch 2, 5 tokens, dim 8, 2 heads; scale inputs to keep softmax away from saturation
    check("attention", vec![randn(&[2, 5, 24], 16)], &[0], &|g, v| {
        g.attention(v[0], 2)
    });
}

#[test]
fn attention_with_projections() {
    check(
        "attention_block",
        vec![
            randn(&[2, 7, 8], 17),
            randn(&[24, 8], 18),
            randn(&[24], 19),
            randn(&[8, 8], 20),
            randn(&[8], 21),
        ],
        &[0, 1, 2, 3, 4],
        &|g, v| {
            let qkv = g.linear(v[0], v[1], Some(v[2]), Activation::None)?;
            let a = g.attention(qkv, 4)?;
            g.linear(a, v[3], Some(v[4]), Activation::None)
        },
    );
}

#[test]
fn residual_add() {
    check(
        "add",
        vec![randn(&[4, 6], 22), randn(&[4, 6], 23)],
        &[0, 1],
        &|g, v| g.add(v[0], v[1]),
    );
}

#[test]
fn add_with_shared_input_accumulates() {
    // x feeds both operands: the gradient must be 2r.
    check("add_shared", vec![randn(&[3, 3], 24)], &[0], &|g, v| {
        g.add(v[0], v[0])
    });
}

#[test]
fn dropout_is_a_fixed_linear_mask() {
    let samples: Arc<[u64]> = vec![5, 9, 2].into();
    check(
        "dropout",
        vec![randn(&[3, 4, 10], 25)],
        &[0],
        &move |g, v| {
            g.dropout(
                v[0],
                0.3,
                DropoutKey {
                    seed: 11,
                    site: 3,
                    per_sample: false,
                },
                &samples,
            )
        },
    );
}

/// Stochastic depth: one mask bit per sample (p = 0.5 over 6 samples drops some and
/// keeps some), fused with the residual add.
#[test]
fn drop_path_is_a_per_sample_mask() {
    let samples: Arc<[u64]> = vec![5, 9, 2, 7, 1, 3].into();
    let key = DropoutKey {
        seed: 11,
        site: 3,
        per_sample: true,
    };
    check(
        "drop_path_add",
        vec![randn(&[6, 4, 10], 28), randn(&[6, 4, 10], 29)],
        &[0, 1],
        &move |g, v| g.dropout_add(v[0], v[1], 0.5, key, &samples),
    );
}

#[test]
fn select_cls_token() {
    check("select_cls", vec![randn(&[3, 4, 5], 26)], &[0], &|g, v| {
        g.select_cls(v[0])
    });
}

#[test]
fn softmax_cross_entropy_with_label_smoothing() {
    for smoothing in [0.0, 0.1] {
        check(
            "cross_entropy",
            vec![randn(&[5, 7], 27)],
            &[0],
            &move |g, v| g.cross_entropy(v[0], &[0, 3, 6, 2, 2], smoothing),
        );
    }
}

#[test]
fn softmax_cross_entropy_with_soft_targets() {
    // rows as Mixup makes them (0.7 / 0.3 of two classes, smoothed), and one not
    // summing to 1, whose gradient has the softmax · Σt term
    let mut t = ferrovit::data::mixup::soft_targets(&[0, 3, 6, 2], &[5, 3, 1, 4], 0.7, 7, 0.1);
    t.extend((0..7).map(|k| 0.05 * k as f32));
    let targets = Tensor::from_vec(t, [5, 7]).unwrap();
    check(
        "cross_entropy_soft",
        vec![randn(&[5, 7], 28)],
        &[0],
        &move |g, v| g.cross_entropy_soft(v[0], &targets),
    );
}

fn tiny_config() -> VitConfig {
    VitConfig {
        image_size: 8,
        patch_size: 4,
        in_channels: 3,
        num_classes: 4,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_dim: 12,
        dropout: 0.1,
        drop_path: 0.0,
        layernorm_eps: 1e-6,
    }
}

fn vit_loss(
    vit: &Vit,
    store: &mut ParamStore,
    images: &Tensor,
    labels: &[usize],
    backward: bool,
) -> f64 {
    let ctx = ForwardCtx::train(1234, vec![10u64, 11, 12]);
    let mut g = Graph::new(store);
    let logits = vit.forward(&mut g, images.clone(), &ctx).expect("forward");
    let loss = g.cross_entropy(logits, labels, 0.1).expect("loss");
    if backward {
        g.backward(loss).expect("backward");
    }
    g.value(loss).f32s().unwrap()[0] as f64
}

#[test]
fn whole_vit_with_dropout_per_element() {
    whole_vit(tiny_config());
}

/// Stochastic depth on every block but the first (rates 0 and 0.6 over depth 2) with
/// dropout: samples 10, 11, 12 of seed 1234 lose some of block 1's branches.
#[test]
fn whole_vit_with_drop_path() {
    whole_vit(VitConfig {
        drop_path: 0.6,
        ..tiny_config()
    });
}

fn whole_vit(cfg: VitConfig) {
    let mut store = ParamStore::new();
    let vit = Vit::new(&cfg, &mut store, 3).unwrap();
    let images = randn(&[3, 3, 8, 8], 30);
    let labels = [1, 0, 3];
    vit_loss(&vit, &mut store, &images, &labels, true);
    let analytic: Vec<(String, Vec<f32>)> = store
        .iter()
        .map(|p| (p.name.clone(), p.grad.to_vec_f32()))
        .collect();
    let mut rng = Rng::new(5);
    for (name, grad) in analytic {
        let id = store.id(&name).unwrap();
        for _ in 0..4 {
            let j = (rng.next_u64() % grad.len() as u64) as usize;
            // A smaller step than the op checks: the cls token starts near zero, so its
            // LayerNorm sees a tiny-variance row and is strongly curved there.
            let h = 1e-3;
            let orig = store.get(id).value.f32s().unwrap()[j];
            store.get_mut(id).value.f32s_mut().unwrap()[j] = orig + h;
            let lp = vit_loss(&vit, &mut store, &images, &labels, false);
            store.get_mut(id).value.f32s_mut().unwrap()[j] = orig - h;
            let lm = vit_loss(&vit, &mut store, &images, &labels, false);
            store.get_mut(id).value.f32s_mut().unwrap()[j] = orig;
            let num = (lp - lm) / (2.0 * h as f64);
            let ana = grad[j] as f64;
            assert!(
                (ana - num).abs() <= 1e-3 + RTOL * num.abs().max(ana.abs()),
                "{name}[{j}]: analytic {ana:.6}, numeric {num:.6}"
            );
        }
    }
}

#[test]
fn whole_vit_directional_derivative() {
    // Along a random direction v over all parameters: (L(θ+hv) − L(θ−hv)) / 2h ≈ ∇L·v.
    let cfg = tiny_config();
    let mut store = ParamStore::new();
    let vit = Vit::new(&cfg, &mut store, 4).unwrap();
    let images = randn(&[3, 3, 8, 8], 31);
    let labels = [2, 2, 0];
    vit_loss(&vit, &mut store, &images, &labels, true);
    let mut rng = Rng::new(8);
    let dirs: Vec<Vec<f32>> = store
        .iter()
        .map(|p| rng.vec(p.value.numel(), |r| r.normal()))
        .collect();
    let dot: f64 = store
        .iter()
        .zip(&dirs)
        .map(|(p, d)| {
            p.grad
                .f32s()
                .unwrap()
                .iter()
                .zip(d)
                .map(|(g, v)| *g as f64 * *v as f64)
                .sum::<f64>()
        })
        .sum();
    let shift = |store: &mut ParamStore, h: f32| {
        for (p, d) in store.iter_mut().zip(&dirs) {
            p.value
                .f32s_mut()
                .unwrap()
                .iter_mut()
                .zip(d)
                .for_each(|(x, v)| *x += h * v);
        }
    };
    // The direction has norm ~sqrt(#params) ≈ 50, so a small step keeps the loss in
    // its locally linear range while staying far above f32 rounding (loss ~1).
    let h = 2e-4;
    shift(&mut store, h);
    let lp = vit_loss(&vit, &mut store, &images, &labels, false);
    shift(&mut store, -2.0 * h);
    let lm = vit_loss(&vit, &mut store, &images, &labels, false);
    let num = (lp - lm) / (2.0 * h as f64);
    assert!(
        (num - dot).abs() <= 1e-2 * dot.abs().max(1e-1),
        "directional: analytic {dot:.6}, numeric {num:.6}"
    );
}

#[test]
fn dropout_fused_with_residual_add() {
    let samples: Arc<[u64]> = vec![1, 4].into();
    check(
        "dropout_add",
        vec![randn(&[2, 3, 8], 40), randn(&[2, 3, 8], 41)],
        &[0, 1],
        &move |g, v| {
            g.dropout_add(
                v[0],
                v[1],
                0.25,
                DropoutKey {
                    seed: 3,
                    site: 9,
                    per_sample: false,
                },
                &samples,
            )
        },
    );
}

#[test]
fn attention_with_fewer_queries_than_tokens() {
    check(
        "attention_queries",
        vec![randn(&[2, 5, 24], 42)],
        &[0],
        &|g, v| g.attention_queries(v[0], 2, 2),
    );
}

#[test]
fn reshape_passes_gradients_through() {
    check("reshape", vec![randn(&[2, 1, 6], 43)], &[0], &|g, v| {
        let r = g.reshape(v[0], &[2, 6])?;
        g.cross_entropy(r, &[1, 5], 0.0)
    });
}
