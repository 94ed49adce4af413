//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferrovit::rng::Rng;
use ferrovit::Tensor;

/// A tensor of standard-normal values (never all zeros) from `seed`.
pub fn randn(dims: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n = dims.iter().product();
    Tensor::from_vec(r.vec(n, |r| r.normal()), dims).expect("shape matches")
}

/// Largest |a - b| relative to the largest |b| (plus a floor), with the index.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / scale)
        .enumerate()
        .fold(
            (0.0, 0),
            |(m, mi), (i, e)| if e > m { (e, i) } else { (m, mi) },
        )
}

/// Runs the `ferrovit` binary: (success, stdout, stderr).
pub fn ferrovit(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovit"))
        .args(args)
        .output()
        .expect("run ferrovit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh, empty temporary directory unique to this test process and `name`.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovit-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Flags of a one-block, width-32 model: a training epoch on the digits takes ~1 s.
pub const TINY: [&str; 6] = ["--dim", "32", "--depth", "1", "--mlp-dim", "32"];
