//! Runs `nproc` copies of a program on this machine as ranks of one process group, as
//! torchrun does: each child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//! MASTER_ADDR, MASTER_PORT, FERROVIT_SECRET and FERROVIT_LAUNCHED=1 and joins the group
//! with [`crate::dist::TcpGroup::from_env`]. On one machine the secret is drawn afresh
//! for each run, so that no process outside it can join; with several (`nnodes`, one
//! launcher per machine, node `node_rank` starting ranks `node_rank × nproc ..`) every
//! launcher passes on the FERROVIT_SECRET of its environment, which must be the same.
//!
//! When one child fails, the others normally fail soon after by themselves (their
//! connections to it close); those that do not within the grace period are killed.
//! The children do not outlive the launcher: SIGTERM and SIGINT are passed on to them
//! (a `ferrovit train` rank then stops after its current step and saves a checkpoint;
//! those still running after the stop timeout, or at once on a second signal, are
//! killed, and the launcher exits with 128 + the signal), and on Linux a launcher
//! killed outright takes them along (PR_SET_PDEATHSIG).

use crate::error::{Error, Result};
use crate::signals::{self, Caught};
use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to launch and how.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Processes (ranks) to start on this machine.
    pub nproc: usize,
    /// Machines taking part, each running a launcher with the same options but its own
    /// `node_rank`.
    pub nnodes: usize,
    /// This machine's index, below `nnodes`: it starts ranks `node_rank × nproc ..`,
    /// and node 0's first rank hosts the rendezvous store.
    pub node_rank: usize,
    /// Where rank 0 hosts the rendezvous store.
    pub master_addr: String,
    /// Its port; 0 picks a free one (on one machine only).
    pub master_port: u16,
    /// The children's command-line arguments.
    pub args: Vec<String>,
    /// The program to run; `None`: this executable (`std::env::current_exe`).
    pub program: Option<PathBuf>,
    /// How long the other children may take to exit by themselves after one failed,
    /// before they are killed.
    pub grace: Duration,
    /// How long the children may take to stop (finish their step, save, exit) after a
    /// SIGTERM or SIGINT passed on to them, before they are killed.
    pub stop_timeout: Duration,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            nproc: 1,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            args: Vec::new(),
            program: None,
            grace: Duration::from_secs(10),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
}

/// How often the children are polled.
const POLL: Duration = Duration::from_millis(20);

