//! A small seeded generator (SplitMix64) for initialisation and test data.
//!
//! Its output is fixed by this file, not by a dependency's version, so a seed means
//! the same weights on every machine and every release — which reproducible runs and
//! checkpoint tests rely on.

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        (lo as f64 + (hi - lo) as f64 * self.next_f64()) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Normal with standard deviation `std`, redrawn until within ±2 std (PyTorch's
    /// `trunc_normal_(std=std)` as timm uses it with a = -2 std, b = 2 std).
    pub fn trunc_normal(&mut self, std: f32) -> f32 {
        loop {
            let z = self.normal();
            if z.abs() <= 2.0 {
                return z * std;
            }
        }
    }

    /// Gamma(shape, 1) in log space, for `shape` > 0 (Marsaglia and Tsang; a shape
    /// below 1 through Gamma(shape + 1) · U^(1/shape)), so tiny shapes do not
    /// underflow to 0.
    pub fn ln_gamma_variate(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.next_f64(); // (0, 1]
            return self.ln_gamma_variate(shape + 1.0) + u.ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal() as f64;
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.next_f64();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return (d * v).ln();
            }
        }
    }

    /// Beta(alpha, alpha) for `alpha` > 0, as X / (X + Y) with X, Y ~ Gamma(alpha).
    pub fn beta(&mut self, alpha: f64) -> f64 {
        let (x, y) = (self.ln_gamma_variate(alpha), self.ln_gamma_variate(alpha));
        1.0 / (1.0 + (y - x).exp())
    }

    /// `n` values from `f`.
    pub fn vec(&mut self, n: usize, mut f: impl FnMut(&mut Rng) -> f32) -> Vec<f32> {
        (0..n).map(|_| f(self)).collect()
    }
}
