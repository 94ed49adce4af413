//! The tutorial's engine loop and the trainer's hooks: call order and effect.

use ferrovit::checkpoint::{self, Checkpoint, SaveOptions};
use ferrovit::data::{default_data_dir, Dataset, Loader, Sampler};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::optim::LrSchedule;
use ferrovit::signals::{StopFlag, StopReason};
use ferrovit::trainer::{
    AccuracyHook, Hook, LogMetricByEpochHook, Logger, LossHook, LrSchedulerHook,
    SaveCheckpointHook, State, StepOutput, Stopped, ThroughputHook, Trainer,
};
use ferrovit::{Device, Error, Result, Tensor, VitConfig};
use std::sync::{Arc, Mutex};

fn small() -> VitConfig {
    VitConfig {
        dim: 32,
        depth: 1,
        heads: 4,
        mlp_dim: 32,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    }
}

/// Loaders over the first `n` training and test images of the digits data.
fn loaders(n: usize, batch: usize) -> (Loader, Loader) {
    let (mut train, mut test) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    for ds in [&mut train, &mut test] {
        ds.labels.truncate(n);
        ds.images.truncate(n * 3 * 1024);
    }
    let train = Loader::new(Arc::new(train), Sampler::new(n, true, 3), batch).unwrap();
    let test = Loader::new(Arc::new(test), Sampler::new(n, false, 3), batch).unwrap();
    (train, test)
}