/// [`LaunchOptions::stop_timeout`]'s default: a step and a checkpoint save of a large
/// model, with room to spare.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// The exit code that reports `status` (128 + the signal for a child killed by one,
/// as shells do).
fn exit_code(status: ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        return c;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

/// A free port on `addr` (the OS picks; it is released again, so another process
/// could take it before rank 0 binds it — unlikely enough).
fn free_port(addr: &str) -> Result<u16> {
    TcpListener::bind((addr, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Config(format!("launch: cannot find a free port on {addr}: {e}")))
}

/// Most processes one launcher starts.
pub const MAX_NPROC: usize = 1024;

/// Shortest FERROVIT_SECRET accepted for a run over several machines.
pub const MIN_SECRET_LEN: usize = 16;

/// Refuses options that cannot make a group: counts out of bounds, a node rank past
/// the nodes, no address, several machines without a fixed port.
fn check(opts: &LaunchOptions) -> Result<()> {
    let bad = |msg: String| Err(Error::Config(format!("launch: {msg}")));
    if !(1..=MAX_NPROC).contains(&opts.nproc) {
        return bad(format!(
            "--nproc {}: must be in 1..={MAX_NPROC}",
            opts.nproc
        ));
    }
    let max_nodes = crate::dist::MAX_WORLD / opts.nproc;
    if !(1..=max_nodes).contains(&opts.nnodes) {
        return bad(format!(
            "--nnodes {}: must be in 1..={max_nodes} (nnodes × nproc at most {} ranks)",
            opts.nnodes,
            crate::dist::MAX_WORLD
        ));
    }
    if opts.node_rank >= opts.nnodes {
        return bad(format!(
            "--node-rank {} must be below --nnodes {}",
            opts.node_rank, opts.nnodes
        ));
    }
    if opts.master_addr.is_empty() {
        return bad("the master address is empty".into());
    }
    if opts.nnodes > 1 && opts.master_port == 0 {
        return bad(format!(
            "--nnodes {} needs --master-port: every node must find rank 0's store at the same port",
            opts.nnodes
        ));
    }
    Ok(())
}

/// The run's secret: drawn afresh on one machine; over several, `env_secret` (this
/// launcher's FERROVIT_SECRET), which every node must share.
fn run_secret(opts: &LaunchOptions, env_secret: Option<String>) -> Result<String> {
    if opts.nnodes == 1 {
        return crate::dist::random_secret()
            .map_err(|e| Error::Message(format!("launch: cannot draw the run's secret: {e}")));
    }
    match env_secret {
        Some(s) if s.len() >= MIN_SECRET_LEN => Ok(s),
        given => Err(Error::Config(format!(
            "launch: --nnodes {} needs the run's secret in FERROVIT_SECRET (the same on every node, at least {MIN_SECRET_LEN} characters; {}): e.g. `export FERROVIT_SECRET=$(openssl rand -hex 16)` on one node and the same value on the others",
            opts.nnodes,
            match given {
                Some(s) => format!("it has {}", s.len()),
                None => "it is unset".into(),
            }
        ))),
    }
}

/// Starts the ranks, waits for all of them, and returns the exit code of the first
/// one that failed (0 when all succeeded).
pub fn launch(opts: &LaunchOptions) -> Result<i32> {
    check(opts)?;
    let secret = run_secret(
        opts,
        std::env::var_os("FERROVIT_SECRET").map(|s| s.to_string_lossy().into_owned()),
    )?;
    let program = match &opts.program {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::Message(format!("launch: cannot find this executable: {e}")))?,
    };
    let port = match opts.master_port {
        0 => free_port(&opts.master_addr)?,
        p => p,
    };
    let first = opts.node_rank * opts.nproc;
    let world = opts.nnodes * opts.nproc;
    let ranks = match opts.nproc {
        1 => format!("rank {first}"),
        n => format!("ranks {first} to {}", first + n - 1),
    };
    tracing::info!(
        "launching {ranks} of {world} ({}; master {}:{port})",
        program.display(),
        opts.master_addr
    );

    // before the first child exists, so that none can be left behind by a signal
    let signals = Caught::install()
        .map_err(|e| Error::Message(format!("launch: cannot handle signals: {e}")))?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(opts.nproc);
    for local in 0..opts.nproc {
        let rank = first + local;
        let mut cmd = Command::new(&program);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("FERROVIT_SECRET", &secret)
            .env("FERROVIT_LAUNCHED", "1");
        die_with_launcher(&mut cmd);
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::Message(format!(
                    "launch: cannot start rank {rank} ({}): {e}",
                    program.display()
                )));
            }
        }
    }
    wait_all(children, (opts.grace, opts.stop_timeout), &signals)
}

/// Makes the child `cmd` starts die (SIGKILL) when this thread, the launcher's, dies —
/// even by SIGKILL, which no handler sees. (Linux ties this to the spawning thread,
/// which waits for the children until they are all reaped.)
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let launcher = std::process::id() as libc::pid_t;
    let arm = move || {
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of ours.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // the launcher died before prctl took effect: nobody would send the signal
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: `arm` only makes async-signal-safe calls and allocates nothing, as the
    // child of a multi-threaded process must between fork and exec.
    unsafe {
        cmd.pre_exec(arm);
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_cmd: &mut Command) {}

/// A watcher's report: rank `.0` exited at `.1` (`None`: the watcher could not wait,
/// poll the child instead).
type Exit = (usize, Option<Instant>);

/// Reports when the child `pid` exits, without reaping it: the launcher reaps it (so
/// its pid stays reserved for `kill` until then), and learns the order in which
/// children exited, which polling several children at once would lose.
#[cfg(unix)]
fn watch(pid: u32, rank: usize, tx: Sender<Exit>) -> Option<JoinHandle<()>> {
    let watcher = move || {
        let exited = loop {
            // SAFETY: waitid only writes the zero-initialized `info` it is given.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                break true;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break false;
            }
        };
        let _ = tx.send((rank, exited.then(Instant::now)));
    };
    std::thread::Builder::new()
        .name(format!("ferrovit-launch-{rank}"))
        .spawn(watcher)
        .ok()
}

#[cfg(not(unix))]
fn watch(_pid: u32, _rank: usize, _tx: Sender<Exit>) -> Option<JoinHandle<()>> {
    None
}

