//! CPU kernels at `vit_tiny_patch4_32`'s shapes (batch 128, 65 tokens, dim 512, 8
//! heads), reported as elements (or FLOPs for products) per second. These locate where a
//! training step's time goes; `train_step` is the figure that matters.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrovit::backend::cpu::ops::Round;
use ferrovit::backend::cpu::{attention, ops, simd};
use ferrovit::backend::gemm;
use ferrovit::backend::AttnDims;
use ferrovit::rng::Rng;
use std::time::Duration;

const B: usize = 128;
const T: usize = 65;
const D: usize = 512;
const H: usize = 8;

/// Normal values with standard deviation `std` (activations ~1, weights ~1/sqrt(fan_in),
/// as in a real model: unscaled weights make the softmax saturate and flood the
/// products with denormals, which measures the wrong thing).
fn randv(n: usize, seed: u64, std: f32) -> Vec<f32> {
    Rng::new(seed).vec(n, |r| r.normal() * std)
}

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernels");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let n = B * T;

    let x = randv(n * D, 1, 1.0);
    let w = randv(3 * D * D, 2, 1.0 / (D as f32).sqrt());
    let mut qkv = vec![0.0; n * 3 * D];
    g.throughput(Throughput::Elements((2 * n * 3 * D * D) as u64));
    g.bench_function("gemm_qkv_flops", |b| {
        b.iter(|| gemm::matmul(&mut qkv, &x, false, &w, true, (n, 3 * D, D), false))
    });

    let dims = AttnDims {
        batch: B,
        tokens: T,
        queries: T,
        dim: D,
        heads: H,
    };
    let mut probs = vec![0.0; B * H * T * T];
    let mut out = vec![0.0; n * D];
    let attn_flops = (4 * B * H * T * T * (D / H)) as u64;
    g.throughput(Throughput::Elements(attn_flops));
    g.bench_function("attention_forward_flops", |b| {
        b.iter(|| attention::attention(&qkv, dims, &mut probs, (&mut out, Round::No), false))
    });
    let dout = randv(n * D, 3, 1.0);
    let mut dqkv = vec![0.0; n * 3 * D];
    g.throughput(Throughput::Elements(2 * attn_flops));
    g.bench_function("attention_backward_flops", |b| {
        b.iter(|| {
            attention::attention_backward(&dout, &qkv, &probs, dims, (&mut dqkv, Round::No), false)
        })
    });

    let gamma = randv(D, 4, 1.0);
    let beta = randv(D, 5, 1.0);
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * D], vec![0.0; n], vec![0.0; n]);
    g.throughput(Throughput::Elements((n * D) as u64));
    g.bench_function("layernorm_forward", |b| {
        b.iter(|| {
            ops::layernorm(
                &x,
                &gamma,
                &beta,
                1e-6,
                (&mut y, Round::No),
                &mut mean,
                &mut rstd,
            )
        })
    });
    let (mut dx, mut dg, mut db) = (vec![0.0; n * D], vec![0.0; D], vec![0.0; D]);
    g.bench_function("layernorm_backward", |b| {
        b.iter(|| {
            ops::layernorm_backward(&dout, &x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db)
        })
    });
    let mut pre = x.clone();
    g.bench_function("bias_gelu", |b| {
        b.iter(|| ops::bias_gelu(&mut pre, &gamma, &mut y, (Round::No, Round::No)))
    });
    let samples: Vec<u64> = (0..B as u64).collect();
    let key = ferrovit::backend::DropoutKey {
        seed: 1,
        site: 2,
        per_sample: false,
    };
    g.bench_function("dropout_add", |b| {
        b.iter(|| {
            ops::dropout(
                &dout,
                0.1,
                key,
                &samples,
                simd::DropMode::AddTo(&x),
                &mut y,
                Round::No,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
