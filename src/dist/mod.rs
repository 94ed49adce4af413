//! Communication between ranks: the [`ProcessGroup`] interface that data- and
//! pipeline-parallel training use, and its implementations: ranks as threads of one
//! process ([`ThreadGroup`]), as processes over TCP ([`TcpGroup`], with the rendezvous
//! [`TcpStore`]), and on GPUs through NCCL ([`NcclGroup`]); [`SubGroup`] runs
//! collectives over some ranks of a group. [`Layout`] maps ranks to (replica, stage).
//!
//! Every blocking call has a timeout, and a rank that leaves the group (its handle is
//! dropped, its thread failed, its process was killed) makes the others' pending and
//! later calls fail at once with an error naming it — a dead rank never leaves the rest
//! hanging.
//!
//! Files: `thread.rs` (ranks as threads), `store.rs` (the rendezvous store), `mesh.rs`
//! (the TCP group: handshake, frames, reader threads), `env.rs` (the launch
//! environment), `wire.rs` (the low-level reads, dialing and hellos both TCP protocols
//! share), `auth.rs` (the handshake's proof of the run's secret), `mailbox.rs` (message
//! queues), `nccl.rs`, `layout.rs`.

mod auth;
mod env;
mod layout;
mod mailbox;
mod mesh;
mod nccl;
mod store;
mod thread;
mod wire;

pub use auth::random_secret;
pub use env::DistEnv;
pub use layout::Layout;
pub use mesh::TcpGroup;
pub use nccl::NcclGroup;
pub use store::TcpStore;
pub use thread::ThreadGroup;

/// Most ranks of one group: a layout's dp × pp, a launcher's nnodes × nproc.
pub const MAX_WORLD: usize = 1 << 16;

use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// How an all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Avg,
    Max,
}

/// Tags of point-to-point messages must be below this; larger ones are reserved for the
/// collectives built from send/recv and for sub-groups.
pub const MAX_TAG: u64 = 1 << 56;
const COLLECTIVE_TAG: u64 = MAX_TAG;

/// Collective and point-to-point operations over `world` ranks. Collectives must be
/// called by every rank in the same order. Reductions add in rank order, so every
/// rank gets bit-identical results, independent of timing.
///
/// Implementations provide `send`/`recv`; the collectives default to a star through
/// rank 0 built from them (implementations with shared memory override them).
pub trait ProcessGroup: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sends `data` to rank `to` under `tag` (below [`MAX_TAG`]; does not wait for the
    /// receiver).
    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()>;
    /// Receives what rank `from` sent under `tag`, in order.
    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>>;

    /// Combines `data` across ranks in place.
    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let parts = gather_to_root(self, data, "all_reduce")?;
        let mut out = match parts {
            Some(parts) => {
                let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                reduce(&refs, op)
            }
            None => Vec::new(),
        };
        broadcast_from_root(self, &mut out)?;
        copy_same_len(data, &out, "all_reduce")
    }

    /// Replaces `data` on every rank with `root`'s.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        check_rank(root, self.world(), "broadcast")?;
        if self.rank() == root {
            for r in (0..self.world()).filter(|&r| r != root) {
                self.send(data, r, COLLECTIVE_TAG)?;
            }
            Ok(())
        } else {
            let got = self.recv(root, COLLECTIVE_TAG)?;
            copy_same_len(data, &got, "broadcast")
        }
    }

    /// Every rank's `data`, concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>> {
        let mut out = gather_to_root(self, data, "all_gather")?
            .map(|parts| parts.concat())
            .unwrap_or_default();
        broadcast_from_root(self, &mut out)?;
        Ok(out)
    }

    /// Reduces `data` (length `world × n`) across ranks and returns this rank's `n`
    /// elements of the result.
    fn reduce_scatter(&self, data: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let n = scatter_len(data.len(), self.world())?;
        let mut all = data.to_vec();
        self.all_reduce(&mut all, op)?;
        Ok(all[self.rank() * n..(self.rank() + 1) * n].to_vec())
    }

    /// Waits until every rank has reached it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [], ReduceOp::Sum)
    }

    /// Combines `tensors` (the same shapes in the same order on every rank; gradients)
    /// across ranks in place, in buckets of about `bucket` elements. By default they
    /// pass through host memory; a group on GPUs ([`NcclGroup`]) reduces device
    /// tensors where they are.
    fn all_reduce_tensors(
        &self,
        tensors: &mut [&mut Tensor],
        op: ReduceOp,
        bucket: usize,
    ) -> Result<()> {
        all_reduce_through_host(self, tensors, op, bucket)
    }
}

/// [`ProcessGroup::all_reduce_tensors`] through host memory: the tensors' values
/// concatenated into buckets of about `bucket` elements, each all-reduced and copied back.
fn all_reduce_through_host<G: ProcessGroup + ?Sized>(
    g: &G,
    tensors: &mut [&mut Tensor],
    op: ReduceOp,
    bucket: usize,
) -> Result<()> {
    let bucket = bucket.max(1);
    let mut flat: Vec<f32> = Vec::with_capacity(bucket);
    let mut first = 0;
    for i in 0..tensors.len() {
        flat.extend_from_slice(&tensors[i].host_f32s()?);
        if flat.len() >= bucket || i + 1 == tensors.len() {
            g.all_reduce(&mut flat, op)?;
            let mut at = 0;
            for t in &mut tensors[first..=i] {
                let len = t.numel();
                t.copy_from_f32s(&flat[at..at + len])?;
                at += len;
            }
            first = i + 1;
            flat.clear();
        }
    }
    Ok(())
}

