//! The Vision Transformer and its named presets.

use super::{Attention, Init, LayerNorm, Linear, Mlp};
use crate::autograd::{Activation, Graph, Out, ParamId, ParamStore, Var};
use crate::backend::DropoutKey;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Architecture hyper-parameters of a ViT.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_classes: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of each MLP (dim × MLP ratio).
    pub mlp_dim: usize,
    /// Dropout after the embedding, the attention output projection, the MLP's GELU
    /// and the MLP output.
    pub dropout: f32,
    /// Stochastic depth (timm's `drop_path_rate`): block `i`'s two residual branches
    /// are dropped per sample with probability `drop_path · i / (depth − 1)`.
    pub drop_path: f32,
    pub layernorm_eps: f32,
}

/// The first stochastic-depth mask site (dropout's are `0..=3 · depth`).
const DROP_PATH_SITES: u64 = 1 << 32;

/// Named presets with the hyper-parameters of Colossal-AI's model zoo.
pub const PRESETS: &[&str] = &["vit_tiny_patch4_32", "vit_lite_depth7_patch4_32"];

impl VitConfig {
    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<VitConfig> {
        let (dim, depth, heads, mlp_ratio) = match name {
            "vit_tiny_patch4_32" => (512, 6, 8, 1),
            "vit_lite_depth7_patch4_32" => (256, 7, 4, 2),
            _ => {
                return Err(Error::Config(format!(
                    "unknown preset `{name}` (known: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(VitConfig {
            image_size: 32,
            patch_size: 4,
            in_channels: 3,
            num_classes: 10,
            dim,
            depth,
            heads,
            mlp_dim: dim * mlp_ratio,
            dropout: 0.1,
            drop_path: 0.0,
            layernorm_eps: 1e-6,
        })
    }

    /// Block `i`'s stochastic-depth rate: `drop_path · i / (depth − 1)`, rising
    /// linearly from 0 (timm's `torch.linspace(0, drop_path_rate, depth)`). It depends
    /// on the global block index only, so every pipeline split agrees.
    pub fn drop_path_rate(&self, i: usize) -> f32 {
        if self.depth < 2 {
            return 0.0;
        }
        (self.drop_path as f64 * i as f64 / (self.depth - 1) as f64) as f32
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Sequence length: patches plus the cls token.
    pub fn tokens(&self) -> usize {
        self.num_patches() + 1
    }

    /// Rejects configurations that cannot build a model, naming the field: zero or
    /// out-of-range sizes (see [`VitConfig::LIMITS`]), sizes that do not divide, a
    /// dropout outside [0, 1), a non-positive epsilon, and a model whose parameter count
    /// overflows or exceeds [`VitConfig::MAX_PARAMS`]. Flags, config files, checkpoints
    /// and imports all go through this one check before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            self.image_size,
            self.patch_size,
            self.in_channels,
            self.num_classes,
            self.dim,
            self.depth,
            self.heads,
            self.mlp_dim,
        ];
        for (v, (field, max)) in sizes.into_iter().zip(VitConfig::LIMITS) {
            if v == 0 || v > max {
                return Err(Error::Config(format!(
                    "model {field} {v} is outside 1..={max}"
                )));
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::Config(format!(
                "image_size {} is not divisible by patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(Error::Config(format!(
                "dim {} is not divisible by heads {}",
                self.dim, self.heads
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(Error::Config(format!(
                "drop_path {} is outside [0, 1)",
                self.drop_path
            )));
        }
        if !(self.layernorm_eps > 0.0 && self.layernorm_eps < 1.0) {
            return Err(Error::Config(format!(
                "layernorm_eps {} is outside (0, 1)",
                self.layernorm_eps
            )));
        }
        match self.checked_num_params() {
            Some(n) if n <= VitConfig::MAX_PARAMS => Ok(()),
            n => Err(Error::Config(format!(
                "the model would have {} parameters (at most {} are supported): dim {}, depth {}, mlp_dim {}, num_classes {}, image_size {}",
                n.map_or("more than 2^64".into(), |n| n.to_string()),
                VitConfig::MAX_PARAMS,
                self.dim,
                self.depth,
                self.mlp_dim,
                self.num_classes,
                self.image_size
            ))),
        }
    }

    /// The largest value each size field may take, in the order of the struct. Far
    /// above any ViT that trains on CIFAR-style data, and small enough that no product
    /// of them overflows 64 bits and one image's activations fit in memory.
    pub const LIMITS: [(&'static str, usize); 8] = [
        ("image_size", 1024),
        ("patch_size", 1024),
        ("in_channels", 64),
        ("num_classes", 1 << 20),
        ("dim", 1 << 16),
        ("depth", 1024),
        ("heads", 1024),
        ("mlp_dim", 1 << 18),
    ];

    /// Validates the config and refuses it when `bytes_per_param` × its parameters (for
    /// `what`) exceed this machine's memory: checked before anything is allocated.
    pub fn check_fits(&self, bytes_per_param: u64, what: &str) -> Result<()> {
        self.check_fits_in(
            bytes_per_param,
            what,
            crate::backend::cpu::physical_memory(),
        )
    }

    /// [`VitConfig::check_fits`] against `have` bytes (`None`: unknown, no limit).
    pub fn check_fits_in(&self, bytes_per_param: u64, what: &str, have: Option<u64>) -> Result<()> {
        self.validate()?;
        let params = self.checked_num_params().unwrap_or(u64::MAX);
        let need = params.saturating_mul(bytes_per_param);
        match have {
            Some(have) if need > have => Err(Error::Config(format!(
                "the model's {params} parameters need {:.1} GiB for {what}; this machine has {:.1} GiB",
                need as f64 / f64::from(1 << 30),
                have as f64 / f64::from(1 << 30)
            ))),
            _ => Ok(()),
        }
    }

    /// The most parameters a model may have (16 G: 64 GiB of f32 weights).
    pub const MAX_PARAMS: u64 = 1 << 34;

    /// Number of trainable scalars, computed from the architecture alone. Call on a
    /// validated config (an unvalidated one may overflow: see
    /// [`VitConfig::checked_num_params`]).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(u64::MAX) as usize
    }

    /// [`VitConfig::num_params`] in checked arithmetic: `None` when it overflows.
    pub fn checked_num_params(&self) -> Option<u64> {
        let u = |v: usize| u64::try_from(v).ok();
        let (d, h) = (u(self.dim)?, u(self.mlp_dim)?);
        let (c, p) = (u(self.in_channels)?, u(self.patch_size)?);
        let tokens = (u(self.image_size)? / p.max(1))
            .checked_pow(2)?
            .checked_add(1)?;
        let classes = u(self.num_classes)?;
        let patch = d
            .checked_mul(c)?
            .checked_mul(p.checked_mul(p)?)?
            .checked_add(d)?;
        let block = [
            4u64.checked_mul(d)?,
            d.checked_mul(d)?.checked_add(d)?.checked_mul(3)?,
            d.checked_mul(d)?.checked_add(d)?,
            h.checked_mul(d)?.checked_add(h)?,
            d.checked_mul(h)?.checked_add(d)?,
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add)?;
        [
            patch,
            d,
            tokens.checked_mul(d)?,
            u(self.depth)?.checked_mul(block)?,
            d.checked_mul(2)?,
            classes.checked_mul(d)?.checked_add(classes)?,
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add)
    }
}

/// How one forward pass runs: training (dropout on) or evaluation, the dropout seed
/// of this step, and the global index of each sample in the batch (dropout masks are
/// keyed by them, so they do not depend on batch composition or layout).
#[derive(Clone, Debug)]
pub struct ForwardCtx {
    pub train: bool,
    pub seed: u64,
    pub samples: Arc<[u64]>,
}

impl ForwardCtx {
    pub fn eval(batch: usize) -> Self {
        ForwardCtx {
            train: false,
            seed: 0,
            samples: (0..batch as u64).collect(),
        }
    }

    pub fn train(seed: u64, samples: impl Into<Arc<[u64]>>) -> Self {
        ForwardCtx {
            train: true,
            seed,
            samples: samples.into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

#[derive(Clone, Debug)]
struct Embed {
    patch_embed: Linear,
    cls_token: ParamId,
    pos_embed: ParamId,
}

#[derive(Clone, Debug)]
struct Head {
    norm: LayerNorm,
    head: Linear,
}

/// Which part of the model one pipeline stage holds: the embedding (first stage), a
/// contiguous range of blocks (global indices), the final norm and head (last stage).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub embed: bool,
    pub blocks: std::ops::Range<usize>,
    pub head: bool,
}

impl Part {
    /// The whole model.
    pub fn whole(depth: usize) -> Part {
        Part {
            embed: true,
            blocks: 0..depth,
            head: true,
        }
    }
}

/// What a model part starts from: images (the part with the embedding) or the hidden
/// states `[b, tokens, dim]` the previous stage produced.
pub enum PartInput {
    Images(Tensor),
    Hidden(Var),
}

/// A ViT: patch embedding, cls token and learned position embedding, pre-LayerNorm
/// blocks, a final LayerNorm and a linear head on the cls token. A pipeline stage
/// holds a [`Part`] of it; parameters keep their global names.
#[derive(Clone, Debug)]
pub struct Vit {
    pub config: VitConfig,
    pub part: Part,
    embed: Option<Embed>,
    /// Indexed by global block number; `None` for blocks other stages hold.
    blocks: Vec<Option<Block>>,
    head: Option<Head>,
}

impl Vit {
    /// Builds the model, registering its parameters under their global names
    /// (`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.{i}.…`, `norm.*`,
    /// `head.*`) in `store`, initialised from `seed`.
    pub fn new(config: &VitConfig, store: &mut ParamStore, seed: u64) -> Result<Vit> {
        Vit::new_part(config, store, seed, Part::whole(config.depth))
    }

    /// Builds only `part` of the model, registering only its parameters. They get the
    /// same values as in the whole model from the same seed (the parts other stages
    /// hold are drawn too, and dropped), so any split starts from the same network.
    pub fn new_part(
        config: &VitConfig,
        store: &mut ParamStore,
        seed: u64,
        part: Part,
    ) -> Result<Vit> {
        Vit::build(config, store, &mut Init::random(seed), part)
    }

    /// The whole model with zero parameters that take no memory until written: for a
    /// caller that replaces every value at once (loading a checkpoint for inference).
    pub fn skeleton(config: &VitConfig, store: &mut ParamStore) -> Result<Vit> {
        Vit::build(config, store, &mut Init::zeros(), Part::whole(config.depth))
    }

    /// The names and shapes of the parameters [`Vit::new`] registers, in its order,
    /// from the configuration alone: no tensor is allocated (a checkpoint's index is
    /// checked against them). `tests/core/vit.rs` holds them equal to the model's.
    pub fn param_shapes(config: &VitConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        let c = config;
        let d = c.dim;
        // a linear layer's weight and bias; a LayerNorm's are those of weight `[d]`
        let linear = |p: &str, w: Vec<usize>| {
            let bias = vec![w[0]];
            [(format!("{p}.weight"), w), (format!("{p}.bias"), bias)]
        };
        let patch = vec![d, c.in_channels, c.patch_size, c.patch_size];
        let mut v = linear("patch_embed.proj", patch).to_vec();
        v.push(("cls_token".into(), vec![1, 1, d]));
        v.push(("pos_embed".into(), vec![1, c.tokens(), d]));
        for i in 0..c.depth {
            let p = format!("blocks.{i}");
            v.extend(linear(&format!("{p}.norm1"), vec![d]));
            v.extend(linear(&format!("{p}.attn.qkv"), vec![3 * d, d]));
            v.extend(linear(&format!("{p}.attn.proj"), vec![d, d]));
            v.extend(linear(&format!("{p}.norm2"), vec![d]));
            v.extend(linear(&format!("{p}.mlp.fc1"), vec![c.mlp_dim, d]));
            v.extend(linear(&format!("{p}.mlp.fc2"), vec![d, c.mlp_dim]));
        }
        v.extend(linear("norm", vec![d]));
        v.extend(linear("head", vec![c.num_classes, d]));
        Ok(v)
    }

    fn build(
        config: &VitConfig,
        store: &mut ParamStore,
        rng: &mut Init,
        part: Part,
    ) -> Result<Vit> {
        config.validate()?;
        let c = config;
        if part.blocks.end > c.depth || (part.head && part.blocks.is_empty()) {
            return Err(Error::Config(format!(
                "model part with blocks {:?} does not fit a depth of {}",
                part.blocks, c.depth
            )));
        }
        let d = c.dim;
        // The store a component goes to: the real one if this part holds it.
        fn to<'a>(
            own: bool,
            store: &'a mut ParamStore,
            scratch: &'a mut ParamStore,
        ) -> &'a mut ParamStore {
            *scratch = ParamStore::new();
            if own {
                store
            } else {
                scratch
            }
        }
        let mut scratch = ParamStore::new();
        let s = to(part.embed, store, &mut scratch);
        let patch_embed = Linear::new(
            s,
            "patch_embed.proj",
            &[d, c.in_channels, c.patch_size, c.patch_size],
            rng,
        )?;
        let cls = Tensor::from_vec(rng.vec(d, |r| r.normal() * 1e-6), [1, 1, d])?;
        let cls_token = s.add("cls_token", cls)?;
        let pos = Tensor::from_vec(
            rng.vec(c.tokens() * d, |r| r.trunc_normal(0.02)),
            [1, c.tokens(), d],
        )?;
        let pos_embed = s.add("pos_embed", pos)?;
        let embed = part.embed.then_some(Embed {
            patch_embed,
            cls_token,
            pos_embed,
        });
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let own = part.blocks.contains(&i);
            let s = to(own, store, &mut scratch);
            let p = format!("blocks.{i}");
            let block = Block {
                norm1: LayerNorm::new(s, &format!("{p}.norm1"), d, c.layernorm_eps)?,
                attn: Attention::new(s, &format!("{p}.attn"), d, c.heads, rng)?,
                norm2: LayerNorm::new(s, &format!("{p}.norm2"), d, c.layernorm_eps)?,
                mlp: Mlp::new(s, &format!("{p}.mlp"), d, c.mlp_dim, rng)?,
            };
            blocks.push(own.then_some(block));
        }
        let s = to(part.head, store, &mut scratch);
        let norm = LayerNorm::new(s, "norm", d, c.layernorm_eps)?;
        let head = Linear::new(s, "head", &[c.num_classes, d], rng)?;
        Ok(Vit {
            config: c.clone(),
            part: part.clone(),
            embed,
            blocks,
            head: part.head.then_some(Head { norm, head }),
        })
    }

    /// Whether parameter `name` belongs to this part (names of no part, such as
    /// blocks beyond the depth, belong to the part with the head).
    pub fn owns(&self, name: &str) -> bool {
        let block = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        match block {
            Some(i) if i < self.config.depth => self.part.blocks.contains(&i),
            Some(_) => self.part.head,
            None if ["patch_embed.", "cls_token", "pos_embed"]
                .iter()
                .any(|p| name.starts_with(p)) =>
            {
                self.part.embed
            }
            None => self.part.head,
        }
    }

    /// Runs this part: from images (a part with the embedding) or the previous stage's
    /// hidden states, to logits `[b, classes]` (a part with the head) or hidden states
    /// `[b, tokens, dim]` for the next stage.
    pub fn forward_part(&self, g: &mut Graph, input: PartInput, ctx: &ForwardCtx) -> Result<Var> {
        let x = match input {
            PartInput::Images(images) => self.embed(g, images, ctx)?,
            PartInput::Hidden(x) => x,
        };
        let r = self.part.blocks.clone();
        if self.part.head {
            let x = self.blocks(g, x, r.start..r.end - 1, ctx)?;
            let cls = self.block_cls(g, x, r.end - 1, ctx)?;
            self.head_cls(g, cls)
        } else {
            self.blocks(g, x, r, ctx)
        }
    }

    /// Logits `[b, num_classes]` for images `[b, c, h, w]`.
    ///
    /// The logits read only the cls token of the last block, so that block runs its
    /// attention query, projection and MLP for the cls token alone (keys and values
    /// still cover every token). This gives the same logits as running the block on all
    /// tokens (see [`Vit::forward_features`]) and saves about 8% of the model's FLOPs.
    pub fn forward(&self, g: &mut Graph, images: Tensor, ctx: &ForwardCtx) -> Result<Var> {
        if self.part != Part::whole(self.config.depth) {
            return Err(self.missing("the whole model"));
        }
        self.forward_part(g, PartInput::Images(images), ctx)
    }

    /// The error for a component this part does not hold.
    fn missing(&self, what: &str) -> Error {
        Error::Config(format!(
            "{what} is not in this model part (embedding: {}, blocks {:?}, head: {})",
            self.part.embed, self.part.blocks, self.part.head
        ))
    }

    /// Features `[b, tokens, dim]` of every token after the last block.
    pub fn forward_features(&self, g: &mut Graph, images: Tensor, ctx: &ForwardCtx) -> Result<Var> {
        let x = self.embed(g, images, ctx)?;
        self.blocks(g, x, 0..self.blocks.len(), ctx)
    }

    /// Patch embedding, cls token, position embedding (and embedding dropout).
    pub fn embed(&self, g: &mut Graph, images: Tensor, ctx: &ForwardCtx) -> Result<Var> {
        let c = &self.config;
        let want = [c.in_channels, c.image_size, c.image_size];
        if images.dims().len() != 4 || images.dims()[1..] != want {
            return Err(Error::shape(
                "Vit::forward images",
                format!("[batch, {}, {}, {}]", want[0], want[1], want[2]),
                images.shape(),
            ));
        }
        if images.dims()[0] != ctx.samples.len() {
            return Err(Error::shape(
                "Vit::forward",
                format!("{} sample ids", images.dims()[0]),
                ctx.samples.len(),
            ));
        }
        let e = self
            .embed
            .as_ref()
            .ok_or_else(|| self.missing("the embedding"))?;
        let img = g.input(images);
        let patches = g.patchify(img, c.patch_size)?;
        let tokens = e.patch_embed.forward(g, patches, Activation::None)?;
        let (cls, pos) = (g.param(e.cls_token), g.param(e.pos_embed));
        let x = g.embed(tokens, cls, pos)?;
        self.dropout(g, x, 0, ctx)
    }

    /// Transformer blocks `range` (global indices), for a pipeline stage or the whole model.
    pub fn blocks(
        &self,
        g: &mut Graph,
        mut x: Var,
        range: std::ops::Range<usize>,
        ctx: &ForwardCtx,
    ) -> Result<Var> {
        for i in range {
            x = self.block(g, x, i, ctx, false)?;
        }
        Ok(x)
    }

    /// Block `i` computed for the cls token only: `[b, t, d]` → `[b, 1, d]`.
    pub fn block_cls(&self, g: &mut Graph, x: Var, i: usize, ctx: &ForwardCtx) -> Result<Var> {
        self.block(g, x, i, ctx, true)
    }

    /// One pre-LayerNorm block; with `cls_only`, only token 0 queries and continues.
    /// Dropout masks are keyed by the element's index within its sample, and token 0's
    /// elements come first, so both forms apply the same masks to the cls token.
    fn block(
        &self,
        g: &mut Graph,
        x: Var,
        i: usize,
        ctx: &ForwardCtx,
        cls_only: bool,
    ) -> Result<Var> {
        let b = self
            .blocks
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| self.missing(&format!("block {i}")))?;
        let site = 1 + 3 * i as u64;
        // Under mixed precision the LayerNorm outputs, qkv, the attention output, the
        // MLP's hidden layer and both branches added to the residual stream (the
        // projection's and fc2's outputs, as under PyTorch's autocast) are stored in
        // bf16; the residual stream x stays f32.
        let h = b.norm1.forward(g, x, Out::Compute)?;
        let qkv = b
            .attn
            .qkv
            .forward_to(g, h, Activation::None, Out::Compute)?;
        let (a, x) = if cls_only {
            (g.attention_queries(qkv, b.attn.heads, 1)?, g.select_cls(x)?)
        } else {
            (g.attention(qkv, b.attn.heads)?, x)
        };
        let h = b
            .attn
            .proj
            .forward_to(g, a, Activation::None, Out::Compute)?;
        let x = self.residual(g, x, h, (i, 0), site, ctx)?;
        let h = b.norm2.forward(g, x, Out::Compute)?;
        let h = b.mlp.fc1.forward_to(g, h, Activation::Gelu, Out::Compute)?;
        let h = self.dropout(g, h, site + 1, ctx)?;
        let h = b.mlp.fc2.forward_to(g, h, Activation::None, Out::Compute)?;
        self.residual(g, x, h, (i, 1), site + 2, ctx)
    }

    /// Final LayerNorm and the classifier on the cls token of features `[b, t, d]`.
    pub fn head(&self, g: &mut Graph, x: Var) -> Result<Var> {
        let cls = g.select_cls(x)?;
        self.head_cls(g, cls)
    }

    /// Final LayerNorm and the classifier on cls features `[b, 1, d]` → `[b, classes]`.
    pub fn head_cls(&self, g: &mut Graph, cls: Var) -> Result<Var> {
        let head = self.head.as_ref().ok_or_else(|| self.missing("the head"))?;
        let b = g.value(cls).dims()[0];
        let h = head.norm.forward(g, cls, Out::Compute)?;
        let logits = head.head.forward(g, h, Activation::None)?;
        g.reshape(logits, &[b, self.config.num_classes])
    }

    /// `residual + drop_path(dropout(x))` for branch `(block, k)` (0: attention, 1:
    /// MLP), as timm's block; one fused pass when only one of them is active. Drop-path
    /// masks have sites of their own, above every dropout site.
    fn residual(
        &self,
        g: &mut Graph,
        residual: Var,
        x: Var,
        (block, k): (usize, u64),
        site: u64,
        ctx: &ForwardCtx,
    ) -> Result<Var> {
        let p = self.config.drop_path_rate(block);
        if !ctx.train || p == 0.0 {
            return self.dropout_add(g, residual, x, site, ctx);
        }
        let x = self.dropout(g, x, site, ctx)?;
        let key = DropoutKey {
            seed: ctx.seed,
            site: DROP_PATH_SITES + 2 * block as u64 + k,
            per_sample: true,
        };
        g.dropout_add(residual, x, p, key, &ctx.samples)
    }

    /// `residual + dropout(x)`, fused when dropout is active.
    fn dropout_add(
        &self,
        g: &mut Graph,
        residual: Var,
        x: Var,
        site: u64,
        ctx: &ForwardCtx,
    ) -> Result<Var> {
        if !ctx.train || self.config.dropout == 0.0 {
            return g.add(residual, x);
        }
        let key = DropoutKey {
            seed: ctx.seed,
            site,
            per_sample: false,
        };
        g.dropout_add(residual, x, self.config.dropout, key, &ctx.samples)
    }

    fn dropout(&self, g: &mut Graph, x: Var, site: u64, ctx: &ForwardCtx) -> Result<Var> {
        if !ctx.train || self.config.dropout == 0.0 {
            return Ok(x);
        }
        let key = DropoutKey {
            seed: ctx.seed,
            site,
            per_sample: false,
        };
        g.dropout(x, self.config.dropout, key, &ctx.samples)
    }
}
