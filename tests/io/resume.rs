//! Resuming is exact: training straight through and training, saving, (crashing,)
//! then resuming give bit-identical losses and parameters — data order, augmentation,
//! dropout, LR schedule and optimizer state included.

use crate::common::{dir_snapshot, edit_index, ferrovit, temp_dir, TINY};
use ferrovit::checkpoint::{self, Checkpoint, LoadOptions, SaveOptions};
use ferrovit::data::{default_data_dir, Augment, Dataset, Loader, Sampler};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::optim::LrSchedule;
use ferrovit::trainer::{
    Hook, Logger, LossHook, LrSchedulerHook, SaveCheckpointHook, State, StepOutput, Trainer,
};
use ferrovit::{Result, VitConfig};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Records (step, loss) of every training step.
struct Losses(Arc<Mutex<Vec<(u64, f32)>>>);

impl Hook for Losses {
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push((s.engine.step_count(), out.loss));
        Ok(())
    }
}

fn trainer(root: &Path, losses: Arc<Mutex<Vec<(u64, f32)>>>) -> Trainer {
    let cfg = VitConfig {
        dim: 32,
        depth: 2,
        heads: 4,
        mlp_dim: 32,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    let engine = Engine::new(
        &cfg,
        TrainConfig {
            seed: 9,
            lr: 2e-3,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    let mut t = Trainer::new(engine, Logger::default());
    t.add_hook(LrSchedulerHook {
        schedule: LrSchedule::WarmupCosine {
            warmup: 3,
            total: 15,
            min_lr: 0.0,
        },
        by_epoch: false,
    })
    .add_hook(LossHook::default())
    .add_hook(Losses(losses))
    .add_hook(SaveCheckpointHook::new(
        root,
        Some(1),
        Some(2),
        SaveOptions::default(),
    ));
    t
}

fn loader() -> Loader {
    let (mut ds, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    ds.labels.truncate(160);
    ds.images.truncate(160 * 3072);
    let mut l = Loader::new(Arc::new(ds), Sampler::new(160, true, 9), 32).unwrap();
    l.augment = Augment::parse("crop,flip,autoaugment").unwrap();
    l
}

#[test]
fn resume_mid_epoch_is_bit_identical() {
    let root = temp_dir("resume-lib");
    let straight = Arc::new(Mutex::new(Vec::new()));
    let mut a = trainer(&root.join("a"), straight.clone());
    a.fit(&loader(), 3, None, 1).unwrap(); // 15 steps, saves every 2 steps and epoch
    let straight = straight.lock().unwrap().clone();
    assert_eq!(straight.len(), 15);

    // resume from step 6: epoch 1, batch 1 (a mid-epoch save)
    let dir = root.join("a").join(checkpoint::checkpoint_name(6));
    let resumed = Arc::new(Mutex::new(Vec::new()));
    let mut b = trainer(&root.join("b"), resumed.clone());
    let (state, report) = b
        .engine
        .load_checkpoint(&dir, LoadOptions::default())
        .unwrap();
    assert!(report.is_clean() && report.optimizer_loaded);
    assert_eq!((state.epoch, state.batch, state.step), (1, 1, 6));
    b.resume(&state);
    b.fit(&loader(), 3, None, 1).unwrap();
    let resumed = resumed.lock().unwrap().clone();
    assert_eq!(resumed, straight[6..], "per-step losses after the resume");
    let last = |t: &Trainer| t.engine.snapshot(Default::default()).tensors;
    for (x, y) in last(&a).iter().zip(last(&b)) {
        assert_eq!(x.bytes(), y.bytes(), "{}", x.name);
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// The CRC-32 of every tensor of the newest checkpoint under `root`.
fn final_state(root: &Path) -> Vec<(String, u32)> {
    let dir = checkpoint::newest(root).unwrap().unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    ck.verify().unwrap();
    ck.index
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.chunks[0].crc32))
        .collect()
}

fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["epoch"], v["train_loss"], v["test_loss"])
        })
        .collect()
}

