//! The training step on real data: it learns, it is deterministic, it stops on NaN.

use ferrovit::data::{default_data_dir, Dataset};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::{Error, Tensor, VitConfig};

fn small() -> VitConfig {
    VitConfig {
        dim: 32,
        depth: 2,
        heads: 4,
        mlp_dim: 64,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    }
}

fn losses(steps: usize, seed: u64) -> Vec<f32> {
    let (train, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let mut e = Engine::new(
        &small(),
        TrainConfig {
            seed,
            lr: 2e-3,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    (0..steps)
        .map(|s| {
            let idx: Vec<usize> = (s * 32..(s + 1) * 32).map(|i| i % train.len()).collect();
            let (x, y) = train.batch(&idx, None).unwrap();
            let ids: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
            e.train_step(x, &y, &ids).unwrap().loss
        })
        .collect()
}

#[test]
fn loss_falls_on_the_digits_data() {
    let l = losses(120, 0);
    let first: f32 = l[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = l[110..].iter().sum::<f32>() / 10.0;
    assert!(
        last < 0.85 * first,
        "loss did not fall: first {first}, last {last}"
    );
}

#[test]
fn same_seed_same_losses_different_seed_different_losses() {
    let a = losses(4, 7);
    assert_eq!(a, losses(4, 7));
    assert_ne!(a, losses(4, 8));
}

#[test]
fn non_finite_loss_stops_with_the_step_number() {
    let mut e = Engine::new(&small(), TrainConfig::default()).unwrap();
    let x = Tensor::full([2, 3, 32, 32], 0.5, ferrovit::Device::Cpu);
    e.train_step(x.clone(), &[1, 2], &[0, 1]).unwrap();
    let nan = Tensor::full([2, 3, 32, 32], f32::NAN, ferrovit::Device::Cpu);
    match e.train_step(nan, &[1, 2], &[0, 1]) {
        Err(Error::NonFinite { step: 1, .. }) => {}
        other => panic!("expected NonFinite at step 1, got {other:?}"),
    }
}

#[test]
fn bad_labels_and_shapes_are_errors_not_panics() {
    let mut e = Engine::new(&small(), TrainConfig::default()).unwrap();
    let x = Tensor::full([2, 3, 32, 32], 0.5, ferrovit::Device::Cpu);
    let err = e
        .train_step(x.clone(), &[1, 10], &[0, 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 10"), "{err}");
    let wrong = Tensor::full([2, 3, 16, 16], 0.5, ferrovit::Device::Cpu);
    let err = e
        .train_step(wrong, &[1, 2], &[0, 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 3, 16, 16]"), "{err}");
}

/// bf16 mixed precision (activations and their gradients stored in bf16, as autocast)
/// computes nearly the f32 gradients: every parameter's gradient within 3% (relative L2)
/// of f32's, on real images with dropout. A gradient that lost its way through a bf16
/// buffer (wrong dtype, unrounded or double-counted) is far off.
#[test]
fn bf16_gradients_are_close_to_f32() {
    use ferrovit::Precision;
    let (train, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let idx: Vec<usize> = (0..48).collect();
    let ids: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
    let (x, y) = train.batch(&idx, None).unwrap();
    let cfg = VitConfig {
        dropout: 0.1,
        ..small()
    };
    let grads = |precision| {
        let mut e = Engine::new(
            &cfg,
            TrainConfig {
                precision,
                ..TrainConfig::default()
            },
        )
        .unwrap();
        e.train();
        e.zero_grad().unwrap();
        let out = e.forward(x.clone(), &ids).unwrap();
        let loss = e.criterion(&out, &y).unwrap();
        e.backward(&loss).unwrap();
        e.params()
            .iter()
            .map(|p| (p.name.clone(), p.grad.to_vec_f32()))
            .collect::<Vec<_>>()
    };
    let (full, half) = (grads(Precision::F32), grads(Precision::Bf16));
    for ((name, a), (_, b)) in full.iter().zip(&half) {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
        let rel = (diff / norm.max(1e-30)).sqrt();
        assert!(
            rel < 0.03,
            "{name}: bf16 gradient {rel:.4} (relative L2) from f32's"
        );
    }
}

/// `--clip-grad`: the update with clipping equals one computed by hand from the
/// unclipped gradients as `torch.nn.utils.clip_grad_norm_` does (total L2 norm over
/// every gradient, scale max / (total + 1e-6) when below 1), with SGD at lr 1 so the
/// step is `p - g`; and the engine reports the norm before clipping.
fn clipping_matches_a_hand_computed_reference(device: ferrovit::tensor::Device) {
    let cfg = VitConfig {
        dim: 16,
        depth: 1,
        heads: 2,
        mlp_dim: 16,
        dropout: 0.0,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let config = |clip: Option<f32>| TrainConfig {
        optimizer: ferrovit::optim::OptimizerKind::sgd(0.0, false),
        lr: 1.0,
        weight_decay: 0.0,
        clip_grad_norm: clip,
        ..TrainConfig::default()
    };
    let images = crate::common::randn(&[4, 3, 32, 32], 11);
    let (labels, ids) = (vec![1, 7, 3, 3], vec![0, 1, 2, 3]);
    let mut plain = Engine::new(&cfg, config(None)).unwrap();
    plain.to_device(device).unwrap();
    plain.zero_grad().unwrap();
    let out = plain.forward(images.clone(), &ids).unwrap();
    let loss = plain.criterion(&out, &labels).unwrap();
    plain.backward(&loss).unwrap();
    let host = |t: &Tensor| {
        t.to_device(ferrovit::tensor::Device::Cpu)
            .unwrap()
            .to_vec_f32()
    };
    let (values, grads): (Vec<Vec<f32>>, Vec<Vec<f32>>) = plain
        .params()
        .iter()
        .map(|p| (host(&p.value), host(&p.grad)))
        .unzip();
    let total = grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    for (max, clipped) in [(total / 4.0, true), (total * 2.0, false)] {
        let coef = (max / (total + 1e-6)).min(1.0);
        assert_eq!(coef < 1.0, clipped);
        let mut e = Engine::new(&cfg, config(Some(max as f32))).unwrap();
        e.to_device(device).unwrap();
        e.train_step(images.clone(), &labels, &ids).unwrap();
        let norm = e.grad_norm().unwrap();
        assert!(
            (norm as f64 - total).abs() < 1e-5 * total,
            "norm {norm} vs {total}"
        );
        for ((p, v), g) in e.params().iter().zip(&values).zip(&grads) {
            let want: Vec<f32> = v
                .iter()
                .zip(g)
                .map(|(&v, &g)| (v as f64 - coef * g as f64) as f32)
                .collect();
            let got = host(&p.value);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-5, "{} (max {max:.4}): off by {err}", p.name);
        }
    }
}

#[test]
fn clipping_matches_a_hand_computed_reference_on_the_cpu() {
    clipping_matches_a_hand_computed_reference(ferrovit::tensor::Device::Cpu);
}

#[test]
fn clipping_matches_a_hand_computed_reference_on_emulated_cuda() {
    clipping_matches_a_hand_computed_reference(ferrovit::tensor::Device::cuda_emulated());
}
