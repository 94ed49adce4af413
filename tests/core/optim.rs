//! Optimizers against f64 transcriptions of `torch.optim`'s update rules, clipping,
//! schedules and named state.

use crate::common::{max_rel_err, randn};
use ferrovit::optim::{clip_grad_norm, Ema, LrSchedule, Optimizer, OptimizerKind};
use ferrovit::{Device, ParamStore, Tensor};

const N: usize = 37;

fn store_with(seed: u64) -> ParamStore {
    let mut s = ParamStore::new();
    s.add("w", randn(&[N], seed)).unwrap();
    s.add("b", randn(&[3], seed + 1)).unwrap();
    s
}

/// Runs `steps` updates with random gradients; returns the final values of "w" and
/// the gradients used, so a reference can replay them.
fn run(kind: OptimizerKind, wd: f32, lr: f32, steps: usize) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut store = store_with(1);
    let start = store.get(store.id("w").unwrap()).value.to_vec_f32();
    let mut opt = Optimizer::new(kind, wd, &store).unwrap();
    let mut grads = Vec::new();
    for s in 0..steps {
        for (i, p) in store.iter_mut().enumerate() {
            p.grad = randn(p.value.dims(), 100 + 10 * s as u64 + i as u64);
        }
        grads.push(store.get(store.id("w").unwrap()).grad.to_vec_f32());
        opt.step(&mut store, lr).unwrap();
    }
    (
        start,
        store.get(store.id("w").unwrap()).value.to_vec_f32(),
        grads,
    )
}

