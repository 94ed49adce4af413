//! The `ferrovit` command line and the README's tour, multi-process training through
//! `ferrovit launch`, and the process groups it runs on (in-process threads and TCP).
//!
//! One binary of a few (issue 19; see tests/core/main.rs): a module here was one test
//! binary before, and its tests now share this process with the others.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod dist;
mod dist_tcp;
mod launch;
mod progress;
mod readme;
mod recipes;
mod stop;
