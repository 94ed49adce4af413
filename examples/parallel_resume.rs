//! Save under data parallelism, load the same checkpoint into a 2-stage pipeline, and
//! keep training: the second run continues the first exactly where it stopped (data
//! order, dropout, LR schedule and AdamW state), under another layout.
//!
//! `cargo run --release --example parallel_resume [-- --tiny] [-- OUT_DIR]`

use ferrovit::recipe::{train, train_given, Resume, TrainOptions};
use std::path::PathBuf;

fn main() -> ferrovit::Result<()> {
    ferrovit::trainer::init_stdout();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiny = args.iter().any(|a| a == "--tiny");
    let out = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or_else(|| PathBuf::from("out/example-parallel"), PathBuf::from);
    let base = TrainOptions {
        dim: Some(if tiny { 32 } else { 128 }),
        depth: Some(4),
        mlp_dim: Some(if tiny { 32 } else { 256 }),
        epochs: if tiny { 2 } else { 6 },
        ..TrainOptions::default()
    };

    // 1. data parallel, 2 replicas (ranks as threads), all epochs; a checkpoint per epoch
    let dp = out.join("dp2");
    let first = train(&TrainOptions {
        dp: 2,
        out: dp.clone(),
        keep_last: 0,
        overwrite: true, // an earlier run of the example is moved aside
        ..base.clone()
    })?;
    println!(
        "dp=2: {:.1}% test accuracy",
        100.0 * first.final_test_accuracy.unwrap_or(0.0)
    );

    // 2. the checkpoint after the first epoch, loaded into a 2-stage pipeline (each
    //    stage reads only its own blocks and their optimizer state), trained on to the end
    let steps_per_epoch = 1437u64.div_ceil(base.batch_size as u64);
    let ckpt = dp
        .join("checkpoints")
        .join(format!("step-{steps_per_epoch:010}"));
    //    (the model, optimizer, data and seed come from the checkpoint; the layout is given)
    let resumed = TrainOptions {
        dp: 1,
        pp: 2,
        out: out.join("pp2"),
        resume: Some(Resume::Dir(ckpt.clone())),
        overwrite: true,
        ..TrainOptions::default()
    };
    let second = train_given(&resumed, &["dp", "pp"])?;
    println!(
        "pp=2, resumed from {}: {:.1}% test accuracy (the dp=2 run: {:.1}%)",
        ckpt.display(),
        100.0 * second.final_test_accuracy.unwrap_or(0.0),
        100.0 * first.final_test_accuracy.unwrap_or(0.0)
    );
    Ok(())
}
