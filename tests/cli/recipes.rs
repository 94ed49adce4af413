//! The recipe files (configs/*.toml): each parses through `TrainOptions::from_toml_file`,
//! validates, builds its preset with the anchors' schedule, and `ferrovit train
//! --config` runs one with a short override on a tiny subset of the digits data.

use crate::common::{ferrovit, temp_dir};
use ferrovit::recipe::TrainOptions;
use ferrovit::VitConfig;
use std::path::{Path, PathBuf};

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

#[test]
fn recipe_files_parse_validate_and_build_their_presets() {
    // (file, preset, epochs, dropout, drop_path, (batch, lr, weight decay, warm-up))
    let recipes = [
        (
            "vit_lite_cifar10.toml",
            "vit_lite_depth7_patch4_32",
            300,
            0.0,
            0.1,
            (128, 5e-4, 3e-2, 10.0),
        ),
        (
            "vit_tiny_cifar10.toml",
            "vit_tiny_patch4_32",
            60,
            0.1,
            0.0,
            (512, 1e-3, 0.0, 5.0),
        ),
    ];
    for (file, preset, epochs, dropout, drop_path, anchors) in recipes {
        let opts = TrainOptions::from_toml_file(&recipe(file)).unwrap();
        opts.validate().unwrap();
        assert_eq!(opts.preset.as_deref(), Some(preset), "{file}");
        assert_eq!(opts.epochs, epochs, "{file}");
        let want = VitConfig {
            dropout,
            drop_path,
            ..VitConfig::preset(preset).unwrap()
        };
        assert_eq!(opts.model(10).unwrap(), want, "{file}");
        let got = (opts.batch_size, opts.lr, opts.weight_decay, opts.warmup);
        assert_eq!(got, anchors, "{file}");
        assert_eq!(opts.label_smoothing, 0.1, "{file}");
        assert_eq!(opts.augment.to_string(), "crop,flip,autoaugment", "{file}");
    }
}

/// The first `n` 3073-byte records of a CIFAR-10 binary file.
fn head(from: &Path, to: &Path, n: usize) {
    let bytes = std::fs::read(from).unwrap();
    std::fs::write(to, &bytes[..n * 3073]).unwrap();
}

#[test]
fn a_recipe_file_trains_with_flags_overriding_it() {
    let dir = temp_dir("recipe");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits");
    head(
        &digits.join("data_batch_1.bin"),
        &data.join("data_batch_1.bin"),
        64,
    );
    head(
        &digits.join("test_batch.bin"),
        &data.join("test_batch.bin"),
        32,
    );
    std::fs::copy(
        digits.join("batches.meta.txt"),
        data.join("batches.meta.txt"),
    )
    .unwrap();
    let out = dir.join("out");
    let (ok, text, err) = ferrovit(&[
        "train",
        "--config",
        recipe("vit_lite_cifar10.toml").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--warmup",
        "0.5",
        "--batch-size",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["images"], 32, "{text}");
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    for want in [
        "preset = \"vit_lite_depth7_patch4_32\"",
        "epochs = 1",
        "label_smoothing = 0.1",
    ] {
        assert!(config.contains(want), "{want}: {config}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
