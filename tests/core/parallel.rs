//! Parallel training equals single-rank training: dp, pp (1F1B) and dp × pp steps give
//! the same losses and parameters as one rank on the same global batch (random data,
//! dropout on); and checkpoints saved under any layout resume under any other.
//!
//! Tolerances (relative to a tensor's largest value): layouts add the same terms in a
//! different order (micro-batch and replica gradients are summed, not computed in one
//! GEMM), so results agree to float rounding: 1e-4 after 4 SGD steps. Adam divides
//! each update by the gradient's own magnitude, so where a gradient element is near
//! zero its rounding decides the update's sign: 2e-3 for AdamW (4 steps, or the 46
//! steps of a whole two-epoch run).

use crate::common;

use crate::common::{max_rel_err, randn};
use ferrovit::checkpoint::{Checkpoint, Group};
use ferrovit::data::Batch;
use ferrovit::dist::{Layout, ProcessGroup, ThreadGroup};
use ferrovit::engine::{Engine, Parallel, TrainConfig};
use ferrovit::optim::OptimizerKind;
use ferrovit::recipe::{self, TrainOptions};
use ferrovit::rng::Rng;
use ferrovit::signals::StopReason;
use ferrovit::{Tensor, VitConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 16;
const STEPS: usize = 4;

fn model() -> VitConfig {
    VitConfig {
        dim: 32,
        depth: 3,
        heads: 4,
        mlp_dim: 64,
        dropout: 0.1,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    }
}

fn train_config(optimizer: OptimizerKind) -> TrainConfig {
    TrainConfig {
        seed: 5,
        lr: 0.01,
        label_smoothing: 0.1,
        clip_grad_norm: Some(1.0),
        optimizer,
        ..TrainConfig::default()
    }
}

/// Global batch `step`: random images and labels, sample ids unique per step.
fn global_batch(step: usize) -> (Tensor, Vec<usize>, Vec<u64>) {
    let images = randn(&[BATCH, 3, 32, 32], 100 + step as u64);
    let mut rng = Rng::new(200 + step as u64);
    let labels = (0..BATCH).map(|_| (rng.next_u64() % 10) as usize).collect();
    let samples = (0..BATCH).map(|i| (step * BATCH + i) as u64).collect();
    (images, labels, samples)
}

/// Replica `r`'s share of a global batch, as the loader cuts it.
fn share(step: usize, r: usize, replicas: usize) -> Batch {
    let (images, labels, samples) = global_batch(step);
    let rows = r * BATCH / replicas..(r + 1) * BATCH / replicas;
    let per = 3 * 32 * 32;
    let x = images.f32s().unwrap()[rows.start * per..rows.end * per].to_vec();
    Batch {
        images: Tensor::from_vec(x, [rows.len(), 3, 32, 32]).unwrap(),
        raw: None,
        labels: labels[rows.clone()].to_vec(),
        samples: samples[rows.clone()].to_vec(),
        global: BATCH,
        offset: rows.start,
        mix: None,
    }
}

type Params = BTreeMap<String, Vec<f32>>;

/// Trains `STEPS` steps under `dp × pp` (in-process ranks); returns the global loss per
/// step (the same on every rank) and every parameter (each from the rank holding it).
fn run(dp: usize, pp: usize, microbatches: usize, opt: OptimizerKind) -> (Vec<f32>, Params) {
    run_model(model(), dp, pp, microbatches, opt)
}

fn run_model(
    cfg: VitConfig,
    dp: usize,
    pp: usize,
    microbatches: usize,
    opt: OptimizerKind,
) -> (Vec<f32>, Params) {
    if dp * pp == 1 {
        let mut e = Engine::new(&cfg, train_config(opt)).unwrap();
        let losses = (0..STEPS)
            .map(|s| e.train_batch(share(s, 0, 1)).unwrap().loss)
            .collect();
        return (losses, params(&e));
    }
    let groups = ThreadGroup::new(dp * pp, Duration::from_secs(60)).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let layout = Layout::new(dp, pp, cfg.depth, None).unwrap();
                let (replica, _) = layout.coords(g.rank());
                let g: Arc<dyn ProcessGroup> = Arc::new(g);
                let par = Parallel::new(g, layout, microbatches, 1000).unwrap();
                let mut e = Engine::parallel(&cfg, train_config(opt), par).unwrap();
                let losses: Vec<f32> = (0..STEPS)
                    .map(|s| e.train_batch(share(s, replica, dp)).unwrap().loss)
                    .collect();
                (losses, params(&e))
            })
        })
        .collect();
    let results: Vec<(Vec<f32>, Params)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, (l, _)) in results.iter().enumerate() {
        assert_eq!(l, &results[0].0, "rank {r} reports the same global losses");
    }
    let mut all = Params::new();
    for (_, p) in &results {
        for (n, v) in p {
            if let Some(prev) = all.insert(n.clone(), v.clone()) {
                assert_eq!(&prev, v, "replicas of `{n}` agree exactly");
            }
        }
    }
    (results[0].0.clone(), all)
}