fn assert_close(ours: &[f32], reference: &[f64], what: &str) {
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert!(
            (*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn sgd_momentum_nesterov_and_weight_decay_match_torch_rule() {
    for nesterov in [false, true] {
        let (mom, wd, lr) = (0.9, 0.01, 0.1);
        let (start, ours, grads) = run(OptimizerKind::sgd(mom, nesterov), wd, lr, 4);
        let mut p: Vec<f64> = start.iter().map(|&v| v as f64).collect();
        let mut buf = vec![0.0f64; N];
        for (t, g) in grads.iter().enumerate() {
            for i in 0..N {
                let d = g[i] as f64 + wd as f64 * p[i];
                buf[i] = if t == 0 { d } else { mom as f64 * buf[i] + d };
                let step = if nesterov {
                    d + mom as f64 * buf[i]
                } else {
                    buf[i]
                };
                p[i] -= lr as f64 * step;
            }
        }
        assert_close(&ours, &p, if nesterov { "nesterov" } else { "momentum" });
    }
}

#[test]
fn plain_sgd_without_momentum() {
    let (start, ours, grads) = run(OptimizerKind::sgd(0.0, false), 0.0, 0.5, 2);
    let want: Vec<f64> = (0..N)
        .map(|i| start[i] as f64 - 0.5 * (grads[0][i] as f64 + grads[1][i] as f64))
        .collect();
    assert_close(&ours, &want, "sgd");
}

fn adam_reference(
    start: &[f32],
    grads: &[Vec<f32>],
    lr: f64,
    wd: f64,
    decoupled: bool,
) -> Vec<f64> {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut p: Vec<f64> = start.iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0.0; N], vec![0.0; N]);
    for (t, g) in grads.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..N {
            let mut g = g[i] as f64;
            if decoupled {
                p[i] *= 1.0 - lr * wd;
            } else {
                g += wd * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
        }
    }
    p
}

#[test]
fn adam_and_adamw_match_torch_rule() {
    let (start, ours, grads) = run(OptimizerKind::adam(), 0.1, 1e-2, 5);
    assert_close(
        &ours,
        &adam_reference(&start, &grads, 1e-2, 0.1, false),
        "adam",
    );
    let (start, ours, grads) = run(OptimizerKind::adamw(), 0.1, 1e-2, 5);
    assert_close(
        &ours,
        &adam_reference(&start, &grads, 1e-2, 0.1, true),
        "adamw",
    );
}

#[test]
fn invalid_hyper_parameters_are_refused() {
    let store = store_with(2);
    let e = Optimizer::new(OptimizerKind::sgd(0.0, true), 0.0, &store).unwrap_err();
    assert!(e.to_string().contains("Nesterov"), "{e}");
    assert!(Optimizer::new(OptimizerKind::adamw(), -1.0, &store).is_err());
    let mut store = store_with(2);
    let mut opt = Optimizer::new(OptimizerKind::adamw(), 0.0, &store).unwrap();
    assert!(opt.step(&mut store, f32::NAN).is_err());
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let mut store = store_with(3);
    for p in store.iter_mut() {
        p.grad = Tensor::full(p.value.dims(), 2.0, p.value.device());
    }
    let norm = clip_grad_norm(&mut store, 1.0).unwrap();
    assert!((norm - (4.0 * (N + 3) as f32).sqrt()).abs() < 1e-4);
    let after: f32 = store
        .iter()
        .flat_map(|p| p.grad.to_vec_f32())
        .map(|g| g * g)
        .sum::<f32>()
        .sqrt();
    assert!((after - 1.0).abs() < 1e-4, "norm after clipping {after}");
    // Below the limit: unchanged.
    let before: Vec<f32> = store.iter().flat_map(|p| p.grad.to_vec_f32()).collect();
    clip_grad_norm(&mut store, 10.0).unwrap();
    let again: Vec<f32> = store.iter().flat_map(|p| p.grad.to_vec_f32()).collect();
    assert_eq!(before, again);
}

#[test]
fn lr_schedules() {
    assert_eq!(LrSchedule::Constant.lr(0.1, 1000), 0.1);
    let step = LrSchedule::Step {
        step_size: 10,
        gamma: 0.5,
    };
    assert_eq!(
        (step.lr(1.0, 9), step.lr(1.0, 10), step.lr(1.0, 25)),
        (1.0, 0.5, 0.25)
    );
    let wc = LrSchedule::WarmupCosine {
        warmup: 4,
        total: 14,
        min_lr: 0.1,
    };
    assert_eq!(wc.lr(1.0, 0), 0.25);
    assert_eq!(wc.lr(1.0, 3), 1.0);
    assert!((wc.lr(1.0, 4) - 1.0).abs() < 1e-6);
    assert!(
        (wc.lr(1.0, 9) - 0.55).abs() < 1e-6,
        "half way: {}",
        wc.lr(1.0, 9)
    );
    assert!((wc.lr(1.0, 14) - 0.1).abs() < 1e-6);
    assert!((wc.lr(1.0, 99) - 0.1).abs() < 1e-6);
}

#[test]
fn state_is_named_by_parameter_and_restores() {
    let (mut store, mut other) = (store_with(4), store_with(4));
    let mut opt = Optimizer::new(OptimizerKind::adamw(), 0.0, &store).unwrap();
    for p in store.iter_mut() {
        p.grad = randn(p.value.dims(), 9);
    }
    opt.step(&mut store, 1e-3).unwrap();
    let names: Vec<String> = opt
        .named_state(&store)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        ["exp_avg.w", "exp_avg_sq.w", "exp_avg.b", "exp_avg_sq.b"]
    );

    let saved: Vec<(String, Tensor)> = opt
        .named_state(&store)
        .into_iter()
        .map(|(n, t)| (n, t.clone()))
        .collect();
    let mut restored = Optimizer::new(OptimizerKind::adamw(), 0.0, &other).unwrap();
    restored
        .load_state(&other, opt.steps(), |n| {
            saved.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone())
        })
        .unwrap();
    // Same state + same params + same grads => same next update.
    let snapshot: Vec<(String, Tensor)> = store
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    for (n, v) in snapshot {
        other.set(&n, v).unwrap();
    }
    for (s, o) in store.iter_mut().zip(other.iter_mut()) {
        s.grad = randn(s.value.dims(), 11);
        o.grad = s.grad.clone();
    }
    opt.step(&mut store, 1e-3).unwrap();
    restored.step(&mut other, 1e-3).unwrap();
    for (s, o) in store.iter().zip(other.iter()) {
        assert_eq!(s.value.to_vec_f32(), o.value.to_vec_f32(), "{}", s.name);
    }
    let missing = Optimizer::new(OptimizerKind::adamw(), 0.0, &other)
        .unwrap()
        .load_state(&other, 1, |_| None);
    assert!(missing.unwrap_err().to_string().contains("exp_avg.w"));
}

