//! The trainer with hooks: loss, accuracy, per-epoch metrics (logged and written as
//! JSON lines) and a checkpoint after every epoch, on the embedded digits data.
//!
//! `cargo run --release --example trainer_hooks [-- --tiny] [-- OUT_DIR]`

use ferrovit::checkpoint::SaveOptions;
use ferrovit::data::{default_data_dir, Dataset, Loader, Sampler};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::trainer::{
    init_stdout, AccuracyHook, LogMetricByEpochHook, Logger, LossHook, SaveCheckpointHook, Trainer,
};
use ferrovit::VitConfig;
use std::path::PathBuf;
use std::sync::Arc;

fn main() -> ferrovit::Result<()> {
    init_stdout();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiny = args.iter().any(|a| a == "--tiny");
    let out = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or_else(|| PathBuf::from("out/example-trainer"), PathBuf::from);
    std::fs::create_dir_all(&out).map_err(|e| ferrovit::Error::io(&out, e))?;

    let (train, test) = Dataset::cifar_dir(&default_data_dir())?;
    let (n_train, n_test) = (train.len(), test.len());
    let train = Loader::new(Arc::new(train), Sampler::new(n_train, true, 0), 64)?;
    let test = Loader::new(Arc::new(test), Sampler::new(n_test, false, 0), 256)?;
    let (dim, depth, mlp_dim) = if tiny { (32, 1, 32) } else { (128, 4, 256) };
    let model = VitConfig {
        dim,
        depth,
        heads: 4,
        mlp_dim,
        ..VitConfig::preset("vit_lite_depth7_patch4_32")?
    };
    let engine = Engine::new(
        &model,
        TrainConfig {
            lr: 2e-3,
            ..TrainConfig::default()
        },
    )?;

    let mut trainer = Trainer::new(engine, Logger::new(0, 1));
    trainer
        .add_hook(LossHook::default())
        .add_hook(AccuracyHook::default())
        .add_hook(LogMetricByEpochHook::with_jsonl(
            out.join("metrics.jsonl"),
            &[],
        )?)
        .add_hook(SaveCheckpointHook::new(
            out.join("checkpoints"),
            Some(1),
            None,
            SaveOptions::default(),
        ));
    let epochs = if tiny { 1 } else { 5 };
    trainer.fit(&train, epochs, Some(&test), 1)?;
    let last = trainer.history().last().cloned().unwrap_or_default();
    println!(
        "test accuracy {:.1}% after {epochs} epochs; metrics in {}, checkpoints in {}",
        100.0 * last.get("test_acc").copied().unwrap_or(f64::NAN),
        out.join("metrics.jsonl").display(),
        out.join("checkpoints").display()
    );
    Ok(())
}
