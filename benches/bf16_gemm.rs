//! The CPU's bf16 GEMM against its f32 GEMM on a training step's shapes
//! (`vit_lite_depth7_patch4_32` at batch 128: 8,320 tokens, dim 256, MLP 512), in
//! FLOP/s: the `vdpbf16ps` path (where the CPU has AVX512-BF16; skipped and said so
//! otherwise) against f32 operands (which is what the widened path runs: the CPU holds
//! bf16 activations widened in f32). Run with
//! `cargo bench --bench bf16_gemm`; docs/PERFORMANCE.md has the figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrovit::backend::cpu::bf16gemm::{self, Bf16Path};
use ferrovit::backend::gemm::{self, Mat, Par};
use ferrovit::rng::Rng;
use half::bf16;
use std::time::Duration;

const TOKENS: usize = 128 * 65;
const DIM: usize = 256;
const MLP: usize = 512;

/// (name, m, n, k, a transposed, b transposed): the forward fc1 product, the backward
/// input-gradient product of fc1 and fc1's weight-gradient product.
const SHAPES: [(&str, usize, usize, usize, bool, bool); 3] = [
    ("fc1_forward", TOKENS, MLP, DIM, false, true),
    ("fc1_input_grad", TOKENS, DIM, MLP, false, false),
    ("fc1_weight_grad", MLP, DIM, TOKENS, true, false),
];

fn view(t: bool, rows: usize, cols: usize) -> Mat {
    match t {
        true => Mat::dense(cols, rows).t(),
        false => Mat::dense(rows, cols),
    }
}

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("bf16_gemm");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    if !bf16gemm::has_dot() {
        eprintln!("SKIPPED the vdpbf16ps path: this CPU has no AVX512-BF16");
    }
    for (name, m, n, k, ta, tb) in SHAPES {
        let a = Rng::new(1).vec(m * k, |r| r.normal());
        let b = Rng::new(2).vec(k * n, |r| r.normal() * 0.05);
        // bf16 values held widened, as the CPU holds bf16 activations
        let (ah, bh): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            b.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        );
        let (va, vb) = (view(ta, m, k), view(tb, k, n));
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(format!("{name}_f32_flops"), |bch| {
            let d = Mat::dense(m, n);
            bch.iter(|| gemm::matmul_views(&mut out, d, &a, va, &b, vb, false, Par::Pool))
        });
        if bf16gemm::has_dot() {
            g.bench_function(format!("{name}_bf16_dot_flops"), |bch| {
                bch.iter(|| {
                    bf16gemm::matmul_with(
                        Bf16Path::Dot,
                        &mut out,
                        &ah,
                        va,
                        &bh,
                        vb,
                        false,
                        Par::Pool,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