/// timm's `CosineLRScheduler` (t_in_epochs=False) rate of every update, from
/// tests/fixtures/lr_schedule_timm.json (scripts/make_lr_schedule_fixture.py).
#[test]
fn cosine_schedule_matches_timm() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lr_schedule_timm.json"
    ))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let num = |k: &str| case[k].as_f64().unwrap();
        let schedule = LrSchedule::Cosine {
            warmup: num("warmup") as u64,
            total: num("total") as u64,
            min_lr: num("min_lr") as f32,
            warmup_lr: num("warmup_lr") as f32,
        };
        schedule.validate().unwrap();
        let rates = case["rates"].as_array().unwrap();
        assert!(rates.len() as f64 > num("total"), "past the end too");
        for (step, want) in rates.iter().enumerate() {
            let (want, got) = (
                want.as_f64().unwrap(),
                schedule.lr(num("lr") as f32, step as u64),
            );
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-12,
                "{case}: update {step}: {got} vs timm {want}"
            );
        }
    }
}

/// The EMA after every update equals timm's `ModelEmaV3` driven as timm's train.py
/// drives it (tests/fixtures/ema_timm.json, scripts/make_ema_fixture.py): decay 0.9
/// without warm-up, 0.9 and 0.5 with it; on the CPU and the emulated CUDA device.
#[test]
fn ema_matches_timm_model_ema_v3() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ema_timm.json"
    ))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        let a = v.as_array().unwrap();
        a.iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let weights: Vec<Vec<f32>> = doc["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for device in [Device::Cpu, Device::cuda_emulated()] {
        for run in runs {
            let (decay, warmup) = (
                run["decay"].as_f64().unwrap() as f32,
                run["warmup"].as_bool().unwrap(),
            );
            let mut store = ParamStore::new();
            let w = |s: usize| Tensor::from_vec(weights[s].clone(), [3, 5]).unwrap();
            store.add("w", w(0)).unwrap();
            store.to_device(device).unwrap();
            let mut ema = Ema::new(decay, warmup, &store).unwrap();
            for (i, want) in run["steps"].as_array().unwrap().iter().enumerate() {
                let step = i as u64 + 1;
                store.set("w", w(i + 1).to_device(device).unwrap()).unwrap();
                ema.update(&store, step).unwrap();
                let d = want["decay"].as_f64().unwrap();
                assert!(
                    (ema.decay_at(step) as f64 - d).abs() < 1e-7,
                    "{run:?} step {step}"
                );
                let got = ema.named(&store)[0].1.to_vec_f32();
                let (e, j) = max_rel_err(&got, &floats(&want["ema"]));
                assert!(
                    e < 1e-6,
                    "decay {decay} warmup {warmup} step {step}: [{j}] off by {e:e} ({device:?})"
                );
            }
            assert_eq!(ema.named(&store)[0].0, "ema.w");
        }
    }
}

/// An EMA decay outside [0, 1) is refused, naming the option.
#[test]
fn ema_decay_outside_its_range_is_refused() {
    let mut store = ParamStore::new();
    store.add("w", randn(&[2], 1)).unwrap();
    for d in [1.0, -0.1, f32::NAN] {
        let e = Ema::new(d, false, &store).unwrap_err().to_string();
        assert!(e.contains("ema_decay") && e.contains("[0, 1)"), "{e}");
    }
}
