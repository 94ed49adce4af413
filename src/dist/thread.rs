//! Ranks as threads of one process, exchanging through shared memory.

use super::mailbox::{Mail, Mailbox};
use super::{reduce, reduce_into, ProcessGroup, ReduceOp};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The contributions to one collective call.
struct Round {
    op: &'static str,
    parts: Vec<Option<Arc<Vec<f32>>>>,
    read: usize,
}

/// Collective number → its contributions (removed once every rank has read). Kept in
/// the mailbox, under its lock, so collectives and point-to-point share the waiting
/// and departure logic.
type Rounds = HashMap<u64, Round>;

struct Shared {
    world: usize,
    mail: Mailbox<Rounds>,
}

/// One rank's handle on an in-process group (see [`ThreadGroup::new`]).
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
    /// Collectives this rank has entered.
    seq: AtomicU64,
    /// This rank's last all-reduce contribution: its buffer is reused by the next one
    /// once every rank has let go of it (no fresh allocation, no page faults).
    spare: Mutex<Option<Arc<Vec<f32>>>>,
}

fn comm(msg: String) -> Error {
    Error::Comm(msg)
}

impl ThreadGroup {
    /// Handles for ranks `0..world` (move one into each thread); every blocking call
    /// fails after `timeout`.
    pub fn new(world: usize, timeout: Duration) -> Result<Vec<ThreadGroup>> {
        if world == 0 {
            return Err(Error::Config(
                "a process group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            mail: Mailbox::new(world, timeout, Rounds::new()),
        });
        Ok((0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
                seq: AtomicU64::new(0),
                spare: Mutex::new(None),
            })
            .collect())
    }

    /// Contributes `data` to this rank's next collective and returns every rank's
    /// contribution, in rank order.
    fn exchange(&self, op: &'static str, data: Arc<Vec<f32>>) -> Result<Vec<Arc<Vec<f32>>>> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let world = self.shared.world;
        let what = format!("{op} #{seq}");
        let mail = &self.shared.mail;
        let mut st = mail.lock();
        let round = st.extra.entry(seq).or_insert_with(|| Round {
            op,
            parts: vec![None; world],
            read: 0,
        });
        if round.op != op {
            return Err(comm(format!(
                "rank {}: called {op} as collective #{seq} where another rank called {} (collectives out of order)",
                self.rank, round.op
            )));
        }
        round.parts[self.rank] = Some(data);
        mail.notify();
        let parts = |st: &Mail<Rounds>| {
            st.extra
                .get(&seq)
                .map(|r| r.parts.clone())
                .unwrap_or_default()
        };
        let mut st = mail.wait_until(
            st,
            self.rank,
            &what,
            |st| parts(st).iter().all(Option::is_some),
            |st| {
                parts(st)
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(r, _)| r)
                    .collect()
            },
        )?;
        let round = st
            .extra
            .get_mut(&seq)
            .ok_or_else(|| comm(format!("rank {}: {what}: round vanished", self.rank)))?;
        let out: Vec<Arc<Vec<f32>>> = round.parts.iter().flatten().cloned().collect();
        round.read += 1;
        if round.read == world {
            st.extra.remove(&seq);
        }
        Ok(out)
    }

    fn same_lengths(&self, op: &str, parts: &[Arc<Vec<f32>>]) -> Result<usize> {
        let n = parts[self.rank].len();
        match parts.iter().position(|p| p.len() != n) {
            None => Ok(n),
            Some(r) => Err(comm(format!(
                "{op}: rank {} has {n} elements but rank {r} has {}",
                self.rank,
                parts[r].len()
            ))),
        }
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        if r < self.shared.world {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{what}: rank {r} is not in a group of {}",
                self.shared.world
            )))
        }
    }
}

impl ProcessGroup for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let reused = spare.take().and_then(|mut buf| {
            let v = Arc::get_mut(&mut buf)?;
            v.clear();
            v.extend_from_slice(data);
            Some(buf)
        });
        let mine = reused.unwrap_or_else(|| Arc::new(data.to_vec()));
        let parts = self.exchange("all_reduce", mine)?;
        *spare = Some(parts[self.rank].clone());
        self.same_lengths("all_reduce", &parts)?;
        let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        reduce_into(data, &refs, op);
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        self.check_rank(root, "broadcast")?;
        let mine = if self.rank == root {
            data.to_vec()
        } else {
            Vec::new()
        };
        let parts = self.exchange("broadcast", Arc::new(mine))?;
        if parts[root].len() != data.len() {
            return Err(comm(format!(
                "broadcast: rank {} expects {} elements, root {root} sent {}",
                self.rank,
                data.len(),
                parts[root].len()
            )));
        }
        data.copy_from_slice(&parts[root]);
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>> {
        let parts = self.exchange("all_gather", Arc::new(data.to_vec()))?;
        self.same_lengths("all_gather", &parts)?;
        Ok(parts.iter().flat_map(|p| p.iter().copied()).collect())
    }

    fn reduce_scatter(&self, data: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let n = super::scatter_len(data.len(), self.shared.world)?;
        let parts = self.exchange("reduce_scatter", Arc::new(data.to_vec()))?;
        self.same_lengths("reduce_scatter", &parts)?;
        let mine = self.rank * n..(self.rank + 1) * n;
        let refs: Vec<&[f32]> = parts.iter().map(|p| &p[mine.clone()]).collect();
        Ok(reduce(&refs, op))
    }

    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()> {
        self.check_rank(to, "send")?;
        self.shared.mail.deliver(self.rank, to, tag, data.to_vec())
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.check_rank(from, "recv")?;
        self.shared.mail.take(self.rank, from, tag)
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Arc::new(Vec::new())).map(|_| ())
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        self.shared.mail.leave(self.rank, "");
    }
}
