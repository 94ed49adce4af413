//! Communication between ranks: the [`ProcessGroup`] interface that data- and
//! pipeline-parallel training use, and its implementations. So far: ranks as threads
//! of one process ([`ThreadGroup`]); the TCP and NCCL groups come with the parallel
//! training issue.
//!
//! Every blocking call has a timeout, and a rank that leaves the group (its handle is
//! dropped, e.g. its thread failed) makes the others' pending and later calls fail at
//! once with an error naming it — a dead rank never leaves the rest hanging.

mod thread;

pub use thread::ThreadGroup;

use crate::autograd::ParamStore;
use crate::error::Result;

/// How an all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Avg,
    Max,
}

/// Collective and point-to-point operations over `world` ranks. Collectives must be
/// called by every rank in the same order. Reductions add in rank order, so every
/// rank gets bit-identical results, independent of timing.
pub trait ProcessGroup: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Combines `data` across ranks in place.
    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<()>;
    /// Replaces `data` on every rank with `root`'s.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's `data`, concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>>;
    /// Reduces `data` (length `world × n`) across ranks and returns this rank's `n`
    /// elements of the result.
    fn reduce_scatter(&self, data: &[f32], op: ReduceOp) -> Result<Vec<f32>>;
    /// Sends `data` to rank `to` under `tag` (does not wait for the receiver).
    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()>;
    /// Receives what rank `from` sent under `tag`, in order.
    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>>;
    /// Waits until every rank has reached it.
    fn barrier(&self) -> Result<()>;
}

/// Combines equal-length contributions in rank order.
pub(crate) fn reduce(parts: &[&[f32]], op: ReduceOp) -> Vec<f32> {
    let mut out = parts[0].to_vec();
    for p in &parts[1..] {
        for (o, v) in out.iter_mut().zip(p.iter()) {
            *o = match op {
                ReduceOp::Sum | ReduceOp::Avg => *o + v,
                ReduceOp::Max => o.max(*v),
            };
        }
    }
    if op == ReduceOp::Avg {
        let n = parts.len() as f32;
        out.iter_mut().for_each(|o| *o /= n);
    }
    out
}

/// Data parallelism's gradient step: averages every parameter gradient across the
/// group, in buckets of about `bucket` elements (fewer, larger messages), parameters
/// in store order. Afterwards every replica holds the gradient of the global batch's
/// mean loss (given equal shards), so identical updates keep replicas identical.
pub fn average_gradients(
    store: &mut ParamStore,
    group: &dyn ProcessGroup,
    bucket: usize,
) -> Result<()> {
    if group.world() == 1 {
        return Ok(());
    }
    let bucket = bucket.max(1);
    let mut members: Vec<usize> = Vec::new();
    let mut flat: Vec<f32> = Vec::with_capacity(bucket);
    let n = store.len();
    let mut params: Vec<&mut crate::autograd::Param> = store.iter_mut().collect();
    for i in 0..n {
        flat.extend_from_slice(params[i].grad.f32s()?);
        members.push(i);
        if flat.len() >= bucket || i + 1 == n {
            group.all_reduce(&mut flat, ReduceOp::Avg)?;
            let mut at = 0;
            for &m in &members {
                let g = params[m].grad.f32s_mut()?;
                g.copy_from_slice(&flat[at..at + g.len()]);
                at += g.len();
            }
            members.clear();
            flat.clear();
        }
    }
    Ok(())
}
