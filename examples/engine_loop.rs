//! The tutorial's engine loop: zero_grad, forward, criterion, backward, step — by hand,
//! on the embedded digits data, then a test pass.
//!
//! `cargo run --release --example engine_loop` (add `-- --tiny` for a seconds-long run)

use ferrovit::data::{default_data_dir, Dataset, Loader, Sampler};
use ferrovit::engine::{count_correct, Engine, TrainConfig};
use ferrovit::VitConfig;
use std::sync::Arc;

fn main() -> ferrovit::Result<()> {
    let tiny = std::env::args().any(|a| a == "--tiny");
    let (train, test) = Dataset::cifar_dir(&default_data_dir())?;
    let (n_train, n_test) = (train.len(), test.len());
    let train = Loader::new(Arc::new(train), Sampler::new(n_train, true, 0), 64)?;
    let test = Loader::new(Arc::new(test), Sampler::new(n_test, false, 0), 256)?;

    // a small ViT: the default `ferrovit train` model, or a very small one with --tiny
    let (dim, depth, mlp_dim) = if tiny { (32, 1, 32) } else { (128, 4, 256) };
    let model = VitConfig {
        dim,
        depth,
        heads: 4,
        mlp_dim,
        ..VitConfig::preset("vit_lite_depth7_patch4_32")?
    };
    let mut engine = Engine::new(
        &model,
        TrainConfig {
            lr: 2e-3,
            ..TrainConfig::default()
        },
    )?;

    let epochs = if tiny { 1 } else { 5 };
    for epoch in 0..epochs {
        engine.train();
        let (mut loss_sum, mut batches) = (0.0, 0);
        for batch in train.epoch(epoch) {
            let batch = batch?;
            engine.zero_grad()?;
            let output = engine.forward(batch.images, &batch.samples)?;
            let loss = engine.criterion(&output, &batch.labels)?;
            engine.backward(&loss)?;
            engine.step()?;
            loss_sum += loss.value;
            batches += 1;
        }
        engine.eval();
        let (mut correct, mut seen) = (0, 0);
        for batch in test.epoch(0) {
            let batch = batch?;
            let output = engine.forward(batch.images, &batch.samples)?;
            correct += count_correct(&output.logits, &batch.labels)?;
            seen += batch.labels.len();
        }
        println!(
            "epoch {}: train loss {:.4}, test accuracy {:.1}%",
            epoch + 1,
            loss_sum / batches as f32,
            100.0 * correct as f64 / seen as f64
        );
    }
    Ok(())
}
