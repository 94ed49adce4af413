//! Point-to-point message queues with timeouts and departure tracking, shared by the
//! in-process group (one mailbox for all ranks, with its collective state riding in
//! `extra` under the same lock) and the TCP group (one mailbox per process, fed by its
//! reader threads).

use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Queued messages, which ranks left, and the owner's extra state `X`.
pub(crate) struct Mail<X> {
    /// (from, to, tag) → messages in order. A TCP mailbox only holds `to` = its rank.
    queues: HashMap<(usize, usize, u64), VecDeque<Vec<f32>>>,
    /// Why each rank left the group (`Some("")`: no details), `None` while it is in.
    left: Vec<Option<String>>,
    pub(crate) extra: X,
}

impl<X> Mail<X> {
    /// Why rank `r` left, if it did.
    pub(crate) fn left(&self, r: usize) -> Option<&str> {
        self.left.get(r).and_then(|l| l.as_deref())
    }
}

/// `timeout` from now; a timeout too large to represent waits (practically) forever.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// The error of an operation of rank `me` that needed rank `r`, which left.
pub(crate) fn left_error(me: usize, what: &str, r: usize, why: &str) -> Error {
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    Error::Comm(format!("rank {me}: {what}: rank {r} left the group{why}"))
}

pub(crate) struct Mailbox<X = ()> {
    timeout: Duration,
    state: Mutex<Mail<X>>,
    changed: Condvar,
}

impl<X> Mailbox<X> {
    /// A mailbox for a group of `world` ranks whose waits fail after `timeout`.
    pub(crate) fn new(world: usize, timeout: Duration, extra: X) -> Self {
        Mailbox {
            timeout,
            state: Mutex::new(Mail {
                queues: HashMap::new(),
                left: vec![None; world],
                extra,
            }),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The state; a panic of another holder does not make it unusable (every update
    /// leaves it consistent).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Mail<X>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter (after changing `extra`).
    pub(crate) fn notify(&self) {
        self.changed.notify_all();
    }

    /// Queues a message from `from` for `to`, unless `to` left.
    pub(crate) fn deliver(&self, from: usize, to: usize, tag: u64, data: Vec<f32>) -> Result<()> {
        let mut st = self.lock();
        if let Some(why) = st.left(to) {
            let what = format!("send to rank {to} (tag {tag})");
            return Err(left_error(from, &what, to, why));
        }
        st.queues
            .entry((from, to, tag))
            .or_default()
            .push_back(data);
        self.changed.notify_all();
        Ok(())
    }

    /// Records that rank `r` left (the first reason given is kept) and fails the
    /// waits that need it.
    pub(crate) fn leave(&self, r: usize, why: &str) {
        let mut st = self.lock();
        if let Some(slot @ None) = st.left.get_mut(r) {
            *slot = Some(why.to_string());
        }
        self.changed.notify_all();
    }

    /// Blocks until `done` holds, failing at the timeout or as soon as a rank that
    /// `missing` names (the ranks still waited for) has left. `me` and `what` name the
    /// operation in errors.
    pub(crate) fn wait_until<'a>(
        &self,
        mut st: MutexGuard<'a, Mail<X>>,
        me: usize,
        what: &str,
        mut done: impl FnMut(&Mail<X>) -> bool,
        missing: impl Fn(&Mail<X>) -> Vec<usize>,
    ) -> Result<MutexGuard<'a, Mail<X>>> {
        let deadline = deadline_after(self.timeout);
        while !done(&st) {
            let waiting = missing(&st);
            if let Some((r, why)) = waiting.iter().find_map(|&r| st.left(r).map(|why| (r, why))) {
                return Err(left_error(me, what, r, why));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm(format!(
                    "rank {me}: {what}: timed out after {:?} waiting for rank(s) {waiting:?}",
                    self.timeout
                )));
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st)
    }

    /// Rank `me`'s next message from `from` under `tag` (messages that arrived before
    /// the sender left are still delivered).
    pub(crate) fn take(&self, me: usize, from: usize, tag: u64) -> Result<Vec<f32>> {
        let key = (from, me, tag);
        let what = format!("recv from rank {from} (tag {tag})");
        let has = |st: &Mail<X>| st.queues.get(&key).is_some_and(|q| !q.is_empty());
        let mut st = self.wait_until(self.lock(), me, &what, has, |_| vec![from])?;
        let msg = st.queues.get_mut(&key).and_then(VecDeque::pop_front);
        if st.queues.get(&key).is_some_and(VecDeque::is_empty) {
            st.queues.remove(&key); // tags may be many and short-lived
        }
        msg.ok_or_else(|| Error::Comm(format!("rank {me}: {what}: message vanished")))
    }
}
