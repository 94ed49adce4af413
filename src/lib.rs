//! ferrovit: Vision Transformer training in Rust.
//!
//! Layers, in the order data flows through a training step:
//! [`tensor`] (shape, dtype, device-tagged storage) → [`backend`] (the op set, per
//! device) → [`autograd`] (the tape and the parameter store) → [`nn`] (layers and the
//! ViT presets) → [`optim`] (optimizers, clipping, schedules).

pub mod autograd;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod engine;
pub mod error;
pub mod files;
pub mod host;
pub mod infer;
pub mod kernels;
pub mod launch;
pub mod metrics;
pub mod nn;
pub mod optim;
pub mod recipe;
pub mod rng;
pub mod signals;
mod simd;
pub mod tensor;
pub mod text;
pub mod trainer;

pub use autograd::{Activation, Graph, Out, ParamId, ParamStore, Precision, Var};
pub use error::{Error, Result};
pub use nn::{ForwardCtx, Vit, VitConfig};
pub use tensor::{DType, Device, Shape, Tensor};
