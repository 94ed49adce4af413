//! Checkpoints: round trips, strict and non-strict loads, retention, the `latest`
//! pointer, and every kind of corruption refused with an error naming the file and
//! tensor — including random corruptions driven through the parser.

use crate::common::{copy_checkpoint, edit_index, temp_dir, write_index};
use ferrovit::checkpoint::{
    self, export_safetensors, import_safetensors, list, read_safetensors, AsyncSaver, BestBy,
    Checkpoint, ImportOptions, LoadOptions, SaveOptions, TrainingState, BEST, INDEX,
};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::rng::Rng;
use ferrovit::{Device, Tensor, VitConfig};
use std::path::{Path, PathBuf};

fn small(classes: usize) -> VitConfig {
    VitConfig {
        dim: 32,
        depth: 2,
        heads: 4,
        mlp_dim: 64,
        num_classes: classes,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    }
}

/// An engine after a few training steps on random data (non-trivial optimizer state).
fn trained(seed: u64) -> Engine {
    let mut e = Engine::new(
        &small(10),
        TrainConfig {
            seed,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    let mut rng = Rng::new(seed);
    for _ in 0..3 {
        let x = Tensor::from_vec(rng.vec(4 * 3 * 32 * 32, |r| r.normal()), [4, 3, 32, 32]).unwrap();
        e.train_step(x, &[1, 2, 3, 4], &[0, 1, 2, 3]).unwrap();
    }
    e
}

/// Every model and optimizer tensor of an engine, by name.
fn state(e: &Engine) -> Vec<(String, Vec<f32>)> {
    let s = e.snapshot(TrainingState::default());
    s.tensors
        .iter()
        .map(|t| (t.name.clone(), t.tensor.to_vec_f32()))
        .collect()
}

/// Saves `e` under a fresh root with small shards; returns (root, checkpoint dir).
fn saved(e: &Engine, name: &str) -> (PathBuf, PathBuf) {
    let root = temp_dir(name);
    let opts = SaveOptions {
        shard_bytes: 40_000,
        keep_last: None,
        keep_best: None,
    };
    let training = TrainingState {
        epoch: 2,
        batch: 5,
        ..TrainingState::default()
    };
    let dir = e.save_checkpoint(&root, training, &opts).unwrap();
    (root, dir)
}

fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_restores_weights_optimizer_and_training_state() {
    let e = trained(1);
    let (root, dir) = saved(&e, "roundtrip");
    assert!(shards(&dir).len() > 2, "small shard size → several shards");
    let ck = Checkpoint::open(&dir).unwrap();
    let report = ck.verify().unwrap();
    assert_eq!(report.tensors, ck.index.tensors.len());
    // every shard is a valid safetensors file for the reference implementation
    for f in shards(&dir) {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(!st.names().is_empty());
    }
    let mut fresh = Engine::new(
        &small(10),
        TrainConfig {
            seed: 1,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    assert_ne!(state(&fresh), state(&e));
    let (training, report) = fresh.load_checkpoint(&dir, LoadOptions::default()).unwrap();
    assert!(report.is_clean() && report.optimizer_loaded, "{report}");
    assert_eq!(state(&fresh), state(&e));
    assert_eq!((training.epoch, training.batch, training.step), (2, 5, 3));
    assert_eq!(fresh.step_count(), 3);
    assert_eq!(fresh.optimizer.steps(), e.optimizer.steps());
    // zero-copy views equal the parameters
    let p = e.params().iter().next().unwrap();
    assert_eq!(
        ck.view_f32(&p.name).unwrap(),
        p.value.to_vec_f32().as_slice()
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_subset_loads_without_touching_other_shards() {
    let e = trained(2);
    let (root, dir) = saved(&e, "subset");
    let ck = Checkpoint::open(&dir).unwrap();
    let name = "head.weight";
    let file = ck.index.tensors[name].chunks[0].file.clone();
    for f in shards(&dir) {
        if f.file_name().unwrap().to_str().unwrap() != file {
            std::fs::remove_file(f).unwrap();
        }
    }
    let want = e
        .params()
        .iter()
        .find(|p| p.name == name)
        .unwrap()
        .value
        .to_vec_f32();
    assert_eq!(ck.read(name).unwrap().to_vec_f32(), want);
    let err = ck.verify().unwrap_err().to_string();
    assert!(err.contains(".safetensors"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn strict_refuses_a_different_head_and_non_strict_reports_it() {
    let e = trained(3);
    let (root, dir) = saved(&e, "strict");
    let mut other = Engine::new(&small(7), TrainConfig::default()).unwrap();
    let err = other
        .load_checkpoint(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`head.weight` has shape [10, 32] in the checkpoint but [7, 32]"),
        "{err}"
    );
    let before = state(&other);
    let (_, report) = other
        .load_checkpoint(
            &dir,
            LoadOptions {
                strict: false,
                optimizer: false,
            },
        )
        .unwrap();
    assert_eq!(report.mismatched.len(), 2, "{report}");
    assert!(!report.optimizer_loaded);
    let after = state(&other);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        if n.starts_with("head.") || n.starts_with("exp_avg") {
            assert_eq!(a, b, "{n} kept");
        } else {
            assert_ne!(a, b, "{n} loaded");
        }
    }
    // a deeper model: missing blocks are reported; strict names the first
    let mut deeper = Engine::new(
        &VitConfig {
            depth: 3,
            ..small(10)
        },
        TrainConfig::default(),
    )
    .unwrap();
    let err = deeper
        .load_checkpoint(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`blocks.2.") && err.contains("missing"),
        "{err}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn retention_latest_pointer_and_uncommitted_directories() {
    let mut e = trained(4);
    let root = temp_dir("retention");
    let opts = SaveOptions {
        keep_last: Some(2),
        ..SaveOptions::default()
    };
    let mut saver = AsyncSaver::default();
    for step in 10..15 {
        e.set_step(step);
        let snap = e.snapshot(TrainingState::default());
        saver
            .save(
                snap,
                root.clone(),
                checkpoint::checkpoint_name(step),
                opts.clone(),
            )
            .unwrap();
    }
    let last = saver.wait().unwrap().unwrap();
    assert!(last.ends_with("step-0000000014"));
    // an interrupted save and a directory without an index
    std::fs::create_dir_all(root.join(".tmp-step-0000000099-1")).unwrap();
    std::fs::write(root.join(".tmp-step-0000000099-1").join(INDEX), "{").unwrap();
    std::fs::create_dir_all(root.join("step-0000000098")).unwrap();
    let l = list(&root).unwrap();
    let names: Vec<String> = l
        .committed
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(names, ["step-0000000013", "step-0000000014"]);
    assert_eq!(l.uncommitted.len(), 2);
    assert_eq!(
        checkpoint::read_latest(&root).as_deref(),
        Some("step-0000000014")
    );
    assert_eq!(checkpoint::newest(&root).unwrap().unwrap(), last);
    let err = Checkpoint::open(&root.join("step-0000000098"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a committed checkpoint"), "{err}");
    // a stale pointer falls back to the newest committed
    checkpoint::set_latest(&root, "step-0000000098").unwrap();
    assert_eq!(checkpoint::newest(&root).unwrap().unwrap(), last);
    // an error in the background writer surfaces at the next call
    let blocked = root.join("a-file");
    std::fs::write(&blocked, "not a directory").unwrap();
    let snap = e.snapshot(TrainingState::default());
    saver
        .save(snap, blocked.clone(), "step-1".into(), opts.clone())
        .unwrap();
    let err = saver.wait().unwrap_err().to_string();
    assert!(err.contains("a-file"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

/// `--keep-best`: retention keeps the newest N and the checkpoint of the best epoch by
/// the metric in the (newest) history — only epochs with a test result and a saved end
/// count — and the `best` pointer names it; a later better epoch moves the pointer and
/// frees the old best.
#[test]
fn retention_keeps_the_best_checkpoint_and_points_at_it() {
    let mut e = trained(6);
    for (by, best_step) in [
        (BestBy::max("test_acc"), 20),
        (BestBy::min("test_loss"), 30),
    ] {
        let root = temp_dir("keep-best");
        let opts = SaveOptions {
            keep_last: Some(1),
            keep_best: Some(by.clone()),
            ..SaveOptions::default()
        };
        // epochs end at steps 10..=60; epoch 4 (step 40) had no test; step 50 was not
        // saved at its epoch's end; test_acc peaks at step 20, test_loss bottoms at 30
        let acc = [0.5, 0.9, 0.8, 0.99, 0.95, 0.7];
        let loss = [2.0, 1.0, 0.5, 0.1, 0.05, 0.9];
        let mut history = Vec::new();
        for (k, step) in (10u64..=60).step_by(10).enumerate() {
            let mut m = std::collections::BTreeMap::from([("step".to_string(), step as f64)]);
            if step != 40 {
                m.insert("test_acc".into(), acc[k]);
                m.insert("test_loss".into(), loss[k]);
            }
            history.push(m);
            if step == 50 {
                continue;
            }
            e.set_step(step);
            let training = TrainingState {
                history: history.clone(),
                ..TrainingState::default()
            };
            checkpoint::save(
                &e.snapshot(training),
                &root,
                &checkpoint::checkpoint_name(step),
                &opts,
            )
            .unwrap();
        }
        let names: Vec<String> = list(&root)
            .unwrap()
            .committed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        let best = checkpoint::checkpoint_name(best_step);
        assert_eq!(names, [best.clone(), "step-0000000060".into()], "{by:?}");
        assert_eq!(
            checkpoint::read_pointer(&root, BEST),
            Some(best.clone()),
            "{by:?}"
        );
        // the CLI takes the pointer for a checkpoint and lists it
        let (ok, out, err) = crate::common::ferrovit(&["ckpt", "list", root.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("{best}  (best)")), "{out}");
        assert!(out.contains("step-0000000060  (latest)"), "{out}");
        let best_file = root.join(BEST);
        let (ok, out, err) =
            crate::common::ferrovit(&["ckpt", "inspect", best_file.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(out.contains(&format!("step {best_step}")), "{out}");
        std::fs::remove_dir_all(root).unwrap();
    }
}

#[test]
fn export_writes_one_safetensors_file_that_reads_back() {
    let e = trained(5);
    let (root, dir) = saved(&e, "export");
    let out = root.join("model.safetensors");
    let n = export_safetensors(&dir, &out).unwrap();
    assert_eq!(n, e.params().len());
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), n);
    let back = read_safetensors(&out, &[("blocks.".into(), "layers.".into())]).unwrap();
    assert!(back.iter().any(|(n, _)| n == "layers.0.attn.qkv.weight"));
    let (_, t) = back.iter().find(|(n, _)| n == "head.weight").unwrap();
    let want = e
        .params()
        .iter()
        .find(|p| p.name == "head.weight")
        .unwrap()
        .value
        .to_vec_f32();
    assert_eq!(t.to_vec_f32(), want);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn import_makes_a_weights_only_checkpoint_of_an_exported_file() {
    let preset = "vit_lite_depth7_patch4_32";
    let cfg = VitConfig {
        num_classes: 3,
        ..VitConfig::preset(preset).unwrap()
    };
    let seeded = |seed| {
        let train = TrainConfig {
            seed,
            ..TrainConfig::default()
        };
        Engine::new(&cfg, train).unwrap()
    };
    let e = seeded(7);
    let (root, dir) = saved(&e, "import");
    let file = root.join("model.safetensors");
    export_safetensors(&dir, &file).unwrap();

    let out = root.join("imported");
    let opts = |num_classes, map: &[(String, String)]| ImportOptions {
        preset: Some(preset.into()),
        num_classes: Some(num_classes),
        map: map.to_vec(),
        ..Default::default()
    };
    let done = import_safetensors(&file, &out, &opts(3, &[])).unwrap();
    let dest = done.dest;
    assert_eq!(done.tensors, e.params().len());
    assert!(!done.fresh_head);
    assert_eq!(dest, out.join("step-0000000000"));
    let ck = Checkpoint::open(&dest).unwrap();
    assert!(ck.index.optimizer.is_none(), "weights only");
    let weights = |e: &Engine| -> Vec<(String, Vec<f32>)> {
        let named = e.params().named_parameters();
        named
            .map(|(n, t)| (n.to_string(), t.to_vec_f32()))
            .collect()
    };
    let mut other = seeded(8);
    assert_ne!(weights(&other), weights(&e));
    let weights_only = LoadOptions {
        strict: true,
        optimizer: false,
    };
    other.load_checkpoint(&dest, weights_only).unwrap();
    assert_eq!(weights(&other), weights(&e));

    // names the model lacks are refused; a head of another size is a fresh one
    let renamed = [("blocks.".to_string(), "layers.".to_string())];
    let err = import_safetensors(&file, &root.join("renamed"), &opts(3, &renamed))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--map") && err.contains("`layers.0."), "{err}");
    // a root that holds checkpoints is not imported into (its step-0000000000 and
    // `latest` would be replaced)
    let err = import_safetensors(&file, &out, &opts(3, &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");
    assert_eq!(weights(&other), weights(&e));
    let out10 = root.join("imported10");
    let done = import_safetensors(&file, &out10, &opts(10, &[])).unwrap();
    assert!(done.fresh_head && done.model.num_classes == 10);
    let ck = Checkpoint::open(&done.dest).unwrap();
    assert_eq!(ck.index.tensors["head.weight"].shape, [10, cfg.dim]);
    for (n, t) in e
        .params()
        .named_parameters()
        .filter(|(n, _)| !n.starts_with("head."))
    {
        assert_eq!(ck.read(n).unwrap().to_vec_f32(), t.to_vec_f32(), "{n}");
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// Weights with a NaN are refused wherever they would be computed with — a training
/// load, an inference load, an import — naming the tensor and the element; an export
/// copies what it finds.
#[test]
fn weights_that_are_not_finite_are_refused() {
    let mut e = Engine::new(&small(10), TrainConfig::default()).unwrap();
    let head = e.params().iter().find(|p| p.name == "head.weight").unwrap();
    let mut values = head.value.to_vec_f32();
    values[17] = f32::NAN;
    let nan = Tensor::from_vec(values, head.value.dims()).unwrap();
    e.params_mut().set("head.weight", nan).unwrap();
    let (root, dir) = saved(&e, "not-finite");
    let says = "`head.weight` element 17 is NaN";
    let mut fresh = Engine::new(&small(10), TrainConfig::default()).unwrap();
    let err = fresh
        .load_checkpoint(&dir, LoadOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains(says), "{err}");
    let Err(err) = ferrovit::infer::Classifier::load(&dir) else {
        panic!("NaN weights loaded for inference");
    };
    assert!(err.to_string().contains(says), "{err}");
    let file = root.join("nan.safetensors");
    export_safetensors(&dir, &file).unwrap();
    let opts = ImportOptions {
        heads: Some(4),
        ..Default::default()
    };
    let err = import_safetensors(&file, &root.join("imported"), &opts).unwrap_err();
    assert!(err.to_string().contains(says), "{err}");
    assert!(!root.join("imported").exists());
    std::fs::remove_dir_all(root).unwrap();
}

/// Loads a checkpoint into a fresh engine: the error text, or the loaded state.
fn try_load(dir: &Path) -> Result<Vec<(String, Vec<f32>)>, String> {
    let mut e = Engine::new(&small(10), TrainConfig::default()).unwrap();
    let ck = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    ck.verify().map_err(|e| e.to_string())?;
    e.load_checkpoint(dir, LoadOptions::default())
        .map_err(|e| e.to_string())?;
    Ok(state(&e))
}

#[test]
fn every_corruption_gives_a_precise_error() {
    let e = trained(6);
    let (root, clean) = saved(&e, "corrupt");
    let copy = |name: &str| copy_checkpoint(&clean, &root.join(name));
    let ck = Checkpoint::open(&clean).unwrap();
    let qkv = &ck.index.tensors["blocks.0.attn.qkv.weight"].chunks[0];
    let (qkv_file, qkv_mid) = (qkv.file.clone(), (qkv.start + qkv.end) / 2);
    let mut cases: Vec<(PathBuf, Vec<&str>)> = Vec::new();

    let d = copy("flip");
    let mut b = std::fs::read(d.join(&qkv_file)).unwrap();
    b[qkv_mid as usize] ^= 0x10;
    std::fs::write(d.join(&qkv_file), b).unwrap();
    cases.push((
        d,
        vec![&qkv_file, "`blocks.0.attn.qkv.weight`", "checksum mismatch"],
    ));

    let d = copy("truncate");
    let b = std::fs::read(d.join(&qkv_file)).unwrap();
    std::fs::write(d.join(&qkv_file), &b[..b.len() - 7]).unwrap();
    cases.push((d, vec![&qkv_file, "truncated"]));

    let d = copy("delete");
    std::fs::remove_file(d.join(&qkv_file)).unwrap();
    cases.push((d, vec![&qkv_file, "No such file"]));

    let d = copy("past-end");
    edit_index(&d, |v| {
        let c = &mut v["tensors"]["head.bias"]["chunks"][0];
        c["start"] = (1u64 << 40).into();
        c["end"] = ((1u64 << 40) + 40).into();
    });
    cases.push((
        d,
        vec![
            "`head.bias`",
            "index says bytes 1099511627776..1099511627816",
        ],
    ));

    let d = copy("overlap");
    edit_index(&d, |v| {
        let chunks = v["tensors"]["head.bias"]["chunks"].as_array_mut().unwrap();
        let c = chunks[0].clone();
        chunks.push(c);
    });
    cases.push((d, vec![INDEX, "`head.bias`", "overlap"]));

    let d = copy("dtype");
    edit_index(&d, |v| v["tensors"]["head.bias"]["dtype"] = "F16".into());
    cases.push((d, vec![INDEX, "`head.bias`", "lies outside"]));

    let d = copy("escape");
    edit_index(&d, |v| {
        v["tensors"]["head.bias"]["chunks"][0]["file"] = "../x".into()
    });
    cases.push((
        d,
        vec![INDEX, "`head.bias`", "`../x` is not a plain file name"],
    ));

    let d = copy("header");
    let mut b = std::fs::read(d.join(&qkv_file)).unwrap();
    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(d.join(&qkv_file), b).unwrap();
    cases.push((d, vec![&qkv_file, "header length", "exceeds"]));

    let d = copy("version");
    edit_index(&d, |v| v["version"] = 99.into());
    cases.push((d, vec![INDEX, "version Some(99) is not supported"]));

    for (dir, wants) in cases {
        let err = try_load(&dir).expect_err(&format!("{} must be refused", dir.display()));
        for w in wants {
            assert!(err.contains(w), "{}: `{w}` not in: {err}", dir.display());
        }
    }
    assert_eq!(try_load(&clean).unwrap(), state(&e));
    std::fs::remove_dir_all(root).unwrap();
}

/// A flipped bit anywhere in a tensor's bytes (its first, either side of a 64-byte
/// line, past a 1 MiB parallel task, its last) is refused by `read` and `read_into`
/// alike, naming the file, the tensor and its bytes.
#[test]
fn a_flip_anywhere_in_a_tensor_is_refused_by_every_read() {
    let cfg = VitConfig {
        dim: 256,
        depth: 1,
        mlp_dim: 1280,
        ..small(10)
    };
    let e = Engine::new(&cfg, TrainConfig::default()).unwrap();
    let (root, clean) = saved(&e, "flip-anywhere");
    let name = "blocks.0.mlp.fc1.weight";
    let ck = Checkpoint::open(&clean).unwrap();
    let c = ck.index.tensors[name].chunks[0].clone();
    assert!(
        c.end - c.start > 1 << 20,
        "the tensor spans two parallel tasks"
    );
    let want = ck.read(name).unwrap().to_vec_f32();
    let mut into = Tensor::zeros(ck.index.tensors[name].shape.as_slice(), Device::Cpu);
    ck.read_into(name, &mut into).unwrap();
    assert_eq!(into.to_vec_f32(), want);
    let file = clean.join(&c.file);
    let original = std::fs::read(&file).unwrap();
    let bytes = format!("bytes {}..{}", c.start, c.end);
    let wants = [
        c.file.as_str(),
        "`blocks.0.mlp.fc1.weight`",
        "checksum mismatch",
        &bytes,
    ];
    for at in [
        c.start,
        c.start + 63,
        c.start + 64,
        c.start + (1 << 20) + 1,
        c.end - 1,
    ] {
        let mut b = original.clone();
        b[at as usize] ^= 0x04;
        std::fs::write(&file, &b).unwrap();
        let ck = Checkpoint::open(&clean).unwrap();
        for err in [ck.read(name).map(drop), ck.read_into(name, &mut into)] {
            let err = err.expect_err("a flipped bit must be refused").to_string();
            for w in wants {
                assert!(err.contains(w), "flip at {at}: `{w}` not in: {err}");
            }
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn random_corruptions_never_panic_and_never_load_wrong_values() {
    let e = trained(7);
    let (root, clean) = saved(&e, "fuzz");
    let want = state(&e);
    let files: Vec<PathBuf> = std::fs::read_dir(&clean)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut rng = Rng::new(42);
    let (mut refused, mut harmless) = (0, 0);
    for round in 0..300 {
        let k = (rng.next_u64() % files.len() as u64) as usize;
        let mut b = originals[k].clone();
        match round % 4 {
            // flip one byte anywhere
            0 | 1 => {
                let i = (rng.next_u64() % b.len() as u64) as usize;
                b[i] ^= 1 << (rng.next_u64() % 8);
            }
            // truncate anywhere
            2 => b.truncate((rng.next_u64() % b.len() as u64) as usize),
            // overwrite a run with garbage
            _ => {
                let i = (rng.next_u64() % b.len() as u64) as usize;
                for x in b.iter_mut().skip(i).take(16) {
                    *x = rng.next_u64() as u8;
                }
            }
        }
        std::fs::write(&files[k], &b).unwrap();
        match try_load(&clean) {
            Err(_) => refused += 1,
            // a change that loads must not have changed anything loaded
            // (JSON whitespace, header padding, an unused metadata byte)
            Ok(got) => {
                assert_eq!(got, want, "round {round}: corrupted values loaded");
                harmless += 1;
            }
        }
        std::fs::write(&files[k], &originals[k]).unwrap();
    }
    assert!(refused > 200, "refused {refused}, harmless {harmless}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_snapshot_keeps_its_values_while_training_goes_on() {
    let mut e = trained(9);
    let snap = e.snapshot(TrainingState::default());
    let before: Vec<Vec<f32>> = snap.tensors.iter().map(|t| t.tensor.to_vec_f32()).collect();
    let x = Tensor::from_vec(
        Rng::new(1).vec(4 * 3 * 32 * 32, |r| r.normal()),
        [4, 3, 32, 32],
    )
    .unwrap();
    e.train_step(x, &[1, 2, 3, 4], &[0, 1, 2, 3]).unwrap();
    let after: Vec<Vec<f32>> = snap.tensors.iter().map(|t| t.tensor.to_vec_f32()).collect();
    assert_eq!(before, after, "the snapshot is unchanged by the update");
    assert_ne!(
        state(&e).into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        before,
        "the engine moved on"
    );
}

#[test]
fn tensors_of_other_dtypes_round_trip() {
    let root = temp_dir("dtypes");
    let e = trained(8);
    let mut snap = e.snapshot(TrainingState::default());
    // a model's weights may be stored in bf16 (they load into f32)
    let bias = snap
        .tensors
        .iter_mut()
        .find(|t| t.name == "head.bias")
        .unwrap();
    let values: Vec<f32> = (0..bias.tensor.numel())
        .map(|i| i as f32 * 0.5 - 2.25)
        .collect();
    bias.tensor = Tensor::from_vec(values.clone(), bias.tensor.dims())
        .unwrap()
        .to_dtype(ferrovit::DType::BF16);
    let dir = checkpoint::save(&snap, &root, "step-1", &SaveOptions::default()).unwrap();
    let back = Checkpoint::open(&dir).unwrap().read("head.bias").unwrap();
    assert_eq!(back.dtype(), ferrovit::DType::BF16);
    assert_eq!(back.to_vec_f32(), values);
    std::fs::remove_dir_all(root).unwrap();
}

/// The index is data like any other: its bytes must match their checksum, and a
/// crafted but self-consistent index (checksum rewritten) is still refused when it
/// describes a model other than its tensors, shares bytes between tensors, repeats a
/// key, or places training outside the run.
#[test]
fn the_index_is_verified_and_validated_before_use() {
    let e = trained(11);
    let (root, clean) = saved(&e, "index-checks");
    let copy = |name: &str| copy_checkpoint(&clean, &root.join(name));
    let text = String::from_utf8(std::fs::read(clean.join(INDEX)).unwrap()).unwrap();
    let raw = |name: &str, from: &str, to: &str| {
        let d = copy(name);
        assert!(text.contains(from), "{from}");
        std::fs::write(d.join(INDEX), text.replacen(from, to, 1)).unwrap();
        d
    };
    let ck = Checkpoint::open(&clean).unwrap();
    let file_of = |n: &str| ck.index.tensors[n].chunks[0].file.clone();
    // two model tensors in one shard file, for the shared-bytes case
    let (a, b) = ["norm.weight", "norm.bias", "head.weight", "head.bias"]
        .iter()
        .flat_map(|a| ["norm.bias", "head.bias"].map(|b| (*a, b)))
        .find(|(a, b)| a != b && file_of(a) == file_of(b))
        .expect("two tensors in one shard");
    let shard = file_of("head.bias");
    let mut cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            raw("flipped", "\"heads\": 4", "\"heads\": 8"),
            vec![INDEX, "does not match its checksum"],
        ),
        (
            raw("flipped-step", "\"step\": 3", "\"step\": 1"),
            vec!["does not match its checksum"],
        ),
    ];
    let d = copy("shallower");
    edit_index(&d, |v| {
        v["model"]["depth"] = 1.into();
        v["layout"]["stages"][0]["end"] = 1.into();
    });
    cases.push((d, vec![INDEX, "`blocks.1.", "not part of the model"]));
    let d = copy("missing-block");
    edit_index(&d, |v| {
        let t = v["tensors"].as_object_mut().unwrap();
        t.retain(|k, _| !k.starts_with("blocks.1.") && !k.contains(".blocks.1."));
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| !k.starts_with("blocks.1."));
    });
    cases.push((d, vec![INDEX, "blocks.1.", "is missing"]));
    let d = copy("other-bytes");
    edit_index(&d, |v| {
        let other = v["tensors"]["norm.bias"]["chunks"].clone();
        v["tensors"]["head.bias"]["chunks"] = other;
        v["tensors"]["head.bias"]["shape"] = v["tensors"]["norm.bias"]["shape"].clone();
    });
    cases.push((d, vec![INDEX, "`head.bias`"]));
    let d = copy("shared-bytes");
    edit_index(&d, |v| {
        let (s, end) = (
            v["tensors"][a]["chunks"][0]["start"].clone(),
            v["tensors"][a]["chunks"][0]["end"].clone(),
        );
        let c = &mut v["tensors"][b]["chunks"][0];
        c["start"] = s;
        c["end"] = end;
    });
    cases.push((d, vec![INDEX, "share bytes"]));
    let d = copy("duplicate-key");
    let twice = text.replacen("\"version\": 2,", "\"version\": 2, \"version\": 2,", 1);
    write_index(&d, twice.as_bytes());
    cases.push((d, vec![INDEX, "duplicate key `version`"]));
    let d = copy("optimizer-ahead");
    edit_index(&d, |v| v["training"]["step"] = 0.into());
    cases.push((d, vec![INDEX, "optimizer_steps 3 is ahead of step 0"]));
    let d = copy("past-the-epoch");
    edit_index(&d, |v| {
        v["training"]["batches_per_epoch"] = 4.into();
        v["training"]["batch"] = 9.into();
    });
    cases.push((d, vec![INDEX, "batch 9 is past the epoch's 4 batches"]));
    let d = copy("running-at-epoch-start");
    edit_index(&d, |v| {
        v["training"]["batch"] = 0.into();
        v["training"]["running"] = serde_json::json!({"train_loss": {"sum": 1.0, "count": 4}});
    });
    cases.push((d, vec![INDEX, "running means at the start of an epoch"]));
    let d = copy("running-empty");
    edit_index(&d, |v| {
        v["training"]["batch"] = 1.into();
        v["training"]["running"] = serde_json::json!({"train_acc": {"sum": 0.0, "count": 0}});
    });
    cases.push((d, vec![INDEX, "\"train_acc\" has sum 0 over 0 items"]));
    for (field, value, want) in [
        ("dim", 1u64 << 40, "dim 1099511627776 is outside"),
        ("depth", 1_000_000_000, "depth 1000000000 is outside"),
        ("heads", 0, "heads 0 is outside"),
    ] {
        let d = copy(&format!("model-{field}"));
        edit_index(&d, |v| v["model"][field] = value.into());
        cases.push((d, vec![INDEX, want]));
    }
    // valid sizes, but 16 G parameters: refused before the skeleton is built, by the
    // machine's memory or, where that is larger, by the missing tensors
    let d = copy("huge-model");
    edit_index(&d, |v| {
        v["model"]["dim"] = 16384.into();
        v["model"]["mlp_dim"] = 16384.into();
        v["model"]["depth"] = 5.into();
        v["layout"]["stages"][0]["end"] = 5.into();
    });
    cases.push((d, vec![INDEX]));
    let d = copy("dropout");
    edit_index(&d, |v| v["model"]["dropout"] = 1.5.into());
    cases.push((d, vec![INDEX, "dropout 1.5 is outside"]));
    let d = copy("no-checksum");
    std::fs::remove_file(d.join(checkpoint::INDEX_CHECKSUM)).unwrap();
    cases.push((d, vec![INDEX, "index.json.crc32 is missing"]));
    #[cfg(unix)]
    {
        let d = copy("index-link");
        std::fs::remove_file(d.join(INDEX)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join(INDEX)).unwrap();
        cases.push((d, vec![INDEX, "symbolic link"]));
        let d = copy("index-fifo");
        std::fs::remove_file(d.join(INDEX)).unwrap();
        let c = std::ffi::CString::new(d.join(INDEX).to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        cases.push((d, vec![INDEX, "is a named pipe"]));
        let d = copy("shard-link");
        let outside = root.join("outside.safetensors");
        std::fs::rename(d.join(&shard), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, d.join(&shard)).unwrap();
        cases.push((d, vec![&shard, "symbolic link"]));
    }
    for (dir, wants) in &cases {
        let err = try_load(dir).expect_err(&format!("{} must be refused", dir.display()));
        for w in wants {
            assert!(err.contains(w), "{}: `{w}` not in: {err}", dir.display());
        }
    }
    // a version-1 index (no checksum file) is still read
    let d = copy("version-1");
    std::fs::remove_file(d.join(checkpoint::INDEX_CHECKSUM)).unwrap();
    std::fs::write(
        d.join(INDEX),
        text.replacen("\"version\": 2,", "\"version\": 1,", 1),
    )
    .unwrap();
    assert_eq!(try_load(&d).unwrap(), state(&e));
    assert_eq!(try_load(&clean).unwrap(), state(&e));
    std::fs::remove_dir_all(root).unwrap();
}

/// `model.drop_path` is written, read back, validated, and optional: a checkpoint of a
/// version before stochastic depth (no such key) loads with 0.
#[test]
fn model_drop_path_is_recorded_and_optional() {
    let (root, dir) = saved(&trained(2), "drop-path");
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX)).unwrap()).unwrap();
    assert_eq!(raw["model"]["drop_path"], 0.0);
    edit_index(&dir, |v| v["model"]["drop_path"] = 0.25.into());
    assert_eq!(Checkpoint::open(&dir).unwrap().index.model.drop_path, 0.25);
    edit_index(&dir, |v| {
        v["model"].as_object_mut().unwrap().remove("drop_path");
    });
    assert_eq!(Checkpoint::open(&dir).unwrap().index.model.drop_path, 0.0);
    edit_index(&dir, |v| v["model"]["drop_path"] = 1.5.into());
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("drop_path 1.5 is outside [0, 1)"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

/// A checkpoint without an EMA refuses `--weights ema` naming itself; one with an EMA
/// missing a tensor fails the index checks naming it.
#[test]
fn ema_weights_are_asked_for_explicitly_and_checked_whole() {
    let mut e = trained(3);
    let (root, plain) = saved(&e, "no-ema");
    let err = ferrovit::infer::Classifier::load_weights(&plain, checkpoint::Weights::Ema)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(plain.to_str().unwrap()) && err.contains("no EMA"),
        "{err}"
    );
    let out = root.join("x.safetensors");
    let err = checkpoint::export_weights(&plain, &out, checkpoint::Weights::Ema).unwrap_err();
    assert!(err.to_string().contains("no EMA"), "{err}");
    e.enable_ema(0.5, false).unwrap();
    let (root2, with) = saved(&e, "with-ema");
    let ck = Checkpoint::open(&with).unwrap();
    assert_eq!(ck.names(checkpoint::Group::Ema).len(), e.params().len());
    // the EMA starts as the weights
    assert_eq!(
        ck.read("ema.head.bias").unwrap().to_vec_f32(),
        ck.read("head.bias").unwrap().to_vec_f32()
    );
    edit_index(&with, |v| {
        v["tensors"]
            .as_object_mut()
            .unwrap()
            .remove("ema.head.bias");
    });
    let err = Checkpoint::open(&with).unwrap_err().to_string();
    assert!(err.contains("`ema.head.bias` is missing"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(root2).unwrap();
}