fn params(e: &Engine) -> Params {
    e.params()
        .named_parameters()
        .map(|(n, t)| (n.to_string(), t.to_vec_f32()))
        .collect()
}

/// The attention key bias has an analytically zero gradient (a shift of every score
/// of a query, which softmax ignores): its computed gradient is rounding noise, which
/// Adam normalises into full-size, layout-dependent updates of a tensor that affects
/// nothing. It is compared everywhere except under Adam.
fn without_key_bias(name: &str, v: &[f32]) -> Vec<f32> {
    if name.ends_with("attn.qkv.bias") {
        let d = v.len() / 3;
        [&v[..d], &v[2 * d..]].concat()
    } else {
        v.to_vec()
    }
}

fn assert_same(what: &str, a: &(Vec<f32>, Params), b: &(Vec<f32>, Params), adam: bool, tol: f64) {
    let (e, i) = max_rel_err(&a.0, &b.0);
    assert!(
        e < tol,
        "{what}: loss of step {i} differs by {e:e}: {:?} vs {:?}",
        a.0,
        b.0
    );
    assert_eq!(
        a.1.keys().collect::<Vec<_>>(),
        b.1.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (n, x) in &a.1 {
        let y = &b.1[n];
        let (x, y) = if adam {
            (without_key_bias(n, x), without_key_bias(n, y))
        } else {
            (x.clone(), y.clone())
        };
        let (e, i) = max_rel_err(&x, &y);
        assert!(e < tol, "{what}: `{n}`[{i}] differs by {e:e} relative");
    }
}

#[test]
fn every_layout_steps_like_one_rank_on_the_global_batch() {
    for (opt, adam, tol) in [
        (OptimizerKind::sgd(0.9, false), false, 1e-4),
        (OptimizerKind::adamw(), true, 2e-3),
    ] {
        let single = run(1, 1, 1, opt);
        assert!(single.0.iter().all(|l| l.is_finite()));
        assert_ne!(single.0[0], single.0[STEPS - 1], "training moves");
        for (dp, pp, m) in [(2, 1, 1), (1, 2, 4), (2, 2, 4), (1, 3, 3), (4, 1, 1)] {
            let what = format!("{opt:?}: dp={dp} pp={pp} with {m} micro-batches");
            assert_same(&what, &run(dp, pp, m, opt), &single, adam, tol);
        }
    }
}

/// Stochastic depth is keyed by sample and global block index: every layout (a stage
/// of one block each included) drops the same branches as one rank, and it changes
/// the training.
#[test]
fn drop_path_steps_alike_in_every_layout() {
    let opt = OptimizerKind::sgd(0.9, false);
    let cfg = VitConfig {
        drop_path: 0.5,
        ..model()
    };
    let single = run_model(cfg.clone(), 1, 1, 1, opt);
    let plain = run(1, 1, 1, opt);
    assert_ne!(single.0, plain.0, "drop-path changes the losses");
    for (dp, pp, m) in [(2, 1, 1), (1, 3, 3), (2, 3, 2)] {
        let what = format!("drop-path: dp={dp} pp={pp} with {m} micro-batches");
        assert_same(
            &what,
            &run_model(cfg.clone(), dp, pp, m, opt),
            &single,
            false,
            1e-4,
        );
    }
}

/// `--clip-grad` under dp × pp: the norm each rank clips by is the whole model's (the
/// replicas' summed gradients, the stages' sums of squares all-reduced over the
/// pipeline group), the same as one rank's up to rounding — and large enough here that
/// the clipping acts (the parameters then agree: `every_layout_steps_like_one_rank…`).
#[test]
fn clipping_uses_the_whole_models_gradient_norm_in_every_layout() {
    let norms = |dp: usize, pp: usize| -> Vec<Vec<f32>> {
        let groups = ThreadGroup::new(dp * pp, Duration::from_secs(60)).unwrap();
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let cfg = model();
                    let layout = Layout::new(dp, pp, cfg.depth, None).unwrap();
                    let (replica, _) = layout.coords(g.rank());
                    let par = Parallel::new(Arc::new(g), layout, 2, 1000).unwrap();
                    let config = train_config(OptimizerKind::sgd(0.9, false));
                    let mut e = Engine::parallel(&cfg, config, par).unwrap();
                    (0..STEPS)
                        .map(|s| {
                            e.train_batch(share(s, replica, dp)).unwrap();
                            e.grad_norm().unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let mut single = Engine::new(&model(), train_config(OptimizerKind::sgd(0.9, false))).unwrap();
    let want: Vec<f32> = (0..STEPS)
        .map(|s| {
            single.train_batch(share(s, 0, 1)).unwrap();
            single.grad_norm().unwrap()
        })
        .collect();
    assert!(
        want.iter().all(|&n| n > 1.0),
        "clipping acts at max norm 1: {want:?}"
    );
    for (dp, pp) in [(2, 1), (1, 2), (2, 2)] {
        for (rank, got) in norms(dp, pp).iter().enumerate() {
            let (e, i) = max_rel_err(got, &want);
            assert!(
                e < 1e-4,
                "dp {dp} pp {pp} rank {rank}: step {i}: {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn uneven_shares_and_micro_batches_are_weighted_exactly() {
    // 16 samples over 3 replicas (5/5/6) and 3 micro-batches per replica (1/2/2, …)
    let single = run(1, 1, 1, OptimizerKind::sgd(0.9, false));
    let odd = run(3, 2, 3, OptimizerKind::sgd(0.9, false));
    assert_same("dp=3 pp=2 m=3", &odd, &single, false, 1e-4);
}

#[test]
fn tutorial_calls_refuse_a_pipeline_stage() {
    let groups = ThreadGroup::new(2, Duration::from_secs(10)).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let cfg = model();
                let layout = Layout::new(1, 2, cfg.depth, None).unwrap();
                let par = Parallel::new(Arc::new(g), layout, 2, 1000).unwrap();
                let mut e = Engine::parallel(&cfg, TrainConfig::default(), par).unwrap();
                let b = share(0, 0, 1);
                e.forward(b.images, &b.samples).unwrap_err().to_string()
            })
        })
        .collect();
    for h in handles {
        let err = h.join().unwrap();
        assert!(err.contains("use train_batch"), "{err}");
    }
}

/// Ranks in threads, each with a flag of its own: only the last rank's is set (before
/// step 2). Every rank must learn it at step 2, from the step's shared metrics.
#[test]
fn a_stop_on_one_rank_stops_every_rank_at_the_same_step() {
    for (dp, pp) in [(2, 1), (1, 2)] {
        let cfg = model();
        let world = dp * pp;
        let groups = ThreadGroup::new(world, Duration::from_secs(60)).unwrap();
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let layout = Layout::new(dp, pp, cfg.depth, None).unwrap();
                    let (replica, _) = layout.coords(g.rank());
                    let last = g.rank() + 1 == layout.world;
                    let par = Parallel::new(Arc::new(g), layout, 2, 1000).unwrap();
                    let mut e =
                        Engine::parallel(&cfg, train_config(OptimizerKind::adamw()), par).unwrap();
                    for s in 0..STEPS {
                        if s == 2 && last {
                            e.stop_flag().set(StopReason::Signal(15));
                        }
                        let r = e.train_batch(share(s, replica, dp)).unwrap();
                        if let Some(reason) = r.stop {
                            return Some((s, reason));
                        }
                    }
                    None
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            assert_eq!(
                h.join().unwrap(),
                Some((2, StopReason::Signal(15))),
                "dp {dp} pp {pp}: rank {rank}"
            );
        }
    }
}

// ---- checkpoints across layouts --------------------------------------------------

const LAYOUTS: [(usize, usize); 5] = [(1, 1), (2, 1), (1, 2), (1, 3), (2, 2)];

fn options(out: &Path, (dp, pp): (usize, usize)) -> TrainOptions {
    TrainOptions {
        dim: Some(32),
        depth: Some(3),
        heads: Some(2),
        mlp_dim: Some(64),
        epochs: 2,
        batch_size: 64,
        seed: 7,
        workers: 1,
        out: out.to_path_buf(),
        keep_last: 0,
        dp,
        pp,
        comm_timeout: 60,
        ..TrainOptions::default()
    }
}

/// Every tensor (model and optimizer state) of the checkpoint at `step` under `out`.
fn tensors(out: &Path, step: u64) -> Params {
    let dir = out.join("checkpoints").join(format!("step-{step:010}"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut names: Vec<&str> = ckpt.names(Group::Model);
    names.extend(ckpt.names(Group::Optimizer));
    read_all(&ckpt, &names)
}

/// The named tensors of `ckpt`, by name.
fn read_all(ckpt: &Checkpoint, names: &[&str]) -> Params {
    names
        .iter()
        .map(|n| (n.to_string(), ckpt.read(n).unwrap().to_vec_f32()))
        .collect()
}

/// Train and test loss of each epoch, from metrics.jsonl.
fn losses(out: &Path) -> Vec<f32> {
    epoch_pairs(out, ["train_loss", "test_loss"])
}

/// The two metrics `keys` of each epoch, in turn, from metrics.jsonl.
fn epoch_pairs(out: &Path, keys: [&str; 2]) -> Vec<f32> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            keys.map(|k| v[k].as_f64().unwrap() as f32)
        })
        .collect()
}

fn name((dp, pp): (usize, usize)) -> String {
    format!("dp{dp}-pp{pp}")
}

#[test]
fn a_checkpoint_saved_under_any_layout_resumes_under_any_other() {
    let root = common::temp_dir("cross-layout");
    let steps_per_epoch = 1437u64.div_ceil(64);
    // uninterrupted runs under each saving layout (their epoch-1 checkpoints are the
    // starting points); the single-rank one is the reference
    let saves: Vec<(usize, usize)> = vec![(1, 1), (2, 1), (1, 2), (2, 2)];
    let mut reference: Option<(Vec<f32>, Params)> = None;
    for &s in &saves {
        let out = root.join(format!("save-{}", name(s)));
        recipe::train(&options(&out, s)).unwrap();
        let got = (losses(&out), tensors(&out, 2 * steps_per_epoch));
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_same(&format!("uninterrupted {}", name(s)), &got, r, true, 2e-3),
        }
        let index = Checkpoint::open(
            &out.join("checkpoints")
                .join(format!("step-{steps_per_epoch:010}")),
        )
        .unwrap()
        .index;
        assert_eq!(
            (index.layout.dp, index.layout.pp),
            s,
            "the index records the layout"
        );
    }
    let reference = reference.unwrap();
    for &s in &saves {
        let from: PathBuf = root
            .join(format!("save-{}", name(s)))
            .join("checkpoints")
            .join(format!("step-{steps_per_epoch:010}"));
        for &l in &LAYOUTS {
            let out = root.join(format!("resume-{}-as-{}", name(s), name(l)));
            let mut o = options(&out, l);
            o.resume = Some(recipe::Resume::Dir(from.to_path_buf()));
            // the layout, even at its defaults, is this run's (not the checkpoint's)
            let mut given = o.differing_from_default().unwrap();
            given.extend(["dp".into(), "pp".into()]);
            recipe::train_given(&o, &given).unwrap();
            let got = (losses(&out), tensors(&out, 2 * steps_per_epoch));
            // the resumed run's history holds epoch 1 from the checkpoint, epoch 2 its own
            assert_same(
                &format!("saved as {}, resumed as {}", name(s), name(l)),
                &got,
                &reference,
                true,
                2e-3,
            );
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn two_saves_of_one_step_under_a_layout_both_commit() {
    // a step save on the epoch's last batch, then the epoch save at the same step
    let out = common::temp_dir("double-save");
    let mut o = options(&out, (2, 2));
    o.epochs = 1;
    o.save_every_steps = Some(1437u64.div_ceil(64));
    recipe::train(&o).unwrap();
    let (ok, stdout, err) =
        common::ferrovit(&["ckpt", "verify", out.join("checkpoints").to_str().unwrap()]);
    assert!(ok && stdout.contains("ok:"), "{stdout}{err}");
    let listing = ferrovit::checkpoint::list(&out.join("checkpoints")).unwrap();
    assert_eq!(listing.committed.len(), 1);
    assert!(listing.uncommitted.is_empty(), "{:?}", listing.uncommitted);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_layouts_are_refused_before_any_work() {
    let out = common::temp_dir("bad-layout");
    for ((dp, pp), want) in [
        ((1, 4), "more pipeline stages than the model's 3 blocks"),
        ((0, 1), "must be at least 1"),
    ] {
        let err = recipe::train(&options(&out, (dp, pp)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "dp={dp} pp={pp}: {err}");
    }
    let mut o = options(&out, (1, 2));
    o.stages = Some(vec![3]);
    let err = recipe::train(&o).unwrap_err().to_string();
    assert!(err.contains("--stages [3]"), "{err}");
    assert!(
        !out.join("metrics.jsonl").exists(),
        "nothing was trained or written"
    );
    std::fs::remove_dir_all(out).unwrap();
}

/// The first epoch's `grad_norm` in metrics.jsonl.
fn grad_norm(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    first["grad_norm"].as_f64().unwrap()
}

/// `--accum-steps` (with `--clip-grad`): `--batch-size 16 --accum-steps 4` takes the optimizer steps of
/// `--batch-size 64` (its global batches, each cut into 4 micro-batches of 16 per
/// replica-share, their losses weighted by their share of the 64), so the parameters
/// and optimizer state after an epoch (23 AdamW steps) agree to rounding — on one rank,
/// under dp 2 and pp 2 — and a run resumed from a mid-epoch checkpoint agrees too.
#[test]
fn accumulated_micro_batches_step_like_the_larger_batch() {
    let root = common::temp_dir("accum");
    let steps = 1437u64.div_ceil(64);
    let run = |tag: &str, layout: (usize, usize), batch: usize, accum: usize| {
        let out = root.join(tag);
        let opts = TrainOptions {
            epochs: 1,
            batch_size: batch,
            accum_steps: accum,
            clip_grad: Some(1.0),
            save_every_steps: Some(10),
            ..options(&out, layout)
        };
        recipe::train(&opts).unwrap();
        (out, opts)
    };
    let (big, _) = run("big", (1, 1), 64, 1);
    let want = (losses(&big), tensors(&big, steps));
    for (tag, layout) in [
        ("accum", (1, 1)),
        ("accum-dp2", (2, 1)),
        ("accum-pp2", (1, 2)),
    ] {
        let (out, opts) = run(tag, layout, 16, 4);
        let got = (losses(&out), tensors(&out, steps));
        assert_same(tag, &got, &want, true, 2e-3);
        // clipped (the pre-clip norm's epoch mean is logged) by the same norm
        let (a, b) = (grad_norm(&out), grad_norm(&big));
        assert!(
            a > 1.0 && (a - b).abs() < 1e-4 * b,
            "{tag}: grad_norm {a} vs {b}"
        );
        if tag == "accum" {
            // resumed from step 10 (mid-epoch) into another directory
            let resumed = root.join("accum-resumed");
            let ckpt = out.join("checkpoints").join("step-0000000010");
            recipe::train(&TrainOptions {
                out: resumed.clone(),
                resume: Some(recipe::Resume::Dir(ckpt)),
                ..opts
            })
            .unwrap();
            let got = (losses(&resumed), tensors(&resumed, steps));
            assert_same("accum resumed", &got, &want, true, 2e-3);
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// Mixup/CutMix draw per global batch and mix each share with the reversed GLOBAL
/// batch, so a mixed run (both kinds, label smoothing folded in, the odd last batch)
/// trains alike under dp 2 and dp 2 × pp 2 as on one rank, and resumed mid-epoch under
/// dp 2 (the draws are keyed by the batch's index in the epoch) — and differently from
/// an unmixed run.
#[test]
fn mixed_runs_agree_across_layouts() {
    let root = common::temp_dir("mixup-layouts");
    let steps = 1437u64.div_ceil(64);
    let run = |layout: (usize, usize), mixed: bool| {
        let out = root.join(format!("{}-{mixed}", name(layout)));
        let (mixup, cutmix) = if mixed { (0.8, 1.0) } else { (0.0, 0.0) };
        let opts = TrainOptions {
            epochs: 1,
            mixup,
            cutmix,
            label_smoothing: 0.1,
            save_every_steps: Some(10),
            ..options(&out, layout)
        };
        recipe::train(&opts).unwrap();
        (losses(&out), tensors(&out, steps), opts)
    };
    let (l, t, opts) = run((1, 1), true);
    let want = (l, t);
    for layout in [(2, 1), (2, 2)] {
        let (l, t, _) = run(layout, true);
        assert_same(&name(layout), &(l, t), &want, true, 2e-3);
    }
    let resumed = root.join("resumed-dp2");
    let ckpt = opts.out.join("checkpoints").join("step-0000000010");
    recipe::train(&TrainOptions {
        out: resumed.clone(),
        resume: Some(recipe::Resume::Dir(ckpt)),
        dp: 2,
        ..opts
    })
    .unwrap();
    let got = (losses(&resumed), tensors(&resumed, steps));
    assert_same("resumed mid-epoch as dp2", &got, &want, true, 2e-3);
    let plain = run((1, 1), false);
    let plain = (plain.0, plain.1);
    let moved = |p: &Params| p["head.weight"].clone();
    let diff: f32 = moved(&plain.1)
        .iter()
        .zip(moved(&want.1))
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(
        diff > 1e-2,
        "mixing changes training: head differs by {diff}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// The EMA of every tensor of the checkpoint at `step` under `out`, with the weights.
fn ema_tensors(out: &Path, step: u64) -> Params {
    let dir = out.join("checkpoints").join(format!("step-{step:010}"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut names: Vec<&str> = ckpt.names(Group::Ema);
    assert_eq!(
        names.len(),
        ckpt.names(Group::Model).len(),
        "an EMA per weight"
    );
    names.extend(ckpt.names(Group::Model));
    read_all(&ckpt, &names)
}

/// `ema_test_loss` and `ema_test_acc` of each epoch, from metrics.jsonl.
fn ema_metrics(out: &Path) -> Vec<f32> {
    epoch_pairs(out, ["ema_test_loss", "ema_test_acc"])
}

/// `--ema-decay` (with warm-up): a run saved on one rank and resumed on one rank
/// continues bit-exactly, EMA included; resumed as a 2-stage pipeline (each stage
/// restores the EMA of its own blocks) it continues within the layouts' tolerance; and
/// `eval --weights ema` on the last checkpoint gives the logged `ema_test_acc`.
#[test]
fn ema_resumes_exactly_under_another_layout() {
    let root = common::temp_dir("ema-resume");
    let steps_per_epoch = 1437u64.div_ceil(64);
    let with_ema = |out: &Path, layout| TrainOptions {
        ema_decay: Some(0.9),
        ema_warmup: true,
        ..options(out, layout)
    };
    let full = root.join("full");
    recipe::train(&with_ema(&full, (1, 1))).unwrap();
    let reference = (ema_metrics(&full), ema_tensors(&full, 2 * steps_per_epoch));
    let raw = losses(&full);
    assert_ne!(
        reference.0[2], raw[3],
        "the EMA is tested apart from the weights"
    );
    let from = full
        .join("checkpoints")
        .join(format!("step-{steps_per_epoch:010}"));
    for layout in [(1, 1), (1, 2)] {
        let out = root.join(format!("resume-as-{}", name(layout)));
        let mut o = with_ema(&out, layout);
        o.resume = Some(recipe::Resume::Dir(from.clone()));
        let mut given = o.differing_from_default().unwrap();
        given.extend(["dp".into(), "pp".into()]);
        recipe::train_given(&o, &given).unwrap();
        let got = (ema_metrics(&out), ema_tensors(&out, 2 * steps_per_epoch));
        if layout == (1, 1) {
            assert_eq!(got, reference, "resumed on one rank: bit-exact");
        } else {
            assert_same("EMA resumed as pp 2", &got, &reference, true, 2e-3);
        }
    }
    let last = full.join("checkpoints").join("latest");
    let (ok, stdout, err) = common::ferrovit(&[
        "eval",
        "--ckpt",
        last.to_str().unwrap(),
        "--weights",
        "ema",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let logged = *ema_metrics(&full).last().unwrap();
    assert_eq!(
        v["accuracy"].as_f64().unwrap() as f32,
        logged,
        "eval --weights ema"
    );
    std::fs::remove_dir_all(root).unwrap();
}
