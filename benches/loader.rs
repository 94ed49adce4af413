//! Can the data pipeline keep up with training? Images/s of the full CPU augmentation
//! pipeline (random crop + flip + AutoAugment CIFAR-10 policy + normalisation, batches
//! of 128 built by the loader's worker threads) next to the train-step images/s of
//! the default `ferrovit train` model and of the lite preset at the same batch size.
//! The loader keeps up when its images/s exceeds the train step's.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ferrovit::data::{default_data_dir, Augment, Dataset, Loader, Sampler};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::recipe::TrainOptions;
use ferrovit::VitConfig;
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 128;

fn pipeline(c: &mut Criterion) {
    let (train, _) = Dataset::cifar_dir(&default_data_dir()).expect("digits data");
    let n = train.len();
    let data = Arc::new(train);
    let mut group = c.benchmark_group("pipeline");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));

    for workers in [1, 2] {
        let mut loader =
            Loader::new(data.clone(), Sampler::new(n, true, 0), BATCH).expect("loader");
        loader.augment = Augment::parse("crop,flip,autoaugment").expect("augment");
        loader.workers = workers;
        let images = (n / BATCH * BATCH) as u64;
        loader.drop_last = true;
        group.throughput(Throughput::Elements(images));
        let mut epoch = 0;
        group.bench_function(format!("loader_autoaugment_{workers}_workers"), |b| {
            b.iter(|| {
                epoch += 1;
                loader
                    .epoch(epoch)
                    .map(|b| b.expect("batch").labels.len())
                    .sum::<usize>()
            })
        });
    }

    group.throughput(Throughput::Elements(BATCH as u64));
    let default_model = TrainOptions::default().model(10).expect("default model");
    let lite = VitConfig::preset("vit_lite_depth7_patch4_32").expect("preset");
    let mut loader = Loader::new(data.clone(), Sampler::new(n, true, 0), BATCH).expect("loader");
    loader.drop_last = true;
    let batch = loader.epoch(0).next().expect("a batch").expect("batch");
    for (name, cfg) in [
        ("train_step_default_model", default_model),
        ("train_step_lite", lite),
    ] {
        let mut engine = Engine::new(&cfg, TrainConfig::default()).expect("engine");
        group.bench_function(name, |b| {
            b.iter(|| {
                engine
                    .train_step(batch.images.clone(), &batch.labels, &batch.samples)
                    .expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
