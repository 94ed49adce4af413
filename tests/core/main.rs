//! The library, in process: tensors, gradients and the ViT, optimizers, the engine and
//! trainer, parallel training, the CUDA backend (emulated always, a real GPU when there
//! is one), PyTorch parity, data sets, AutoAugment and the loader.
//!
//! Tests are grouped into a few binaries (issue 19): each links the whole crate, and
//! linking two dozen of them dominated `cargo test --release` on two cores. A module
//! here was one test binary before; its tests now share a process with the others of
//! this binary, so none may change process-wide state under another's feet (see
//! `common::alone_in_a_process` and `common::temp_dir`).

#[path = "../common/mod.rs"]
mod common;

mod autoaugment;
mod conformance;
mod cuda_train;
mod data;
mod engine;
mod gradcheck;
mod kernels_build;
mod loader;
mod mixup;
mod optim;
mod parallel;
mod pytorch_parity;
mod tensor;
mod trainer;
mod vit;
