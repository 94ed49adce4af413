//! One forward + backward + AdamW step of each preset at batch 128 on the CPU, in f32
//! and in bf16 mixed precision (`<preset>_bf16`; its products run the way
//! `cpu::bf16gemm::choice` says, printed first), reported as images/s. Compare with `scripts/bench_torch.py` run on the same machine
//! with the same thread count (docs/PERFORMANCE.md has the method and the figures).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::nn::PRESETS;
use ferrovit::rng::Rng;
use ferrovit::{Precision, Tensor, VitConfig};
use std::time::Duration;

const BATCH: usize = 128;

fn train_step(c: &mut Criterion) {
    if let Ok(n) = std::env::var("FERROVIT_THREADS") {
        let n = n.parse().expect("FERROVIT_THREADS is a number");
        ferrovit::backend::cpu::set_num_threads(n).expect("thread pool");
    }
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(5))
        .measurement_time(Duration::from_secs(40))
        .throughput(Throughput::Elements(BATCH as u64));
    eprintln!("{}", ferrovit::backend::cpu::bf16gemm::choice());
    for preset in PRESETS {
        for precision in [Precision::F32, Precision::Bf16] {
            let cfg = VitConfig::preset(preset).expect("preset");
            let config = TrainConfig {
                precision,
                ..TrainConfig::default()
            };
            let mut engine = Engine::new(&cfg, config).expect("engine");
            let mut rng = Rng::new(1);
            let images = Tensor::from_vec(
                rng.vec(BATCH * 3 * 32 * 32, |r| r.normal()),
                [BATCH, 3, 32, 32],
            )
            .unwrap();
            let labels: Vec<usize> = (0..BATCH).map(|i| i % 10).collect();
            let samples: Vec<u64> = (0..BATCH as u64).collect();
            let name = match precision {
                Precision::F32 => preset.to_string(),
                Precision::Bf16 => format!("{preset}_bf16"),
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    engine
                        .train_step(images.clone(), &labels, &samples)
                        .expect("step")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
