//! The types the op set is written in: what [`super::Backend`]'s methods take besides
//! tensors. Every backend uses them; none owns them.

/// Geometry of one attention call. Only the first `queries` tokens attend (all
/// `tokens` serve as keys and values): `queries == tokens` is ordinary self-attention,
/// `queries == 1` is what the last block needs when only the cls token is read.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub tokens: usize,
    pub queries: usize,
    pub dim: usize,
    pub heads: usize,
}

/// Scalars of one Adam/AdamW step, with bias corrections already folded in.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW (decay the weights directly) rather than Adam (decay added to the gradient).
    pub decoupled: bool,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bias_correction2_sqrt: f32,
}

/// Scalars of one SGD step.
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    /// The momentum buffer is empty (first step): it starts as the gradient.
    pub first: bool,
}

/// Identifies one dropout mask: the run's seed and the dropout site (layer). The mask
/// bit of element `e` of sample `s` is a hash of (seed, site, s, e), so masks do not
/// depend on thread count, batch composition or parallel layout. With `per_sample`
/// (stochastic depth, timm's `DropPath`) every element of a sample takes element 0's
/// bit: the whole sample is kept or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub site: u64,
    pub per_sample: bool,
}

/// The part of every mask hash that depends only on the dropout site.
pub(crate) fn site_key(key: DropoutKey) -> u64 {
    mix64(mix64(key.seed) ^ key.site.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The splitmix64 finaliser: the hash dropout masks are built from.
#[inline(always)]
pub(crate) fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a random crop (as a shift) and a horizontal flip move one image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    pub dy: i32,
    pub dx: i32,
    pub flip: bool,
}

/// Per-channel normalisation: a pixel `v` (0..=255) becomes `(v / 255 - mean[c]) / std[c]`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10's per-channel mean and std (as torchvision tutorials use them): the
    /// default, and what checkpoints that record none were trained with.
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };

    /// Every mean finite, every std finite and positive; why not otherwise.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("mean {m} is not a finite number"));
        }
        match self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            Some(s) => Err(format!("std {s} must be a positive finite number")),
            None => Ok(()),
        }
    }
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::CIFAR10
    }
}

/// The augment op's input: a batch of raw square images and how to crop, flip and
/// normalise each (data/ builds it; the backend does the work where the model is).
#[derive(Clone, Copy, Debug)]
pub struct AugmentBatch<'a> {
    /// `[b, 3, side, side]` planar `u8` pixels.
    pub pixels: &'a [u8],
    /// The images' side in pixels.
    pub side: usize,
    /// Each sample's crop and flip: the image shifted by (`dy`, `dx`) with zeros shifted
    /// in, then mirrored if `flip`.
    pub geometry: &'a [Geometry],
    /// How a pixel becomes an input value.
    pub norm: Normalize,
    /// Mixup/CutMix fused in (`None`: each image as it is).
    pub mix: Option<AugmentMix<'a>>,
}

impl AugmentBatch<'_> {
    /// Images the op writes: one per partner under mixing (the pixels may hold partner
    /// rows past them), else one per geometry.
    pub fn outputs(&self) -> usize {
        match &self.mix {
            Some(m) => m.partner.len(),
            None => self.geometry.len(),
        }
    }
}

/// Mixup/CutMix in the augment op: output image `i` is the augmented image `i` mixed
/// with the augmented image `partner[i]` (rows of the same pixels and geometry) as `mix`
/// says: the normalised values blended `lam·own + (1 − lam)·partner` (each factor
/// rounded to f32 once), or the partner's inside CutMix's box.
#[derive(Clone, Copy, Debug)]
pub struct AugmentMix<'a> {
    pub mix: Mix,
    pub partner: &'a [u32],
}

/// A CutMix box: rows `y0..y1`, columns `x0..x1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixBox {
    pub y0: usize,
    pub y1: usize,
    pub x0: usize,
    pub x1: usize,
}

/// How one batch is mixed: the (corrected) lambda, and CutMix's box (`None`: Mixup).
/// data::mixup draws it; the augment op may apply it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub lam: f64,
    pub cutmix: Option<MixBox>,
}

impl Mix {
    /// Mixup's two factors, `lam` and `1 − lam`, each rounded to f32 once.
    pub fn factors(&self) -> (f32, f32) {
        (self.lam as f32, (1.0 - self.lam) as f32)
    }
}