fn engine() -> Engine {
    Engine::new(
        &small(),
        TrainConfig {
            lr: 1e-3,
            ..TrainConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn the_tutorial_engine_loop_equals_train_step() {
    let (train, _) = loaders(96, 32);
    let mut a = engine();
    let mut b = engine();
    a.train();
    let mut losses = Vec::new();
    for batch in train.epoch(0) {
        let batch = batch.unwrap();
        a.zero_grad().unwrap();
        let output = a.forward(batch.images.clone(), &batch.samples).unwrap();
        assert_eq!(output.logits.dims(), &[batch.labels.len(), 10]);
        let loss = a.criterion(&output, &batch.labels).unwrap();
        a.backward(&loss).unwrap();
        a.step().unwrap();
        let s = b
            .train_step(batch.images, &batch.labels, &batch.samples)
            .unwrap();
        assert_eq!(loss.value, s.loss);
        losses.push(loss.value);
    }
    assert_eq!(losses.len(), 3);
    assert_eq!(a.step_count(), 3);
    for (p, q) in a.params().iter().zip(b.params().iter()) {
        assert_eq!(p.value.to_vec_f32(), q.value.to_vec_f32(), "{}", p.name);
    }
}

#[test]
fn engine_calls_out_of_order_are_errors_not_panics() {
    let mut e = engine();
    let x = Tensor::zeros([2, 3, 32, 32], Device::Cpu);
    let first = e.forward(x.clone(), &[0, 1]).unwrap();
    let _second = e.forward(x.clone(), &[0, 1]).unwrap();
    let err = e.criterion(&first, &[1, 2]).unwrap_err().to_string();
    assert!(err.contains("earlier forward pass"), "{err}");
    // eval mode: no dropout, so two forwards agree exactly
    e.eval();
    let a = e.forward(x.clone(), &[0, 1]).unwrap();
    let b = e.forward(x.clone(), &[5, 6]).unwrap();
    assert_eq!(a.logits.to_vec_f32(), b.logits.to_vec_f32());
    // a non-finite loss stops before the update, naming the step
    e.train();
    let nan = Tensor::full([2, 3, 32, 32], f32::NAN, Device::Cpu);
    let out = e.forward(nan, &[0, 1]).unwrap();
    let loss = e.criterion(&out, &[1, 2]).unwrap();
    match e.backward(&loss) {
        Err(Error::NonFinite { step: 0, .. }) => {}
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert_eq!(e.step_count(), 0);
}

/// Records every hook call as a string.
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
}

impl Hook for Recorder {
    fn before_train(&mut self, _: &mut State) -> Result<()> {
        self.push("before_train".into());
        Ok(())
    }
    fn after_train(&mut self, _: &mut State) -> Result<()> {
        self.push("after_train".into());
        Ok(())
    }
    fn before_epoch(&mut self, s: &mut State) -> Result<()> {
        self.push(format!("before_epoch {}", s.epoch));
        Ok(())
    }
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        self.push(format!("after_epoch {}", s.epoch));
        Ok(())
    }
    fn before_iter(&mut self, s: &mut State) -> Result<()> {
        self.push(format!("before_iter {}", s.iter));
        Ok(())
    }
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        self.push(format!(
            "after_iter {} lr {:e} loss {}",
            s.iter,
            s.engine.lr(),
            out.loss
        ));
        Ok(())
    }
    fn before_test(&mut self, _: &mut State) -> Result<()> {
        self.push("before_test".into());
        Ok(())
    }
    fn after_test_iter(&mut self, _: &mut State, out: &StepOutput) -> Result<()> {
        self.push(format!("after_test_iter {}", out.labels.len()));
        Ok(())
    }
    fn after_test(&mut self, _: &mut State) -> Result<()> {
        self.push("after_test".into());
        Ok(())
    }
}

#[test]
fn hooks_run_in_order_and_have_their_effect() {
    let (train, test) = loaders(64, 32);
    let log = Arc::new(Mutex::new(Vec::new()));
    let dir = std::env::temp_dir().join(format!("ferrovit-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jsonl = dir.join("m.jsonl");
    let mut t = Trainer::new(engine(), Logger::default());
    t.add_hook(LrSchedulerHook {
        schedule: LrSchedule::Step {
            step_size: 1,
            gamma: 0.5,
        },
        by_epoch: false,
    })
    .add_hook(Recorder(log.clone()))
    .add_hook(LossHook::default())
    .add_hook(AccuracyHook::default())
    .add_hook(ThroughputHook::default())
    .add_hook(LogMetricByEpochHook::with_jsonl(&jsonl, &[]).unwrap());
    t.fit(&train, 3, Some(&test), 2).unwrap();

    let calls = log.lock().unwrap().clone();
    let names: Vec<&str> = calls.iter().map(|c| c.split(' ').next().unwrap()).collect();
    let epoch = [
        "before_epoch",
        "before_iter",
        "after_iter",
        "before_iter",
        "after_iter",
    ];
    let test_calls = [
        "before_test",
        "after_test_iter",
        "after_test_iter",
        "after_test",
    ];
    let mut want = vec!["before_train"];
    want.extend(epoch);
    want.push("after_epoch"); // epoch 0: no test (interval 2)
    want.extend(epoch);
    want.extend(test_calls); // epoch 1: test
    want.push("after_epoch");
    want.extend(epoch);
    want.extend(test_calls); // epoch 2: the last, tested
    want.extend(["after_epoch", "after_train"]);
    assert_eq!(names, want);

    // LR scheduler by step: halves every update (base 1e-3)
    let lrs: Vec<f32> = calls
        .iter()
        .filter(|c| c.starts_with("after_iter"))
        .map(|c| c.split(' ').nth(3).unwrap().parse().unwrap())
        .collect();
    let expect: Vec<f32> = (0..6).map(|i| 1e-3 * 0.5f32.powi(i)).collect();
    assert_eq!(lrs, expect);

    // Loss hook: the epoch's train_loss is the mean of its two (equal-size) batches
    let step_losses: Vec<f64> = calls
        .iter()
        .filter(|c| c.starts_with("after_iter"))
        .map(|c| c.split(' ').nth(5).unwrap().parse().unwrap())
        .collect();
    let h = t.history();
    assert_eq!(h.len(), 3);
    for (e, m) in h.iter().enumerate() {
        let want = (step_losses[2 * e] + step_losses[2 * e + 1]) / 2.0;
        assert!((m["train_loss"] - want).abs() < 1e-6, "epoch {e}");
        assert_eq!(m["epoch"], (e + 1) as f64);
        assert!(m["images_per_s"] > 0.0 && (0.0..=1.0).contains(&m["train_acc"]));
    }
    assert!(!h[0].contains_key("test_loss"), "epoch 0 is not tested");
    assert!(h[1].contains_key("test_loss") && h[2].contains_key("test_acc"));

    // Accuracy hook: the confusion matrix of the last test agrees with test_acc
    let c = t.hook::<AccuracyHook>().unwrap().confusion.clone().unwrap();
    assert_eq!(c.total(), 64);
    assert_eq!(c.accuracy(), h[2]["test_acc"]);

    // LogMetricByEpoch: one JSON line per epoch
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["epoch"], 3);
    assert_eq!(lines[2]["test_acc"].as_f64().unwrap(), h[2]["test_acc"]);

    // Named timers
    assert_eq!(t.timers().count("train-step"), 6);
    assert_eq!(t.timers().count("test-step"), 4);
    assert_eq!(t.timers().count("train-epoch"), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A hook that fails on a chosen iteration.
struct FailAt(usize);

impl Hook for FailAt {
    fn after_iter(&mut self, s: &mut State, _: &StepOutput) -> Result<()> {
        if s.iter == self.0 {
            return Err(Error::Config("stop here".into()));
        }
        Ok(())
    }
}

#[test]
fn lr_by_epoch_and_hook_errors_stop_fit() {
    let (train, _) = loaders(64, 32);
    let mut t = Trainer::new(engine(), Logger::default());
    t.add_hook(LrSchedulerHook {
        schedule: LrSchedule::Step {
            step_size: 1,
            gamma: 0.1,
        },
        by_epoch: true,
    });
    t.fit(&train, 2, None, 1).unwrap();
    assert!(
        (t.engine.lr() - 1e-4).abs() < 1e-10,
        "epoch 1 uses base × 0.1"
    );
    assert_eq!(t.history()[1]["lr"], t.engine.lr() as f64);

    let mut t = Trainer::new(engine(), Logger::default());
    t.add_hook(FailAt(1));
    let err = t.fit(&train, 2, None, 1).unwrap_err().to_string();
    assert!(err.contains("stop here"));
    assert_eq!(t.engine.step_count(), 2, "stopped after the second step");
}

/// Requests a stop through the trainer's flag before training step `at`, and counts
/// the epochs that ended.
struct StopBefore {
    at: u64,
    flag: StopFlag,
    epochs_ended: usize,
}

impl Hook for StopBefore {
    fn before_iter(&mut self, s: &mut State) -> Result<()> {
        if s.engine.step_count() == self.at {
            self.flag.request();
        }
        Ok(())
    }
    fn after_epoch(&mut self, _: &mut State) -> Result<()> {
        self.epochs_ended += 1;
        Ok(())
    }
}

#[test]
fn a_stop_request_ends_fit_after_the_step_with_a_checkpoint_there() {
    let root = crate::common::temp_dir("stop-request");
    let (train, test) = loaders(96, 32); // 3 steps per epoch
    let mut t = Trainer::new(engine(), Logger::default());
    let flag = t.stop_flag();
    t.add_hook(StopBefore {
        at: 4, // epoch 1, batch 1
        flag,
        epochs_ended: 0,
    });
    t.add_hook(SaveCheckpointHook::new(
        &root,
        None,
        None,
        SaveOptions::default(),
    ));
    let stopped = t.fit(&train, 5, Some(&test), 1).unwrap();
    let dir = root.join(checkpoint::checkpoint_name(5));
    let want = Stopped {
        reason: StopReason::Requested,
        epoch: 1,
        batch: 2,
        step: 5,
        checkpoint: Some(dir.clone()),
    };
    assert_eq!(
        stopped,
        Some(want),
        "stopped after the step it was asked in"
    );
    assert_eq!(t.engine.step_count(), 5);
    assert_eq!(t.hook::<StopBefore>().unwrap().epochs_ended, 1);
    assert_eq!(t.history().len(), 1, "the partial epoch is not recorded");
    // saved (and committed) before fit returned, at a position a resume continues from
    let ck = Checkpoint::open(&dir).unwrap();
    ck.verify().unwrap();
    let tr = &ck.index.training;
    assert_eq!((tr.epoch, tr.batch, tr.step), (1, 2, 5));
    std::fs::remove_dir_all(root).unwrap();
}
