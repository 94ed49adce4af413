//! Achieved bandwidth of the memory-bound CUDA kernels at a large size, next to the
//! device's own copy bandwidth (the roofline they are judged against: docs/PERFORMANCE.md
//! targets >= 70% of it). Needs a GPU; without one it says so and measures nothing
//! (the emulated device's speed means nothing). scripts/gpu-check.sh runs it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrovit::backend::cuda::synchronize;
use ferrovit::backend::{for_device, AdamStep, DropoutKey, DropoutMode};
use ferrovit::{Device, Tensor};
use std::time::{Duration, Instant};

/// 64 Mi elements: 256 MiB per f32 buffer, far beyond the L2 cache.
const N: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let device = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            return;
        }
    };
    let be = for_device(device);
    let t = |v: f32| Tensor::full([N], v, device);
    let (a, b) = (t(0.5), t(0.25));
    let mut out = t(0.0);
    let mut g = c.benchmark_group("cuda");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    let mut run = |name: &str, bytes: usize, op: &mut dyn FnMut()| {
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(name, |bch| {
            bch.iter_custom(|iters| {
                synchronize(device).unwrap();
                let t0 = Instant::now();
                for _ in 0..iters {
                    op();
                }
                synchronize(device).unwrap();
                t0.elapsed()
            })
        });
    };
    let f = 4 * N;
    let Device::Cuda(id) = device else {
        unreachable!("opened a CUDA device")
    };
    let gpu = &ferrovit::backend::cuda::get(id).gpu;
    let (src, dst) = (a.cuda_ptr().unwrap(), out.cuda_ptr_mut().unwrap());
    run("copy (device memcpy, the baseline)", 2 * f, &mut || {
        gpu.copy(dst, src, f).unwrap()
    });
    let mut x = a.clone();
    run("scale", 2 * f, &mut || be.scale(&mut x, 1.0).unwrap());
    run("add", 3 * f, &mut || be.add(&a, &b, &mut out).unwrap());
    let bias = Tensor::full([256], 0.1, device);
    let mut pre = a.clone();
    run("bias_gelu", 3 * f, &mut || {
        be.bias_gelu(&mut pre, &bias, &mut out).unwrap()
    });
    run("gelu_backward", 3 * f, &mut || {
        be.gelu_backward(&a, &b, &mut out).unwrap()
    });
    let rows = N / 256;
    let (gamma, beta) = (
        Tensor::full([256], 1.0, device),
        Tensor::full([256], 0.0, device),
    );
    let (mut mean, mut rstd) = (Tensor::zeros([rows], device), Tensor::zeros([rows], device));
    run("layernorm", 2 * f, &mut || {
        be.layernorm(&a, &gamma, &beta, 1e-6, &mut out, &mut mean, &mut rstd)
            .unwrap()
    });
    let samples: Vec<u64> = (0..512).collect();
    let key = DropoutKey { seed: 1, site: 2 };
    run("dropout + residual", 3 * f, &mut || {
        be.dropout(&a, 0.1, key, &samples, DropoutMode::AddTo(&b), &mut out)
            .unwrap()
    });
    let (mut p, mut m, mut v) = (a.clone(), t(0.0), t(0.0));
    let step = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
        decoupled: true,
        step_size: 1e-3,
        bias_correction2_sqrt: 1.0,
    };
    run("adamw", 7 * f, &mut || {
        be.adam(&mut p, &b, &mut m, &mut v, step).unwrap()
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