/// Each rank's share of a reduce_scatter over `len` elements.
pub(crate) fn scatter_len(len: usize, world: usize) -> Result<usize> {
    if len.is_multiple_of(world) {
        Ok(len / world)
    } else {
        Err(Error::Config(format!(
            "reduce_scatter: {len} elements do not split across {world} ranks"
        )))
    }
}

fn check_rank(r: usize, world: usize, what: &str) -> Result<()> {
    if r < world {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what}: rank {r} is not in a group of {world}"
        )))
    }
}

fn copy_same_len(dst: &mut [f32], src: &[f32], what: &str) -> Result<()> {
    if dst.len() != src.len() {
        return Err(Error::Comm(format!(
            "{what}: this rank has {} elements but the result has {}",
            dst.len(),
            src.len()
        )));
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// Rank 0 receives every rank's `data` (in rank order, equal lengths checked); the
/// others send theirs and get `None`.
fn gather_to_root<G: ProcessGroup + ?Sized>(
    g: &G,
    data: &[f32],
    what: &str,
) -> Result<Option<Vec<Vec<f32>>>> {
    if g.rank() != 0 {
        g.send(data, 0, COLLECTIVE_TAG)?;
        return Ok(None);
    }
    let mut parts = vec![data.to_vec()];
    for r in 1..g.world() {
        let p = g.recv(r, COLLECTIVE_TAG)?;
        if p.len() != data.len() {
            return Err(Error::Comm(format!(
                "{what}: rank 0 has {} elements but rank {r} has {}",
                data.len(),
                p.len()
            )));
        }
        parts.push(p);
    }
    Ok(Some(parts))
}

/// Rank 0's `data` replaces everyone else's (any length).
fn broadcast_from_root<G: ProcessGroup + ?Sized>(g: &G, data: &mut Vec<f32>) -> Result<()> {
    if g.rank() == 0 {
        for r in 1..g.world() {
            g.send(data, r, COLLECTIVE_TAG)?;
        }
    } else {
        *data = g.recv(0, COLLECTIVE_TAG)?;
    }
    Ok(())
}

/// Some ranks of a parent group acting as a group of their own (the data-parallel
/// replicas of one pipeline stage, or the stages of one replica). Its messages travel
/// through the parent under tags reserved for `kind`, so several sub-groups and the
/// parent can be used side by side.
pub struct SubGroup {
    parent: Arc<dyn ProcessGroup>,
    /// Parent ranks of the members, in this group's rank order.
    members: Vec<usize>,
    rank: usize,
    kind: u64,
}

impl SubGroup {
    /// The sub-group of `members` (parent ranks, which must include the parent's own
    /// rank); `kind` (below 64) keeps its messages apart from other sub-groups'.
    pub fn new(parent: Arc<dyn ProcessGroup>, members: Vec<usize>, kind: u64) -> Result<Self> {
        let me = parent.rank();
        let rank = members.iter().position(|&m| m == me).ok_or_else(|| {
            Error::Config(format!(
                "rank {me} is not a member of sub-group {members:?}"
            ))
        })?;
        if kind >= 64 || members.iter().any(|&m| m >= parent.world()) {
            return Err(Error::Config(format!(
                "sub-group {members:?} (kind {kind}) does not fit a group of {}",
                parent.world()
            )));
        }
        Ok(SubGroup {
            parent,
            members,
            rank,
            kind,
        })
    }

    fn tag(&self, tag: u64) -> Result<u64> {
        if tag > COLLECTIVE_TAG {
            return Err(Error::Config(format!("message tag {tag} is reserved")));
        }
        Ok((1 << 63) | (self.kind << 57) | tag)
    }

    fn member(&self, r: usize, what: &str) -> Result<usize> {
        check_rank(r, self.members.len(), what)?;
        Ok(self.members[r])
    }
}

impl ProcessGroup for SubGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.members.len()
    }

    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()> {
        self.parent
            .send(data, self.member(to, "send")?, self.tag(tag)?)
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.parent.recv(self.member(from, "recv")?, self.tag(tag)?)
    }
}

/// Combines equal-length contributions in rank order.
pub(crate) fn reduce(parts: &[&[f32]], op: ReduceOp) -> Vec<f32> {
    let mut out = vec![0.0; parts[0].len()];
    reduce_into(&mut out, parts, op);
    out
}

/// [`reduce`] into `out` (no allocation).
pub(crate) fn reduce_into(out: &mut [f32], parts: &[&[f32]], op: ReduceOp) {
    out.copy_from_slice(parts[0]);
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
    reduce_gradients(store, group, bucket, ReduceOp::Avg)
}

/// Combines every parameter gradient across the group with `op`, in buckets of about
/// `bucket` elements, parameters in store order (see
/// [`ProcessGroup::all_reduce_tensors`]: through host memory, or on the GPUs with NCCL).
pub fn reduce_gradients(
    store: &mut ParamStore,
    group: &dyn ProcessGroup,
    bucket: usize,
    op: ReduceOp,
) -> Result<()> {
    if group.world() == 1 {
        return Ok(());
    }
    let mut grads: Vec<&mut Tensor> = store.iter_mut().map(|p| &mut p.grad).collect();
    group.all_reduce_tensors(&mut grads, op, bucket)
}