const RUN: [&str; 16] = [
    "train",
    "--epochs",
    "3",
    "--dim",
    "32",
    "--depth",
    "1",
    "--mlp-dim",
    "32",
    "--threads",
    "2",
    "--augment",
    "crop,autoaugment",
    "--save-every-steps",
    "4",
    "--keep-last=2",
];

#[test]
fn killed_during_saves_the_newest_committed_checkpoint_resumes_exactly() {
    let root = temp_dir("crash");
    let straight = root.join("straight");
    let mut args = RUN.to_vec();
    args.extend(["--out", straight.to_str().unwrap()]);
    let (ok, _, err) = ferrovit(&args);
    assert!(ok, "{err}");
    let want_state = final_state(&straight.join("checkpoints"));
    let want_losses = losses(&straight);
    assert_eq!(want_losses.len(), 3);

    // Stop the 4th save (step 16, mid-epoch 0 of 23 steps) at these bytes, then SIGKILL:
    // at the start, in the shard header, in the tensor data, at the end of the shard,
    // in the index, and after the rename but before the `latest` pointer moves.
    let newest = checkpoint::newest(&straight.join("checkpoints"))
        .unwrap()
        .unwrap();
    let size = |f: &str| std::fs::metadata(newest.join(f)).unwrap().len();
    let shard = size("rank00000-00001-of-00001.safetensors");
    let index = size(checkpoint::INDEX);
    let points = [0, 60, 20_000, shard - 1, shard + index / 2, 10_000_000];
    for (i, byte) in points.into_iter().enumerate() {
        let out = root.join(format!("crash-{i}"));
        let mut args = RUN.to_vec();
        args.extend(["--out", out.to_str().unwrap()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
            .args(&args)
            .env("FERROVIT_FAULT_SAVE", "3")
            .env("FERROVIT_FAULT_STOP_AT_BYTE", byte.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut stopped = false;
        for line in stderr.lines() {
            if line.unwrap().starts_with("fault: stopped") {
                stopped = true;
                break;
            }
        }
        assert!(stopped, "byte {byte}: the fault point was never reached");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let ckpts = out.join("checkpoints");
        let newest = checkpoint::newest(&ckpts)
            .unwrap()
            .expect("a committed checkpoint");
        Checkpoint::open(&newest).unwrap().verify().unwrap();
        let (ok, out_v, err) = ferrovit(&["ckpt", "verify", newest.to_str().unwrap()]);
        assert!(ok && out_v.starts_with("ok:"), "{err}");

        let mut args = RUN.to_vec();
        args.extend(["--out", out.to_str().unwrap(), "--resume", "auto"]);
        let (ok, stdout, err) = ferrovit(&args);
        assert!(ok, "byte {byte}: {err}");
        assert!(stdout.contains("resuming from"), "{stdout}");
        assert_eq!(
            final_state(&ckpts),
            want_state,
            "byte {byte}: final parameters"
        );
        assert_eq!(
            losses(&out)[1..],
            want_losses[1..],
            "byte {byte}: epochs after the resume"
        );
        let (ok, listing, _) = ferrovit(&["ckpt", "list", ckpts.to_str().unwrap(), "--clean"]);
        assert!(ok);
        if byte < 10_000_000 {
            assert!(
                listing.contains("removed"),
                "the interrupted save is reported: {listing}"
            );
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// A two-block model with augmentation and a seed of its own: what a resume must keep.
const MODEL: [&str; 12] = [
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--mlp-dim",
    "32",
    "--augment",
    "crop,autoaugment",
    "--seed",
    "5",
];

/// Every per-epoch metric but the timings, from metrics.jsonl.
fn epoch_metrics(out: &Path) -> Vec<[f64; 4]> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["train_loss", "train_acc", "test_loss", "test_acc"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

/// `train` with `args`; fails the test unless it succeeds. Returns stdout.
fn train_ok(args: &[&str]) -> String {
    let (ok, stdout, err) = ferrovit(&[&["train"][..], args].concat());
    assert!(ok, "{args:?}: {err}");
    stdout
}

/// Leaves `out` as a two-epoch run of MODEL stopped after its first epoch: trained
/// through, then its epoch-2 checkpoint removed.
fn interrupted(out: &Path) {
    if !out.join("config.toml").exists() {
        let o = out.to_str().unwrap();
        train_ok(
            &[
                &["--epochs", "2", "--keep-last", "0", "--out", o][..],
                &MODEL[..],
            ]
            .concat(),
        );
    }
    let last = out
        .join("checkpoints")
        .join(checkpoint::checkpoint_name(46));
    std::fs::remove_dir_all(last).unwrap();
}

#[test]
fn a_resume_needs_no_flags_and_continues_exactly() {
    let root = temp_dir("no-flags");
    let dir = |n: &str| root.join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (a, b, d, e) = (dir("a"), dir("b"), dir("d"), dir("e"));
    train_ok(&[&["--epochs", "2", "--out", &s(&a)][..], &MODEL[..]].concat());
    let want = epoch_metrics(&a);
    assert_eq!(want.len(), 2);

    // the options come from the checkpoint: no flags but where the run is
    interrupted(&b);
    let stdout = train_ok(&["--out", &s(&b), "--resume", "auto"]);
    assert!(
        stdout.contains("resuming with the run's options from")
            && stdout.contains("step-0000000023"),
        "{stdout}"
    );
    assert_eq!(epoch_metrics(&b), want, "resumed without flags");

    // config.toml holds every option, defaults and the model's dimensions included
    let config = std::fs::read_to_string(b.join("config.toml")).unwrap();
    for line in [
        "dim = 32",
        "depth = 2",
        "heads = 2",
        "patch_size = 4",
        "seed = 5",
        "augment = \"crop,autoaugment\"",
        "# threads: unset: one per core, cores / local ranks under a launcher (this run: ",
        "# microbatches: unset: 2 × pp with a pipeline, else 1 (this run: 1)",
        "data = ",
        "epochs = 2",
        "# preset: unset",
        "# save_every_steps: unset",
    ] {
        assert!(config.contains(line), "{line}: {config}");
    }
    // ... so it continues the run, and repeats it
    let config = s(&b.join("config.toml"));
    interrupted(&b);
    train_ok(&["--config", &config, "--resume", "auto"]);
    assert_eq!(
        epoch_metrics(&b),
        want,
        "--config config.toml --resume auto"
    );
    train_ok(&["--config", &config, "--out", &s(&e)]);
    assert_eq!(epoch_metrics(&e), want, "--config config.toml alone");

    // under another layout: equal up to float rounding
    interrupted(&d);
    let stdout = train_ok(&[
        "--out",
        &s(&d),
        "--resume",
        "auto",
        "--dp",
        "2",
        "--pp",
        "2",
    ]);
    assert!(
        stdout.contains("dp 1 → 2") && stdout.contains("pp 1 → 2"),
        "{stdout}"
    );
    let got = epoch_metrics(&d);
    assert_eq!(got[0], want[0], "epoch 1 comes from the checkpoint");
    for loss in [0, 2] {
        let (x, y) = (got[1][loss], want[1][loss]);
        assert!(
            (x - y).abs() <= 2e-3 * y,
            "dp 2 × pp 2: {got:?} vs {want:?}"
        );
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_resume_refuses_options_that_contradict_the_checkpoint_and_writes_nothing() {
    let root = temp_dir("contradict");
    let out = root.join("run");
    let o = out.to_str().unwrap();
    interrupted(&out);
    let toml = root.join("more-dropout.toml");
    std::fs::write(&toml, "dropout = 0.2\nepochs = 3\n").unwrap();
    let toml = toml.to_str().unwrap();
    let before = dir_snapshot(&root);
    for (flags, want) in [
        (
            vec!["--dim", "64"],
            "--dim 64 contradicts the checkpoint's dim 32",
        ),
        (
            vec!["--depth", "1"],
            "--depth 1 contradicts the checkpoint's depth 2",
        ),
        (
            vec!["--seed", "3"],
            "--seed 3 contradicts the checkpoint's seed 5",
        ),
        (
            vec!["--lr", "0.01"],
            "--lr 0.01 contradicts the checkpoint's lr 0.002",
        ),
        (
            vec!["--batch-size", "32"],
            "--batch-size 32 contradicts the checkpoint's batch_size 64",
        ),
        (
            vec!["--augment", "flip"],
            "--augment flip contradicts the checkpoint's augment crop,autoaugment",
        ),
        (
            vec!["--preset", "vit_tiny_patch4_32"],
            "--preset vit_tiny_patch4_32 contradicts the checkpoint's preset (unset)",
        ),
        (
            vec!["--config", toml],
            "--dropout 0.2 contradicts the checkpoint's dropout 0.1",
        ),
        (
            vec!["--clip-grad", "1"],
            "--clip-grad 1.0 contradicts the checkpoint's clip_grad (unset)",
        ),
        (
            vec!["--accum-steps", "2"],
            "--accum-steps 2 contradicts the checkpoint's accum_steps 1",
        ),
        (
            vec!["--drop-path", "0.1"],
            "--drop-path 0.1 contradicts the checkpoint's drop_path 0.0",
        ),
        (
            vec!["--ema-decay", "0.99"],
            "--ema-decay 0.99 contradicts the checkpoint's ema_decay (unset)",
        ),
        (
            vec!["--min-lr", "0.0001"],
            "--min-lr 0.0001 contradicts the checkpoint's min_lr 0.0",
        ),
        (
            vec!["--warmup-lr", "0.0001"],
            "--warmup-lr 0.0001 contradicts the checkpoint's warmup_lr 0.0",
        ),
        (
            vec!["--mixup", "0.8"],
            "--mixup 0.8 contradicts the checkpoint's mixup 0.0",
        ),
        (
            vec!["--mixup-switch-prob", "0.3"],
            "--mixup-switch-prob 0.3 contradicts the checkpoint's mixup_switch_prob 0.5",
        ),
    ] {
        let args = [&["train", "--out", o, "--resume", "auto"][..], &flags[..]].concat();
        let (ok, stdout, err) = ferrovit(&args);
        assert!(!ok, "{flags:?} was taken: {stdout}");
        assert!(
            err.contains(want) && err.contains("step-0000000023") && err.lines().count() == 1,
            "{flags:?}: {err}"
        );
        assert!(
            dir_snapshot(&root) == before,
            "{flags:?} changed the directory"
        );
    }
    // a checkpoint that is not there
    let (ok, _, err) = ferrovit(&["train", "--out", o, "--resume", "/nonexistent/ckpt"]);
    assert!(!ok && err.contains("/nonexistent/ckpt"), "{err}");
    assert!(dir_snapshot(&root) == before);
    // values equal to the saved ones are fine, and --keep-best may change
    let flags = ["--out", o, "--resume", "auto", "--keep-best", "test_acc"];
    let stdout = train_ok(&[&flags[..], &MODEL[..]].concat());
    assert!(stdout.contains("epoch   2/2"), "{stdout}");
    // the best of both epochs, the one before the resume included (first among ties)
    let epochs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let acc = |k: usize| epochs[k]["test_acc"].as_f64().unwrap();
    let step = if acc(1) > acc(0) { 46 } else { 23 };
    let best = checkpoint::read_pointer(&out.join("checkpoints"), checkpoint::BEST);
    assert_eq!(best, Some(checkpoint::checkpoint_name(step)), "{epochs:?}");

    // an older checkpoint, without options: its run's config.toml, else the flags
    interrupted(&out);
    let ckpt = out
        .join("checkpoints")
        .join(checkpoint::checkpoint_name(23));
    edit_index(&ckpt, |v| {
        v["training"].as_object_mut().unwrap().remove("options");
    });
    let stdout = train_ok(&["--out", o, "--resume", "auto"]);
    assert!(stdout.contains("config.toml"), "{stdout}");
    interrupted(&out);
    std::fs::remove_file(out.join("config.toml")).unwrap();
    let (ok, stdout, err) = ferrovit(&["train", "--out", o, "--resume", "auto"]);
    assert!(stdout.contains("records no options"), "{stdout}");
    assert!(
        !ok && err.contains("resume with --seed 5"),
        "the default seed is not the checkpoint's: {err}"
    );
    // options that are not options are refused, naming the checkpoint
    edit_index(&ckpt, |v| {
        v["training"]["options"] = serde_json::json!({"dim": 32, "colour": "red"});
    });
    let (ok, _, err) = ferrovit(&["train", "--out", o, "--resume", "auto"]);
    assert!(
        !ok && err.contains("step-0000000023") && err.contains("colour"),
        "{err}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn init_fine_tunes_from_weights_with_a_new_head() {
    let root = temp_dir("init");
    let base = root.join("base");
    let tiny = [&TINY[..], &["--epochs", "1"]].concat();
    let (ok, _, err) = ferrovit(&[&["train", "--out", base.to_str().unwrap()], &tiny[..]].concat());
    assert!(ok, "{err}");
    let ckpt = checkpoint::newest(&base.join("checkpoints"))
        .unwrap()
        .unwrap();
    // a 2-class image folder: the head's shape differs, everything else loads
    let data = root.join("pets");
    for split in ["train", "test"] {
        for (c, name) in ["cat", "dog"].iter().enumerate() {
            let d = data.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for k in 0..4u8 {
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    image::Rgb([x as u8 * 8, y as u8 * 8, 100 * c as u8 + k])
                });
                img.save(d.join(format!("{k}.png"))).unwrap();
            }
        }
    }
    let out = root.join("fine");
    let (ok, stdout, err) = ferrovit(
        &[
            &[
                "train",
                "--data",
                data.to_str().unwrap(),
                "--init",
                ckpt.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &tiny[..],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(
        stdout.contains("initialised from")
            && stdout.contains("loaded 18 tensors")
            && stdout.contains("`head.weight` shape [10, 32] in the checkpoint vs [2, 32]"),
        "{stdout}"
    );
    let (ok, _, err) = ferrovit(&[
        "train",
        "--init",
        "/nonexistent/ckpt",
        "--out",
        root.join("none").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("/nonexistent/ckpt"), "{err}");
    // with --resume auto, --init applies only when there is nothing to resume
    let args = ["--init", ckpt.to_str().unwrap(), "--resume", "auto"];
    let (ok, stdout, err) =
        ferrovit(&[&["train", "--out", out.to_str().unwrap()][..], &args].concat());
    assert!(
        ok && stdout.contains("--init") && stdout.contains("is not used"),
        "{stdout}{err}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// A checkpoint saved before `LrSchedule::Cosine` (its schedule the older
/// `WarmupCosine`) resumes with its own schedule, so its run continues as it began;
/// a new run's checkpoint records timm's `Cosine` with its rates.
#[test]
fn a_resume_keeps_an_older_checkpoints_schedule() {
    let root = temp_dir("old-schedule");
    let out = root.join("run");
    let o = out.to_str().unwrap();
    interrupted(&out);
    let ckpt = out
        .join("checkpoints")
        .join(checkpoint::checkpoint_name(23));
    let saved = Checkpoint::open(&ckpt).unwrap().index.training.schedule;
    let timm = LrSchedule::Cosine {
        warmup: 23,
        total: 46,
        min_lr: 0.0,
        warmup_lr: 0.0,
    };
    assert_eq!(saved, Some(timm));
    let last_lr = |out: &Path| {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        v["lr"].as_f64().unwrap() as f32
    };
    train_ok(&["--out", o, "--resume", "auto"]);
    assert_eq!(last_lr(&out), timm.lr(2e-3, 45));
    let old = LrSchedule::WarmupCosine {
        warmup: 23,
        total: 46,
        min_lr: 0.0,
    };
    interrupted(&out);
    edit_index(&ckpt, |v| {
        v["training"]["schedule"] =
            serde_json::json!({"WarmupCosine": {"warmup": 23, "total": 46, "min_lr": 0.0}});
    });
    train_ok(&["--out", o, "--resume", "auto"]);
    assert_ne!(old.lr(2e-3, 45), timm.lr(2e-3, 45));
    assert_eq!(last_lr(&out), old.lr(2e-3, 45));
    std::fs::remove_dir_all(root).unwrap();
}
