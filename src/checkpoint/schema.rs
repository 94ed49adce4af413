//! index.json's objects as the format defines them (docs/checkpoint-format.md), apart
//! from the internal types they carry: renaming a field of `VitConfig`, `OptimizerKind`,
//! `LrSchedule` or `Layout` cannot change the file format, because the index reads and
//! writes these twins (`#[serde(with = "schema::…")]` on the index's fields) and converts.
//!
//! Reading older versions: version 1 has the same objects as version 2 (version 2 added
//! the index's checksum file and two optional training fields); a reader accepts every
//! version it knows and converts it here, and refuses others by number.

use crate::dist::Layout;
use crate::nn::VitConfig;
use crate::optim::{LrSchedule, OptimizerKind};
use crate::tensor::DType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `model`: the ViT's architecture.
pub mod model {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Model {
        image_size: usize,
        patch_size: usize,
        in_channels: usize,
        num_classes: usize,
        dim: usize,
        depth: usize,
        heads: usize,
        mlp_dim: usize,
        dropout: f32,
        /// absent in checkpoints written before stochastic depth existed
        #[serde(default)]
        drop_path: f32,
        layernorm_eps: f32,
    }

    pub fn serialize<S: Serializer>(c: &VitConfig, s: S) -> Result<S::Ok, S::Error> {
        Model {
            image_size: c.image_size,
            patch_size: c.patch_size,
            in_channels: c.in_channels,
            num_classes: c.num_classes,
            dim: c.dim,
            depth: c.depth,
            heads: c.heads,
            mlp_dim: c.mlp_dim,
            dropout: c.dropout,
            drop_path: c.drop_path,
            layernorm_eps: c.layernorm_eps,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VitConfig, D::Error> {
        let m = Model::deserialize(d)?;
        Ok(VitConfig {
            image_size: m.image_size,
            patch_size: m.patch_size,
            in_channels: m.in_channels,
            num_classes: m.num_classes,
            dim: m.dim,
            depth: m.depth,
            heads: m.heads,
            mlp_dim: m.mlp_dim,
            dropout: m.dropout,
            drop_path: m.drop_path,
            layernorm_eps: m.layernorm_eps,
        })
    }
}

/// `optimizer`: `{"AdamW": {…}}`, `{"Adam": {…}}`, `{"Sgd": {…}}` or null.
pub mod optimizer {
    use super::*;

    #[derive(Serialize, Deserialize)]
    enum Optimizer {
        Sgd {
            momentum: f32,
            dampening: f32,
            nesterov: bool,
        },
        Adam {
            beta1: f32,
            beta2: f32,
            eps: f32,
        },
        AdamW {
            beta1: f32,
            beta2: f32,
            eps: f32,
        },
    }

    pub fn serialize<S: Serializer>(k: &Option<OptimizerKind>, s: S) -> Result<S::Ok, S::Error> {
        k.map(|k| match k {
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => Optimizer::Sgd {
                momentum,
                dampening,
                nesterov,
            },
            OptimizerKind::Adam { beta1, beta2, eps } => Optimizer::Adam { beta1, beta2, eps },
            OptimizerKind::AdamW { beta1, beta2, eps } => Optimizer::AdamW { beta1, beta2, eps },
        })
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OptimizerKind>, D::Error> {
        Ok(Option::<Optimizer>::deserialize(d)?.map(|k| match k {
            Optimizer::Sgd {
                momentum,
                dampening,
                nesterov,
            } => OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            },
            Optimizer::Adam { beta1, beta2, eps } => OptimizerKind::Adam { beta1, beta2, eps },
            Optimizer::AdamW { beta1, beta2, eps } => OptimizerKind::AdamW { beta1, beta2, eps },
        }))
    }
}

/// `training.schedule`: `"Constant"`, `{"Step": {…}}`, `{"WarmupCosine": {…}}` (runs
/// before `Cosine`), `{"Cosine": {…}}` or null.
pub mod schedule {
    use super::*;

    #[derive(Serialize, Deserialize)]
    enum Schedule {
        Constant,
        Step {
            step_size: u64,
            gamma: f32,
        },
        WarmupCosine {
            warmup: u64,
            total: u64,
            min_lr: f32,
        },
        Cosine {
            warmup: u64,
            total: u64,
            min_lr: f32,
            warmup_lr: f32,
        },
    }

    pub fn serialize<S: Serializer>(l: &Option<LrSchedule>, s: S) -> Result<S::Ok, S::Error> {
        l.map(|l| match l {
            LrSchedule::Constant => Schedule::Constant,
            LrSchedule::Step { step_size, gamma } => Schedule::Step { step_size, gamma },
            LrSchedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            } => Schedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            },
            LrSchedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            } => Schedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            },
        })
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LrSchedule>, D::Error> {
        Ok(Option::<Schedule>::deserialize(d)?.map(|l| match l {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Step { step_size, gamma } => LrSchedule::Step { step_size, gamma },
            Schedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            } => LrSchedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            },
            Schedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            } => LrSchedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            },
        }))
    }
}

