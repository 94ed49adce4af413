//! Achieved bandwidth of the memory-bound CUDA kernels at a large size, next to the
//! device's own copy bandwidth (the roofline they are judged against: docs/PERFORMANCE.md
//! targets >= 70% of it). Needs a GPU; without one it says so and measures nothing
//! (the emulated device's speed means nothing). scripts/gpu-check.sh runs it.

use criterion::{criterion_group, criterion_main, Bencher, Criterion, Throughput};
use ferrovit::backend::{for_device, AdamStep, AttnDims, DropoutKey, DropoutMode};
use ferrovit::{DType, Device, Tensor};
use std::time::{Duration, Instant};

/// 64 Mi elements: 256 MiB per f32 buffer, far beyond the L2 cache.
const N: usize = 64 << 20;

/// Times `op` from the host, waiting for the device before and after the iterations.
fn on_device(bch: &mut Bencher, device: Device, op: &mut dyn FnMut()) {
    bch.iter_custom(|iters| {
        device.synchronize().unwrap();
        let t0 = Instant::now();
        for _ in 0..iters {
            op();
        }
        device.synchronize().unwrap();
        t0.elapsed()
    })
}

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
        g.bench_function(name, |bch| on_device(bch, device, op));
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
    let key = DropoutKey {
        seed: 1,
        site: 2,
        per_sample: false,
    };
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
    // bf16 storage (mixed precision): half the bytes of the activations
    let h = 2 * N;
    let (a16, mut pre16, mut out16) = (
        a.to_dtype(DType::BF16),
        a.to_dtype(DType::BF16),
        a.to_dtype(DType::BF16),
    );
    run("cast f32 -> bf16", f + h, &mut || {
        ferrovit::backend::cuda::get(id)
            .backend
            .cast(&a, &mut out16)
            .unwrap()
    });
    run("bias_gelu bf16", 3 * h, &mut || {
        be.bias_gelu(&mut pre16, &bias, &mut out16).unwrap()
    });
    let g16 = b.to_dtype(DType::BF16);
    run("gelu_backward bf16", 3 * h, &mut || {
        be.gelu_backward(&g16, &a16, &mut pre16).unwrap()
    });
    run("layernorm (bf16 out)", f + h, &mut || {
        be.layernorm(&a, &gamma, &beta, 1e-6, &mut out16, &mut mean, &mut rstd)
            .unwrap()
    });
    run("dropout bf16", 2 * h, &mut || {
        be.dropout(&a16, 0.1, key, &samples, DropoutMode::Write, &mut out16)
            .unwrap()
    });
    g.finish();

    // The compute-heavier kernels at vit_lite_depth7_patch4_32's shapes, batch 512
    // (65 tokens, dim 256, 4 heads): time per call (no roofline: they are not purely
    // memory bound).
    let mut g = c.benchmark_group("cuda vit_lite batch 512");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    let (b, t, d, heads) = (512, 65, 256, 4);
    let dims = AttnDims {
        batch: b,
        tokens: t,
        queries: t,
        dim: d,
        heads,
    };
    let qkv = Tensor::full([b, t, 3 * d], 0.01, device);
    let mut att = Tensor::zeros([b, t, d], device);
    let mut lse = Tensor::zeros([be.attention_saved_len(dims)], device);
    let mut dqkv = Tensor::zeros([b, t, 3 * d], device);
    let mut timed = |name: &str, op: &mut dyn FnMut()| {
        g.bench_function(name, |bch| on_device(bch, device, op));
    };
    timed("attention forward", &mut || {
        be.attention(&qkv, dims, &mut lse, &mut att).unwrap()
    });
    let dout = Tensor::full([b, t, d], 0.01, device);
    timed("attention backward", &mut || {
        be.attention_backward(&dout, &qkv, &lse, dims, &mut dqkv, true)
            .unwrap()
    });
    let (qkv16, mut att16) = (qkv.to_dtype(DType::BF16), att.to_dtype(DType::BF16));
    timed("attention forward (bf16 qkv)", &mut || {
        be.attention(&qkv16, dims, &mut lse, &mut att16).unwrap()
    });
    // as in training: dout bf16, qkv's gradient written in bf16
    let (dout16, mut dqkv16) = (dout.to_dtype(DType::BF16), dqkv.to_dtype(DType::BF16));
    timed("attention backward (bf16)", &mut || {
        be.attention_backward(&dout16, &qkv16, &lse, dims, &mut dqkv16, false)
            .unwrap()
    });
    let rows = b * t;
    let x = Tensor::full([rows, d], 0.3, device);
    let (gamma, beta) = (
        Tensor::full([d], 1.0, device),
        Tensor::full([d], 0.0, device),
    );
    let (mut y, mut mean, mut rstd) = (
        x.clone(),
        Tensor::zeros([rows], device),
        Tensor::zeros([rows], device),
    );
    be.layernorm(&x, &gamma, &beta, 1e-6, &mut y, &mut mean, &mut rstd)
        .unwrap();
    let (mut dx, mut dg, mut db) = (x.clone(), gamma.clone(), beta.clone());
    timed("layernorm backward", &mut || {
        be.layernorm_backward(&x, &x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db)
            .unwrap()
    });
    let dy16 = x.to_dtype(DType::BF16);
    timed("layernorm backward (bf16 dy)", &mut || {
        be.layernorm_backward(&dy16, &x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db)
            .unwrap()
    });
    timed("bias_grad (bf16 dy)", &mut || {
        be.bias_grad(&dy16, &mut db).unwrap()
    });
    let w = Tensor::full([3 * d, d], 0.01, device);
    let mut out = Tensor::zeros([rows, 3 * d], device);
    timed("qkv GEMM (cuBLAS, f32)", &mut || {
        be.matmul(&mut out, &x, false, &w, true, (rows, 3 * d, d), false)
            .unwrap()
    });
    let (x16, w16) = (x.to_dtype(DType::BF16), w.to_dtype(DType::BF16));
    let mut out16 = out.to_dtype(DType::BF16);
    timed("qkv GEMM (cuBLAS, bf16)", &mut || {
        be.matmul(&mut out16, &x16, false, &w16, true, (rows, 3 * d, d), false)
            .unwrap()
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
