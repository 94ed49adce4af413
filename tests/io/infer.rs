//! `ferrovit infer` and `ferrovit eval`: predictions equal the training engine's,
//! weights are used in place, bf16 on the CPU agrees with f32, checkpoints of any layout
//! work, and bad inputs are clear errors with nothing printed as a result.

use crate::common;

use crate::common::{copy_checkpoint, edit_index, ferrovit, temp_dir, TINY};
use ferrovit::checkpoint::{LoadOptions, INDEX};
use ferrovit::data::{default_data_dir, Dataset};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::infer::Classifier;
use std::path::{Path, PathBuf};

/// Trains a model (`TINY` by default) for one epoch into `out`.
fn train(out: &Path, flags: &[&str]) -> PathBuf {
    let o = out.to_str().unwrap();
    let flags = if flags.is_empty() { &TINY[..] } else { flags };
    let (ok, _, err) = ferrovit(&[&["train", "--epochs", "1", "--out", o], flags].concat());
    assert!(ok, "{err}");
    out.join("checkpoints")
}

/// The first `n` digits test images, written as PNGs of other sizes.
fn pngs(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<usize>) {
    let (_, test) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let mut paths = Vec::new();
    for i in 0..n {
        let px = &test.images[i * 3072..(i + 1) * 3072];
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let at = (y * 32 + x) as usize;
            image::Rgb([px[at], px[1024 + at], px[2048 + at]])
        });
        // an integer upscale keeps the picture after the resize back to 32
        let big = image::imageops::resize(&img, 64, 64, image::imageops::FilterType::Nearest);
        let p = dir.join(format!("digit{i}.png"));
        big.save(&p).unwrap();
        paths.push(p);
    }
    let labels = test.labels[..n].iter().map(|&l| l as usize).collect();
    (paths, labels)
}

