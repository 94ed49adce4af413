//! Checkpoints and what reads them: save and load, retention and corruption, exact
//! resumes (after crashes too), `ferrovit ckpt`, `infer` and `eval`, and hostile input
//! and crashes at the worst moments.
//!
//! One binary of a few (issue 19; see tests/core/main.rs): a module here was one test
//! binary before, and its tests now share this process with the others.

#[path = "../common/mod.rs"]
mod common;

mod checkpoint;
mod ckpt_cli;
mod hardening;
mod infer;
mod resume;
mod rundir;
mod timm_interop;
