//! Mixup and CutMix with timm's semantics (`timm.data.Mixup(mixup_alpha, cutmix_alpha,
//! prob, switch_prob, mode='batch', correct_lam=True, label_smoothing)`).
//!
//! Per global batch: with probability `prob` the batch is mixed; when both alphas are
//! positive CutMix is chosen with probability `switch_prob`; lambda ~ Beta(alpha, alpha).
//! Mixup blends every image with the batch reversed (`lam·x + (1 − lam)·x.flip(0)`);
//! CutMix pastes a box of side `sqrt(1 − lam)` of the image's (centre uniform, clipped
//! to the image: timm's `rand_bbox`) from the reversed batch and corrects lambda to
//! `1 − box area / image area`. Targets are `lam·smooth(y) + (1 − lam)·smooth(y.flip(0))`
//! with label smoothing folded in ([`soft_targets`]).
//!
//! The draws come from a stream keyed by (seed, epoch, batch) ([`Mixup::batch_rng`]),
//! made in timm's order through [`MixDraws`], so every rank of every layout mixes a
//! global batch alike; the fixture test replays timm's draws through the same trait.
//! Unlike timm, an odd batch is allowed: its middle sample is its own partner.

pub use crate::backend::{Mix, MixBox};
use crate::rng::Rng;

/// The options: timm's `mixup_alpha`, `cutmix_alpha`, `prob`, `switch_prob`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mixup {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
}

/// The random draws of one batch, in the order timm makes them (`np.random.rand`,
/// `np.random.beta`, `np.random.randint`).
pub trait MixDraws {
    /// Uniform in [0, 1).
    fn rand(&mut self) -> f64;
    /// Beta(alpha, alpha).
    fn beta(&mut self, alpha: f64) -> f64;
    /// Uniform integer in [lo, hi).
    fn randint(&mut self, lo: i64, hi: i64) -> i64;
}

impl MixDraws for Rng {
    fn rand(&mut self) -> f64 {
        self.next_f64()
    }

    fn beta(&mut self, alpha: f64) -> f64 {
        Rng::beta(self, alpha)
    }

    fn randint(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo).max(1) as u64) as i64
    }
}

impl Mixup {
    /// Whether any mixing is configured (an alpha above 0 and a probability above 0).
    pub fn enabled(&self) -> bool {
        (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0) && self.prob > 0.0
    }

    /// The stream of global batch `batch` of `epoch`: independent of the layout.
    pub fn batch_rng(seed: u64, epoch: u64, batch: usize) -> Rng {
        let key = seed ^ 0x6d69_7875_705f_6375; // "mixup_cu"
        Rng::new(
            key ^ (epoch + 1).wrapping_mul(0xa076_1d64_78bd_642f)
                ^ (batch as u64 + 1).wrapping_mul(0xe703_7ed1_a0b4_28db),
        )
    }

    /// This batch's mix for `side` × `side` images, or `None` when it is left as it is
    /// (not drawn, or lambda 1): timm's `_params_per_batch` and `_mix_batch`.
    pub fn draw(&self, side: usize, d: &mut impl MixDraws) -> Option<Mix> {
        if !(self.enabled() && d.rand() < self.prob) {
            return None;
        }
        let (m, c) = (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0);
        let use_cutmix = match (m, c) {
            (true, true) => d.rand() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let lam = d.beta(alpha);
        if lam == 1.0 {
            return None;
        }
        if !use_cutmix {
            return Some(Mix { lam, cutmix: None });
        }
        let b = rand_bbox(side, lam, d);
        let area = ((b.y1 - b.y0) * (b.x1 - b.x0)) as f64;
        let lam = 1.0 - area / (side * side) as f64;
        Some(Mix {
            lam,
            cutmix: Some(b),
        })
    }
}

/// timm's `rand_bbox` without margin: a box of side `cut = int(side · sqrt(1 − lam))`,
/// `[c − cut // 2, c + (cut + 1) // 2)` about a uniform pixel `c`, clipped to the image.
fn rand_bbox(side: usize, lam: f64, d: &mut impl MixDraws) -> MixBox {
    let cut = (side as f64 * (1.0 - lam).sqrt()) as i64;
    let s = side as i64;
    let cy = d.randint(0, s);
    let cx = d.randint(0, s);
    let clip = |v: i64| v.clamp(0, s) as usize;
    MixBox {
        y0: clip(cy - cut / 2),
        y1: clip(cy + (cut + 1) / 2),
        x0: clip(cx - cut / 2),
        x1: clip(cx + (cut + 1) / 2),
    }
}

impl Mix {
    /// Mixes `images` (`[b, 3, side, side]`, normalised) with `partners`, row `i` of
    /// which is the partner of row `i` (the reversed global batch's row there).
    pub fn apply(&self, images: &mut [f32], partners: &[f32], side: usize) {
        match self.cutmix {
            None => {
                let (a, b) = self.factors();
                for (x, &p) in images.iter_mut().zip(partners) {
                    *x = *x * a + p * b;
                }
            }
            Some(bx) => {
                let plane = side * side;
                for (img, p) in images.chunks_mut(plane).zip(partners.chunks(plane)) {
                    for y in bx.y0..bx.y1 {
                        let row = y * side;
                        img[row + bx.x0..row + bx.x1].copy_from_slice(&p[row + bx.x0..row + bx.x1]);
                    }
                }
            }
        }
    }

    /// The class that contributes most to each sample's target (its own label when
    /// lambda ≥ 0.5, else its partner's): what train accuracy compares predictions with.
    pub fn dominant(&self, labels: &[usize], partners: &[usize]) -> Vec<usize> {
        match self.lam >= 0.5 {
            true => labels.to_vec(),
            false => partners.to_vec(),
        }
    }
}

/// timm's `mixup_target`: `[b, classes]` row-major soft targets
/// `lam·onehot_s(labels) + (1 − lam)·onehot_s(partners)`, where `onehot_s` puts
/// `1 − smoothing + smoothing/classes` at the label and `smoothing/classes` elsewhere.
pub fn soft_targets(
    labels: &[usize],
    partners: &[usize],
    lam: f64,
    classes: usize,
    smoothing: f64,
) -> Vec<f32> {
    let off = smoothing / classes as f64;
    let (on, off) = ((1.0 - smoothing + off) as f32, off as f32);
    let (a, b) = (lam as f32, (1.0 - lam) as f32);
    let mut out = Vec::with_capacity(labels.len() * classes);
    for (&y, &p) in labels.iter().zip(partners) {
        out.extend((0..classes).map(|k| {
            let v1 = if k == y { on } else { off };
            let v2 = if k == p { on } else { off };
            v1 * a + v2 * b
        }));
    }
    out
}

/// A share's mix: the batch's [`Mix`] and the labels of each sample's partner.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixed {
    pub mix: Mix,
    pub partners: Vec<usize>,
}

impl Mixed {
    /// Soft targets of rows `range` of the share, whose labels are `labels`.
    pub fn targets(
        &self,
        labels: &[usize],
        range: std::ops::Range<usize>,
        classes: usize,
        smoothing: f32,
    ) -> Vec<f32> {
        soft_targets(
            &labels[range.clone()],
            &self.partners[range],
            self.mix.lam,
            classes,
            smoothing as f64,
        )
    }
}