#[test]
fn predictions_and_accuracy_match_the_training_engine() {
    let out = temp_dir("infer");
    let root = train(&out, &[]);
    let newest = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    let mut model = Classifier::load(&newest).unwrap();
    assert!(
        model.weights_in_place(),
        "weights are views of the shard files"
    );
    assert_eq!(model.classes.len(), 10);
    // a view has the stored values; writing to it copies it, never the file
    let ckpt = ferrovit::checkpoint::Checkpoint::open(&newest).unwrap();
    let stored = ckpt.read("head.weight").unwrap().to_vec_f32();
    let mut view = ckpt.view("head.weight").unwrap();
    assert!(view.is_mapped());
    assert_eq!(view.to_vec_f32(), stored);
    let other = view.share();
    view.f32s_mut().unwrap()[0] += 1.0;
    assert!(!view.is_mapped() && other.is_mapped());
    assert_eq!(other.to_vec_f32(), stored, "another view is unchanged");
    assert_eq!(ckpt.read("head.weight").unwrap().to_vec_f32(), stored);

    // the same images through the engine that trained the model
    let (paths, _) = pngs(&out, 8);
    let images = model.load_images(&paths).unwrap();
    let cfg = model.model.config.clone();
    let mut engine = Engine::new(&cfg, TrainConfig::default()).unwrap();
    engine
        .load_checkpoint(&newest, LoadOptions::default())
        .unwrap();
    let (_, want) = engine.eval_batch(images.clone(), &[0; 8]).unwrap();
    let top = model.top_k(images, 3).unwrap();
    let got: Vec<usize> = top.iter().map(|t| t[0].index).collect();
    assert_eq!(got, want, "top-1 classes equal the engine's predictions");
    for t in &top {
        assert!(t[0].probability >= t[1].probability && t[1].probability >= t[2].probability);
        assert!(t.iter().all(|s| (0.0..=1.0).contains(&s.probability)));
    }

    // the CLI prints the same, for every image, in order
    let ckpt = root.to_str().unwrap();
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let (ok, stdout, err) = ferrovit(&[&["infer", "--ckpt", ckpt, "--json"], &args[..]].concat());
    assert!(ok, "{err}");
    let tops: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (k, item) in tops.as_array().unwrap().iter().enumerate() {
        assert_eq!(item["image"], args[k]);
        assert_eq!(item["top"][0]["index"], want[k]);
        assert_eq!(item["top"].as_array().unwrap().len(), 3);
    }
    let (ok, stdout, _) =
        ferrovit(&[&["infer", "--ckpt", ckpt, "--top-k", "1"], &args[..2]].concat());
    assert!(ok && stdout.lines().count() == 2, "{stdout}");

    // eval's accuracy is the run's last test accuracy (same model, same test set)
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let (ok, stdout, err) = ferrovit(&["eval", "--ckpt", ckpt, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(
        (acc - last["test_acc"].as_f64().unwrap()).abs() < 1e-9,
        "{acc} vs {last}"
    );
    assert_eq!(v["images"], 360);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 10);
    let (ok, stdout, _) = ferrovit(&["eval", "--ckpt", ckpt]);
    assert!(ok && stdout.contains("accuracy") && stdout.contains("confusion matrix"));

    // bf16 on the CPU (activations rounded where stored) agrees with f32 to bf16's
    // precision: eval's accuracy, and each image's f32 top class and its probability
    let bf16 = ["--precision", "bf16"];
    let (ok, stdout, err) = ferrovit(&[&["eval", "--ckpt", ckpt, "--json"], &bf16[..]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let acc16 = v["accuracy"].as_f64().unwrap();
    assert!((acc16 - acc).abs() <= 0.02, "bf16 eval {acc16}, f32 {acc}");
    let infer16 = [&["infer", "--ckpt", ckpt, "--json"], &bf16[..], &args[..]].concat();
    let (ok, stdout, err) = ferrovit(&infer16);
    assert!(ok, "{err}");
    let tops16: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (f, h) in tops
        .as_array()
        .unwrap()
        .iter()
        .zip(tops16.as_array().unwrap())
    {
        let top = &f["top"][0];
        let same = h["top"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["index"] == top["index"]);
        let p = |t: &serde_json::Value| t["probability"].as_f64().unwrap();
        let same = same.unwrap_or_else(|| panic!("bf16 lost the f32 top class: {f} / {h}"));
        assert!((p(same) - p(top)).abs() < 0.05, "{f} / {h}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_checkpoint_saved_under_a_parallel_layout_classifies_the_same() {
    let out = temp_dir("infer-layout");
    let model = ["--dim", "32", "--depth", "2", "--mlp-dim", "32"];
    let single = train(&out.join("single"), &model);
    let parallel = train(
        &out.join("parallel"),
        &[&model[..], &["--dp", "2", "--pp", "2"]].concat(),
    );
    let (paths, _) = pngs(&out, 6);
    let predict = |root: &Path| {
        let dir = ferrovit::checkpoint::newest(root).unwrap().unwrap();
        let mut m = Classifier::load(&dir).unwrap();
        let images = m.load_images(&paths).unwrap();
        let top = m.top_k(images, 1).unwrap();
        top.iter().map(|t| t[0].index).collect::<Vec<_>>()
    };
    assert_eq!(predict(&parallel), predict(&single));
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_inputs_are_clear_errors_and_print_no_result() {
    let out = temp_dir("infer-bad");
    let root = train(&out, &[]);
    let (paths, _) = pngs(&out, 1);
    let good = paths[0].to_str().unwrap();
    let ckpt = root.to_str().unwrap();
    let text = out.join("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    let broken = out.join("broken.png");
    let mut bytes = std::fs::read(good).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&broken, bytes).unwrap();
    // a corrupted copy of the checkpoint: one flipped byte in a weight
    let newest = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    let corrupt = copy_checkpoint(&newest, &out.join("corrupt"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corrupt.join(INDEX)).unwrap()).unwrap();
    let chunk = &index["tensors"]["head.weight"]["chunks"][0];
    let shard = corrupt.join(chunk["file"].as_str().unwrap());
    let mut data = std::fs::read(&shard).unwrap();
    data[chunk["start"].as_u64().unwrap() as usize + 8] ^= 0x40;
    std::fs::write(&shard, data).unwrap();
    // a data set with 3 classes for a 10-class model
    let three = out.join("three");
    for split in ["train", "test"] {
        for class in ["a", "b", "c"] {
            let d = three.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(good, d.join("x.png")).unwrap();
        }
    }
    let corrupt_s = corrupt.to_str().unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["infer", "--ckpt", "/nonexistent/ckpt", good],
            "/nonexistent/ckpt".into(),
        ),
        (
            vec!["infer", "--ckpt", corrupt_s, good],
            "checksum mismatch".into(),
        ),
        (
            vec!["infer", "--ckpt", ckpt, good, text.to_str().unwrap()],
            "notes.txt".into(),
        ),
        (
            vec!["infer", "--ckpt", ckpt, broken.to_str().unwrap()],
            "broken.png".into(),
        ),
        (
            vec!["infer", "--ckpt", ckpt, "--top-k", "0", good],
            "--top-k".into(),
        ),
        (
            vec!["eval", "--ckpt", corrupt_s],
            "checksum mismatch".into(),
        ),
        (
            vec!["eval", "--ckpt", ckpt, "--data", three.to_str().unwrap()],
            "3 classes".into(),
        ),
        // a directory that is no checkpoint (nor holds one)
        (
            vec!["eval", "--ckpt", three.to_str().unwrap()],
            INDEX.into(),
        ),
    ];
    for (args, want) in cases {
        let (ok, stdout, err) = ferrovit(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(stdout.is_empty(), "{args:?} printed a result: {stdout}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// A CIFAR-10 binary directory holding the digits test set (as both splits), with
/// class names `names` and each label `l` replaced by `relabel(l)`.
fn digits_as(dir: &Path, names: &[&str], relabel: impl Fn(u8) -> u8) -> String {
    let (_, test) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let mut bytes = Vec::new();
    for (i, &l) in test.labels.iter().enumerate() {
        bytes.push(relabel(l));
        bytes.extend_from_slice(&test.images[i * 3072..(i + 1) * 3072]);
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), names.join("\n")).unwrap();
    std::fs::write(dir.join("data_batch_1.bin"), &bytes).unwrap();
    std::fs::write(dir.join("test_batch.bin"), &bytes).unwrap();
    dir.to_str().unwrap().to_string()
}

/// `eval --json`'s confusion matrix (rows: true classes, in the model's order).
fn confusion(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, err) = ferrovit(&[args, &["--json"]].concat());
    assert!(ok, "{args:?}: {err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    v["confusion"].clone()
}

#[test]
fn eval_matches_data_classes_to_the_checkpoints_by_name() {
    let out = temp_dir("eval-names");
    let root = train(&out, &[]);
    let ckpt = root.to_str().unwrap();
    let digits: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let digits: Vec<&str> = digits.iter().map(String::as_str).collect();
    let want = confusion(&["eval", "--ckpt", ckpt]);
    // the same data listing its classes in reverse (labels follow): the same result
    let reversed: Vec<&str> = digits.iter().rev().copied().collect();
    let rev = digits_as(&out.join("reversed"), &reversed, |l| 9 - l);
    assert_eq!(confusion(&["eval", "--ckpt", ckpt, "--data", &rev]), want);
    // other names: an error listing both lists, unless mapped
    let letters = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let other = digits_as(&out.join("letters"), &letters, |l| l);
    let (ok, stdout, err) = ferrovit(&["eval", "--ckpt", ckpt, "--data", &other]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(
        err.contains(r#"["a", "b", "c""#) && err.contains(r#"["0", "1", "2""#),
        "{err}"
    );
    let map: Vec<String> = letters
        .iter()
        .zip(&digits)
        .map(|(a, d)| format!("--class-map={a}={d}"))
        .collect();
    let map: Vec<&str> = map.iter().map(String::as_str).collect();
    let args = [&["eval", "--ckpt", ckpt, "--data", &other][..], &map].concat();
    assert_eq!(confusion(&args), want);
    let (ok, _, err) = ferrovit(&[
        "eval",
        "--ckpt",
        ckpt,
        "--data",
        &other,
        "--class-map",
        "z=0",
    ]);
    assert!(!ok && err.contains("no class \"z\""), "{err}");
    // two data classes mapped to one name; one mapped twice
    for (map, want) in [
        (["a=0", "b=0"], "\"0\" twice"),
        (["a=0", "a=1"], "mapped twice"),
    ] {
        let args = [
            "eval",
            "--ckpt",
            ckpt,
            "--data",
            &other,
            "--class-map",
            map[0],
        ];
        let (ok, _, err) = ferrovit(&[&args[..], &["--class-map", map[1]]].concat());
        assert!(!ok && err.contains(want), "{err}");
    }
    // two names swapped by the map: their rows swap
    let args = [
        "eval",
        "--ckpt",
        ckpt,
        "--class-map",
        "0=1",
        "--class-map",
        "1=0",
    ];
    let mut swapped = want.clone();
    swapped.as_array_mut().unwrap().swap(0, 1);
    assert_eq!(confusion(&args), swapped);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn images_too_large_or_not_regular_files_are_refused_at_once() {
    let out = temp_dir("infer-sizes");
    let root = train(&out, &[]);
    let ckpt = root.to_str().unwrap().to_string();
    let huge = out.join("huge.png");
    std::fs::write(&huge, common::png_header(10_000_000, 1)).unwrap();
    let (ok, stdout, err) = ferrovit(&["infer", "--ckpt", &ckpt, huge.to_str().unwrap()]);
    assert!(!ok && stdout.is_empty());
    assert!(
        err.contains("huge.png") && err.contains("10000000 × 1 pixels"),
        "{err}"
    );
    let pipe = out.join("pipe.png");
    common::mkfifo(&pipe);
    let pipe = pipe.to_str().unwrap().to_string();
    let (ok, _, err) = common::within_20s(move || ferrovit(&["infer", "--ckpt", &ckpt, &pipe]));
    assert!(!ok && err.contains("pipe.png: is a named pipe"), "{err}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn class_and_file_names_are_printed_escaped() {
    let out = temp_dir("infer-escape");
    let root = train(&out, &[]);
    // a checkpoint whose class names hold escape sequences and a bidi override
    let newest = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    let evil = copy_checkpoint(&newest, &out.join("evil"));
    let names: Vec<String> = (0..10)
        .map(|i| format!("\u{1b}]0;pwned\u{7}\u{1b}[2J{i}\u{202e}"))
        .collect();
    // a crafted index: its checksum rewritten to match
    edit_index(&evil, |index| {
        index["training"]["classes"] = serde_json::json!(names)
    });
    let (paths, _) = pngs(&out, 1);
    let image = out.join("a\u{1b}[1mb.png");
    std::fs::rename(&paths[0], &image).unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let data = digits_as(&out.join("evil-data"), &names, |l| l);
    let e = evil.to_str().unwrap();
    for args in [
        vec!["infer", "--ckpt", e, image.to_str().unwrap()],
        vec!["eval", "--ckpt", e, "--data", &data],
        vec!["ckpt", "inspect", e],
    ] {
        let (ok, stdout, err) = ferrovit(&args);
        assert!(ok, "{args:?}: {err}");
        assert!(
            !stdout.contains(['\u{1b}', '\u{7}', '\u{202e}']),
            "{args:?} printed raw control characters: {stdout:?}"
        );
        assert!(
            stdout.contains(r"\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "{args:?}: {stdout}"
        );
    }
    // errors too
    let (ok, _, err) = ferrovit(&["eval", "--ckpt", e]);
    assert!(
        !ok && !err.contains('\u{1b}') && err.contains(r"\u{1b}"),
        "{err:?}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

/// `--image-size 48` with `--mean/--std`: the run trains on the digits resized to 48,
/// the checkpoint records 48 and the normalisation, `infer`/`eval` bring images to 48
/// and normalise them so (the engine's predictions and the run's accuracy), an older
/// index without `normalize` means CIFAR-10's, and `--init` from it to a 32-pixel model
/// resamples the position embedding and trains; an image folder trains at 48 too.
#[test]
fn a_model_at_another_image_size_and_normalisation_infers_as_trained() {
    let out = temp_dir("infer-48");
    let flags = [
        &TINY[..],
        &[
            "--image-size",
            "48",
            "--mean",
            "0.5,0.4,0.3",
            "--std",
            "0.25,0.5,0.125",
            "--augment",
            "crop",
        ],
    ]
    .concat();
    let root = train(&out.join("run"), &flags);
    let newest = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest.join(INDEX)).unwrap()).unwrap();
    assert_eq!(index["model"]["image_size"], 48);
    assert_eq!(index["tensors"]["pos_embed"]["shape"][1], 1 + 12 * 12);
    let norm = &index["training"]["normalize"];
    assert_eq!(norm["mean"], serde_json::json!([0.5, 0.4, 0.3]), "{norm}");
    assert_eq!(norm["std"], serde_json::json!([0.25, 0.5, 0.125]), "{norm}");
    assert_eq!(index["training"]["options"]["image_size"], 48);

    let mut model = Classifier::load(&newest).unwrap();
    assert_eq!((model.image_size(), model.norm.mean), (48, [0.5, 0.4, 0.3]));
    let (paths, _) = pngs(&out, 6);
    let images = model.load_images(&paths).unwrap();
    assert_eq!(images.dims(), [6, 3, 48, 48]);
    let mut engine = Engine::new(&model.model.config, TrainConfig::default()).unwrap();
    engine
        .load_checkpoint(&newest, LoadOptions::default())
        .unwrap();
    let (_, want) = engine.eval_batch(images.clone(), &[0; 6]).unwrap();
    let top: Vec<usize> = model
        .top_k(images, 1)
        .unwrap()
        .iter()
        .map(|t| t[0].index)
        .collect();
    assert_eq!(top, want, "infer's top-1 classes are the engine's");
    let ckpt = newest.to_str().unwrap();
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let (ok, stdout, err) = ferrovit(&[&["infer", "--ckpt", ckpt, "--json"], &args[..]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let cli: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["top"][0]["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(cli, want);
    // eval reads the digits at 48 with the run's normalisation: the run's test accuracy
    let metrics = std::fs::read_to_string(out.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let (ok, stdout, err) = ferrovit(&["eval", "--ckpt", ckpt, "--json"]);
    assert!(ok, "{err}");
    let acc = serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        (acc - last["test_acc"].as_f64().unwrap()).abs() < 1e-9,
        "{acc} vs {last}"
    );

    // an index from before normalisation was recorded: CIFAR-10's
    let old = copy_checkpoint(&newest, &out.join("old"));
    edit_index(&old, |v| {
        v["training"].as_object_mut().unwrap().remove("normalize");
    });
    let m = Classifier::load(&old).unwrap();
    assert_eq!(m.norm, ferrovit::data::Normalize::CIFAR10);

    // --init into a 32-pixel model: the 12×12 grid resampled to 8×8, and it trains
    let init = [&TINY[..], &["--init", ckpt, "--epochs", "1"]].concat();
    let o = out.join("init32");
    let (ok, log, err) = ferrovit(&[&["train", "--out", o.to_str().unwrap()], &init[..]].concat());
    assert!(ok, "{err}");
    assert!(
        log.contains("`pos_embed` resampled from a 12×12 to a 8×8 patch grid"),
        "{log}"
    );
    assert!(o.join("metrics.jsonl").is_file());

    // an image folder (made here, 64 × 40 images) at 48
    let folder = out.join("folder");
    for split in ["train", "test"] {
        for (c, class) in ["x", "y"].iter().enumerate() {
            let d = folder.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for k in 0..4u32 {
                let img = image::RgbImage::from_fn(64, 40, |x, y| {
                    image::Rgb([(x * 4) as u8, (y * 6) as u8, (c as u32 * 200 + k) as u8])
                });
                img.save(d.join(format!("{k}.png"))).unwrap();
            }
        }
    }
    let f = folder.to_str().unwrap();
    let args = [
        &TINY[..],
        &["--image-size", "48", "--data", f, "--batch-size", "4"],
    ]
    .concat();
    let root = train(&out.join("folder-run"), &args);
    let dir = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    assert_eq!(Classifier::load(&dir).unwrap().image_size(), 48);
    std::fs::remove_dir_all(out).unwrap();
}

/// Bad `--image-size`, `--mean` and `--std` values are refused naming the flag and the
/// value, before anything runs; a resume keeps the run's size and normalisation.
#[test]
fn bad_image_size_and_normalisation_are_refused() {
    let out = temp_dir("image-size-bad");
    let o = out.to_str().unwrap();
    for (flags, want) in [
        (
            vec!["--image-size", "50"],
            "--image-size 50: must be a positive multiple of the patch size 4",
        ),
        (vec!["--image-size", "0"], "--image-size 0"),
        (
            vec!["--image-size", "2048"],
            "--image-size 2048: must be at most 1024",
        ),
        (
            vec!["--image-size", "48", "--patch-size", "5"],
            "--image-size 48",
        ),
        (vec!["--mean", "0.5,0.5"], "--mean"),
        (vec!["--mean", "nan,0,0"], "--mean"),
        (
            vec!["--std", "0.2,0,0.2"],
            "--std 0.2,0,0.2: std 0 must be a positive finite number",
        ),
        (vec!["--std", "a,b,c"], "--std"),
    ] {
        let args = [
            &["train", "--out", o, "--epochs", "1"][..],
            &TINY[..],
            &flags[..],
        ]
        .concat();
        let (ok, _, err) = ferrovit(&args);
        assert!(!ok, "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: one line: {err}");
    }
    // the run at 32 cannot be resumed at another size or normalisation
    let root = train(&out.join("run"), &[]);
    let run = root.parent().unwrap().to_str().unwrap();
    for (flag, value, shown) in [
        ("--image-size", "48", "48"),
        ("--mean", "0,0,0.5", "0.0,0.0,0.5"),
        ("--std", "1,1,1", "1.0,1.0,1.0"),
    ] {
        let args = [
            "train", "--out", run, "--resume", "auto", "--epochs", "2", flag, value,
        ];
        let (ok, _, err) = ferrovit(&args);
        let want = format!("{flag} {shown} contradicts the checkpoint's");
        assert!(!ok && err.contains(&want), "{err}");
    }
    std::fs::remove_dir_all(out).unwrap();
}