/// `layout`: `{"world", "dp", "pp", "stages": [{"start", "end"}, …]}`.
pub mod layout {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Stage {
        start: usize,
        end: usize,
    }

    #[derive(Serialize, Deserialize)]
    struct Layout {
        world: usize,
        dp: usize,
        pp: usize,
        #[serde(default)]
        stages: Vec<Stage>,
    }

    pub fn serialize<S: Serializer>(l: &super::Layout, s: S) -> Result<S::Ok, S::Error> {
        Layout {
            world: l.world,
            dp: l.dp,
            pp: l.pp,
            stages: l
                .stages
                .iter()
                .map(|r| Stage {
                    start: r.start,
                    end: r.end,
                })
                .collect(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Layout, D::Error> {
        let l = Layout::deserialize(d)?;
        Ok(super::Layout {
            world: l.world,
            dp: l.dp,
            pp: l.pp,
            stages: l.stages.into_iter().map(|s| s.start..s.end).collect(),
        })
    }
}

/// A tensor's `dtype`: `"F32"`, `"BF16"` or `"F16"` (safetensors' names); any other
/// name is refused as the index is read.
pub mod dtype {
    use super::*;

    pub fn serialize<S: Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown dtype `{name}` (F32, BF16 or F16)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Fields {
        #[serde(with = "model")]
        model: VitConfig,
        #[serde(with = "optimizer")]
        optimizer: Option<OptimizerKind>,
        #[serde(with = "schedule")]
        schedule: Option<LrSchedule>,
        #[serde(with = "layout")]
        layout: Layout,
        #[serde(with = "dtype")]
        dtype: DType,
    }

    /// The objects exactly as docs/checkpoint-format.md spells them, both ways.
    #[test]
    fn the_index_objects_are_the_documented_ones() {
        let text = r#"{"model":{"image_size":32,"patch_size":4,"in_channels":3,"num_classes":10,"dim":256,"depth":7,"heads":4,"mlp_dim":512,"dropout":0.1,"drop_path":0.0,"layernorm_eps":1e-6},"optimizer":{"AdamW":{"beta1":0.9,"beta2":0.999,"eps":1e-8}},"schedule":{"WarmupCosine":{"warmup":5,"total":50,"min_lr":0.0}},"layout":{"world":4,"dp":2,"pp":2,"stages":[{"start":0,"end":3},{"start":3,"end":7}]},"dtype":"BF16"}"#;
        let f: Fields = serde_json::from_str(text).unwrap();
        assert_eq!(
            f.model,
            VitConfig::preset("vit_lite_depth7_patch4_32").unwrap()
        );
        assert_eq!(f.optimizer, Some(OptimizerKind::adamw()));
        assert_eq!(f.layout, Layout::new(2, 2, 7, Some(&[3])).unwrap());
        assert_eq!(f.dtype, DType::BF16);
        let back: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, want);
        let bad = text.replace("\"BF16\"", "\"F64\"");
        let e = serde_json::from_str::<Fields>(&bad).err().unwrap();
        assert!(e.to_string().contains("unknown dtype `F64`"), "{e}");
    }
}
