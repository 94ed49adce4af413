//! The graph's ops, one file per family, each op's forward (a `Graph` method that
//! checks shapes, runs the backend and records a node) beside its backward (the
//! `Graph` method this file's [`Op`] dispatch calls), as llm.c keeps each layer's
//! forward and backward together:
//! - `embed.rs`: tokens in and out — `patchify`, `embed` (cls token and position),
//!   `select_cls`;
//! - `linear.rs`: `linear` with an optional fused GELU ([`Activation`]), mixed
//!   precision's bf16 GEMM operands;
//! - `layernorm.rs`: `layernorm`;
//! - `attention.rs`: `attention`, `attention_queries`;
//! - `residual.rs`: `add`, `dropout`, `dropout_add` (dropout is `dropout_add` without
//!   the residual: one kernel, one node);
//! - `reshape.rs`: `reshape`;
//! - `loss.rs`: `cross_entropy`.

mod attention;
mod embed;
mod layernorm;
mod linear;
mod loss;
mod reshape;
mod residual;

pub use linear::Activation;

use super::{Graph, ParamId};
use crate::error::Result;
use crate::tensor::Tensor;

/// How a node was made, with what its backward needs (each family's saved state is
/// defined in its file, beside the forward that saves it).
pub(super) enum Op {
    /// A tensor from outside (images, or a received activation).
    Input,
    Param(ParamId),
    /// Images are data, not trained: no backward.
    Patchify,
    Linear(linear::LinearOp),
    Embed(embed::EmbedOp),
    LayerNorm(layernorm::LayerNormOp),
    Attention(attention::AttentionOp),
    Add(residual::AddOp),
    Dropout(residual::DropoutOp),
    SelectRows(embed::SelectRowsOp),
    Reshape(reshape::ReshapeOp),
    CrossEntropy(loss::CrossEntropyOp),
}

impl Graph<'_> {
    /// Runs the backward of `op` (a node's op, moved out of the arena) given the
    /// gradient `g` of its output.
    pub(super) fn backward_op(&mut self, op: &Op, g: &Tensor) -> Result<()> {
        match op {
            Op::Input | Op::Param(_) | Op::Patchify => Ok(()),
            Op::Linear(op) => self.linear_backward(op, g),
            Op::Embed(op) => self.embed_backward(op, g),
            Op::LayerNorm(op) => self.layernorm_backward(op, g),
            Op::Attention(op) => self.attention_backward(op, g),
            Op::Add(op) => self.add_backward(op, g),
            Op::Dropout(op) => self.dropout_backward(op, g),
            Op::SelectRows(op) => self.select_rows_backward(op, g),
            Op::Reshape(op) => self.reshape_backward(op, g),
            Op::CrossEntropy(op) => self.cross_entropy_backward(op, g),
        }
    }
}
