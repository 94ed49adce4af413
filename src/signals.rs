//! Stopping a run: a [`StopFlag`] that a trainer checks after every step (set by code,
//! or by a signal), and SIGTERM/SIGINT recorded instead of ending the process
//! ([`Caught`], used by `ferrovit launch` to pass them on and by `ferrovit train`
//! through [`StopOnSignals`] to stop after the current step).
//!
//! A signal handler may only store atomics; what a signal means is decided by a thread
//! that polls them ([`Caught::take`]), so it can log, set flags and exit.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a run stops early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// This signal (SIGINT, SIGTERM) was received.
    Signal(i32),
    /// [`StopFlag::request`] was called.
    Requested,
}

impl StopReason {
    /// The number a rank sends to the others when it votes to stop (0: no vote).
    pub fn code(self) -> i32 {
        match self {
            StopReason::Signal(s) => s,
            StopReason::Requested => -1,
        }
    }

    /// The reason a vote of `code` stands for (`None` for 0).
    pub fn from_code(code: i32) -> Option<StopReason> {
        match code {
            0 => None,
            -1 => Some(StopReason::Requested),
            s => Some(StopReason::Signal(s)),
        }
    }

    /// The exit code of a process that stopped for this reason: 128 + the signal, as
    /// shells report a process a signal ended (1 for a request by code).
    pub fn exit_code(self) -> i32 {
        match self {
            StopReason::Signal(s) => 128 + s,
            StopReason::Requested => 1,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            StopReason::Signal(s) => f.write_str(&name(*s)),
            StopReason::Requested => f.write_str("a stop request"),
        }
    }
}

/// A request to stop training after the current step, shared by clones: the trainer
/// of every rank holding a clone stops at the same step (a parallel run agrees on it
/// through the step's metrics all-reduce). The first reason given is kept.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicI32>);

impl StopFlag {
    pub fn new() -> StopFlag {
        StopFlag::default()
    }

    /// Asks the run to stop after its current step.
    pub fn request(&self) {
        self.set(StopReason::Requested);
    }

    /// The same, for a signal received.
    pub fn set(&self, reason: StopReason) {
        let _ = self
            .0
            .compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why a stop was requested, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        StopReason::from_code(self.0.load(Ordering::SeqCst))
    }
}

/// "SIGINT", "SIGTERM", or "signal N".
pub fn name(sig: i32) -> String {
    #[cfg(unix)]
    match sig {
        libc::SIGINT => return "SIGINT".into(),
        libc::SIGTERM => return "SIGTERM".into(),
        _ => {}
    }
    format!("signal {sig}")
}

/// The last SIGTERM/SIGINT received and not yet taken (0: none), and how many arrived
/// since the last take.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn record(sig: libc::c_int) {
    // all a handler may safely do: the thread that polls acts on it
    RECEIVED.store(sig, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

/// While alive, SIGTERM and SIGINT are recorded instead of ending the process; the
/// previous handlers come back when it is dropped. One at a time per process.
pub struct Caught {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl Caught {
    #[cfg(unix)]
    pub fn install() -> std::io::Result<Caught> {
        RECEIVED.store(0, Ordering::SeqCst);
        COUNT.store(0, Ordering::SeqCst);
        let mut caught = Caught {
            previous: Vec::new(),
        };
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: a zeroed sigaction is valid; the handler only stores atomics.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut old) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                caught.previous.push((sig, old));
            }
        }
        Ok(caught)
    }

    #[cfg(not(unix))]
    pub fn install() -> std::io::Result<Caught> {
        Ok(Caught {})
    }

    /// The last signal received since the previous call, and how many arrived (two
    /// quick ones count as two even if one poll sees both).
    pub fn take(&self) -> Option<(i32, u32)> {
        take_recorded()
    }
}

fn take_recorded() -> Option<(i32, u32)> {
    let n = COUNT.swap(0, Ordering::SeqCst);
    let sig = RECEIVED.swap(0, Ordering::SeqCst);
    (n > 0 && sig != 0).then_some((sig, n as u32))
}

impl Drop for Caught {
    fn drop(&mut self) {
        #[cfg(unix)]
        for (sig, old) in &self.previous {
            // SAFETY: restores a disposition that sigaction itself reported.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// Sends `sig` to the process `pid` (a child not yet reaped, so the pid is its own).
pub fn send(pid: u32, sig: i32) {
    #[cfg(unix)]
    // SAFETY: kill only sends a signal.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
    #[cfg(not(unix))]
    let _ = (pid, sig);
}

/// How often the signals are polled.
pub const POLL: Duration = Duration::from_millis(20);

/// What a second signal does to a stopping process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Again {
    /// Exit at once with 128 + the signal (a process of its own: the user insists).
    Exit,
    /// Nothing: a rank of a launched group, whose launcher may pass on a signal the
    /// rank already had (a terminal's Ctrl-C and Slurm signal every process); the
    /// launcher decides when to kill it.
    Ignore,
}

/// While alive, the first SIGINT/SIGTERM sets a [`StopFlag`] and logs that the run
/// stops after its current step; a second one acts as [`Again`] says.
pub struct StopOnSignals {
    done: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    _caught: Caught,
}

impl StopOnSignals {
    /// `announce`: log the first signal (the process that speaks for the run).
    pub fn install(flag: StopFlag, again: Again, announce: bool) -> std::io::Result<Self> {
        let caught = Caught::install()?;
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let watcher = std::thread::Builder::new()
            .name("ferrovit-signals".into())
            .spawn(move || watch(&flag, again, announce, &d))?;
        Ok(StopOnSignals {
            done,
            watcher: Some(watcher),
            _caught: caught,
        })
    }
}

impl Drop for StopOnSignals {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// The watcher thread: polls the recorded signals until `done`.
fn watch(flag: &StopFlag, again: Again, announce: bool, done: &AtomicBool) {
    let mut seen = 0;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        let Some((sig, n)) = take_recorded() else {
            continue;
        };
        if seen == 0 {
            flag.set(StopReason::Signal(sig));
            if announce {
                tracing::warn!(
                    "stopping after this step ({}); {}",
                    name(sig),
                    match again {
                        Again::Exit => "a second signal exits at once",
                        Again::Ignore => "the launcher kills the ranks if it is signalled again",
                    }
                );
            }
        }
        seen += n;
        if seen >= 2 && again == Again::Exit {
            tracing::warn!("{} again: exiting at once, without saving", name(sig));
            // SAFETY: _exit ends the process without running anything of ours.
            #[cfg(unix)]
            unsafe {
                libc::_exit(128 + sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_keeps_its_first_reason_and_votes_round_trip() {
        let flag = StopFlag::new();
        assert_eq!(flag.reason(), None);
        let shared = flag.clone();
        shared.set(StopReason::Signal(15));
        flag.request();
        assert_eq!(flag.reason(), Some(StopReason::Signal(15)), "the first one");
        for r in [
            StopReason::Signal(2),
            StopReason::Signal(15),
            StopReason::Requested,
        ] {
            assert_eq!(StopReason::from_code(r.code() as f32 as i32), Some(r));
        }
        assert_eq!(StopReason::from_code(0), None);
        assert_eq!(StopReason::Signal(2).exit_code(), 130);
        assert_eq!(StopReason::Signal(15).to_string(), "SIGTERM");
    }
}