/// Waits for every child; after the first failure kills those still running once
/// `grace` has passed, after a SIGTERM or SIGINT to the launcher (passed on to them)
/// once `stop_timeout` has (at once on a second signal).
/// 128 + the signal, else the first failure's exit code, or 0.
fn wait_all(
    mut children: Vec<Option<Child>>,
    (grace, stop_timeout): (Duration, Duration),
    signals: &Caught,
) -> Result<i32> {
    let n = children.len();
    let (tx, rx) = mpsc::channel::<Exit>();
    // children without a watcher are polled
    let mut polled = vec![true; n];
    let mut watchers = Vec::new();
    for (rank, child) in children.iter().enumerate() {
        if let Some(c) = child {
            if let Some(w) = watch(c.id(), rank, tx.clone()) {
                watchers.push(w);
                polled[rank] = false;
            }
        }
    }
    drop(tx);

    let mut exited_at: Vec<Option<Instant>> = vec![None; n];
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut stopped_by: Option<i32> = None;
    let result = loop {
        if let Some((sig, n)) = signals.take() {
            let again = stopped_by.is_some() || n > 1;
            let at = forward(sig, &children, again, stop_timeout);
            kill_at = sooner(kill_at, at);
            stopped_by = Some(sig);
        }
        if children.iter().all(Option::is_none) {
            break Ok(());
        }
        let mut wait = POLL;
        if let Some(t) = kill_at {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        let mut events: Vec<Exit> = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(e) => events.push(e),
            Err(RecvTimeoutError::Timeout) => {}
            // no watcher left: only polled children remain
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
        events.extend(rx.try_iter());
        for (rank, at) in events {
            match at {
                Some(t) => exited_at[rank] = Some(t),
                None => polled[rank] = true,
            }
        }
        // reap the children that exited, in the order they did
        let mut done: Vec<(Instant, usize, ExitStatus)> = Vec::new();
        let mut wait_error = None;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if !polled[rank] && exited_at[rank].is_none() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    let at = exited_at[rank].unwrap_or_else(Instant::now);
                    done.push((at, rank, status));
                    *slot = None;
                }
                Ok(None) => polled[rank] = true, // reported but not reapable: poll it
                Err(e) => {
                    wait_error = Some(Error::Message(format!(
                        "launch: cannot wait for rank {rank}: {e}"
                    )));
                    break;
                }
            }
        }
        if let Some(e) = wait_error {
            break Err(e);
        }
        done.sort_by_key(|&(at, rank, _)| (at, rank));
        for (_, rank, status) in done {
            if status.success() {
                tracing::debug!("rank {rank} finished");
            } else if stopped_by.is_some() && stopped_by_signal(status) {
                tracing::debug!("rank {rank} stopped ({status})");
            } else if first_failure.is_none() {
                tracing::error!(
                    "rank {rank} failed first ({status}); the others get {grace:?} to exit"
                );
                first_failure = Some((rank, status));
                // None: a grace of forever
                kill_at = sooner(kill_at, Instant::now().checked_add(grace));
            } else {
                tracing::warn!("rank {rank} exited too ({status})");
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            let stragglers: Vec<usize> = (0..n).filter(|&r| children[r].is_some()).collect();
            if !stragglers.is_empty() {
                let why = match stopped_by {
                    Some(sig) => format!("after {}", signals::name(sig)),
                    None => "after the first failure".into(),
                };
                tracing::warn!("killing rank(s) {stragglers:?}, still running {why}");
            }
            break Ok(());
        }
    };
    kill_all(&mut children);
    for w in watchers {
        let _ = w.join(); // every child is reaped by now, so their waits have ended
    }
    result.map(|()| match stopped_by {
        Some(sig) => 128 + sig,
        None => first_failure.map_or(0, |(_, s)| exit_code(s)),
    })
}

/// Whether a child's exit is a stop by SIGINT or SIGTERM (its own exit code 128 +
/// the signal after a graceful stop, or the signal itself).
fn stopped_by_signal(status: ExitStatus) -> bool {
    #[cfg(unix)]
    {
        let code = exit_code(status);
        code == 128 + libc::SIGINT || code == 128 + libc::SIGTERM
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        false
    }
}

/// The earlier of two deadlines (`None`: none yet).
fn sooner(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Passes the launcher's signal `sig` on to the children still running, as torchrun
/// does; when to kill those that remain: after `timeout` (time to finish a step and
/// save), or at once on a second signal (`again`), the user's way to insist.
fn forward(
    sig: i32,
    children: &[Option<Child>],
    again: bool,
    timeout: Duration,
) -> Option<Instant> {
    let name = signals::name(sig);
    if again {
        tracing::warn!("launch: {name} again: killing the ranks");
        return Some(Instant::now());
    }
    tracing::warn!(
        "launch: {name}: passing it on to the ranks, which stop after their current step and save; a second signal kills them (so does {timeout:?} without exiting)"
    );
    for child in children.iter().flatten() {
        signals::send(child.id(), sig);
    }
    Instant::now().checked_add(timeout)
}

/// Kills and reaps every child still running.
fn kill_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().filter_map(Option::take) {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
}
