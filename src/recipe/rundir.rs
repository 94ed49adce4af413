//! One run per output directory: a lock file names the process that writes the run's
//! outputs (rank 0) while it runs; a fresh run into a directory that holds another run
//! is refused unless `--overwrite` moves that run aside.

use super::options::{Resume, TrainOptions};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::host::host_name;
use crate::trainer::Logger;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The lock file in the output directory.
pub const LOCK: &str = "train.lock";
/// Outputs that mark a directory as holding a run (besides committed checkpoints).
const RUN_FILES: [&str; 4] = ["config.toml", "metrics.jsonl", "metrics.png", "tensorboard"];
/// Largest lock file read.
const MAX_LOCK_BYTES: u64 = 4096;

/// The lock files this process holds (a lock naming this process is stale unless
/// listed here).
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// What a lock file holds: who runs in the directory.
#[derive(Serialize, Deserialize, PartialEq)]
struct Holder {
    pid: u32,
    host: String,
    /// Unix seconds when the run started.
    started: u64,
}

/// The directory's lock, held while a run writes its outputs; removed when dropped
/// (the run ended, also on an error), with the directories taking it created while
/// they are still empty (a failed start leaves nothing behind).
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    content: String,
    created: Vec<PathBuf>,
}

/// Takes `out`'s lock for this process, then checks that the run may write there: a
/// fresh run (no `--resume`, no `--overwrite`) into a directory that holds a run is
/// refused, as is resuming another run's checkpoint there.
pub fn claim(opts: &TrainOptions, logger: &Logger) -> Result<RunLock> {
    check_free(opts)?; // before the lock too: a refused start touches nothing
    let lock = RunLock::acquire(&opts.out, logger)?;
    check_free(opts)?;
    Ok(lock)
}

impl RunLock {
    /// Creates `out/train.lock` (exclusively) naming this process and host. A lock held
    /// by a live process, or by another host (whose processes cannot be checked from
    /// here), is an error naming it; a lock of a process of this host that is gone is
    /// taken over with a warning.
    pub fn acquire(out: &Path, logger: &Logger) -> Result<RunLock> {
        let created: Vec<PathBuf> = out
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let me = Holder {
            pid: std::process::id(),
            host: host_name(),
            started: unix_now_s(),
        };
        let mut lock = RunLock {
            path: out.join(LOCK),
            content: serde_json::to_string(&me).map_err(|e| Error::Message(e.to_string()))? + "\n",
            created,
        };
        let taken = lock.take(out, logger);
        if let Err(e) = taken {
            lock.content.clear(); // not ours: Drop removes only the directories
            return Err(e);
        }
        HELD.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(held_key(&lock.path));
        Ok(lock)
    }

    /// Creates the lock file, taking over a stale one (a few tries: another process may
    /// be doing the same).
    fn take(&self, out: &Path, logger: &Logger) -> Result<()> {
        for _ in 0..3 {
            match create_new(&self.path, &self.content) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
            let Some((text, holder)) = read_holder(&self.path)? else {
                continue; // removed meanwhile
            };
            self.check_stale(out, &holder)?;
            logger.warn(format!(
                "taking over the stale lock {} of pid {} on {} (that process is gone)",
                self.path.display(),
                holder.pid,
                holder.host
            ));
            // only if no other process took it over in between
            if read_holder(&self.path)?.is_some_and(|(again, _)| again == text) {
                std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))?;
            }
        }
        Err(Error::Message(format!(
            "{}: could not take the lock (other runs keep taking it)",
            self.path.display()
        )))
    }

    /// Ok if `holder` is gone (a process of this host that no longer runs); otherwise
    /// the error that refuses this run.
    fn check_stale(&self, out: &Path, holder: &Holder) -> Result<()> {
        let lock = self.path.display();
        if holder.host != host_name() {
            return Err(Error::Message(format!(
                "{} is in use by pid {} on host {} ({lock}); this host cannot tell whether that run still goes on: if it is over, remove {lock}",
                out.display(),
                holder.pid,
                holder.host
            )));
        }
        let alive = match holder.pid == std::process::id() {
            true => HELD
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&held_key(&self.path)),
            false => pid_alive(holder.pid),
        };
        if alive {
            return Err(Error::Message(format!(
                "{} is in use by another run: pid {} on host {} holds {lock} (since unix time {}); wait for it to end, or give another --out",
                out.display(),
                holder.pid,
                holder.host,
                holder.started
            )));
        }
        Ok(())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if !self.content.is_empty() {
            HELD.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&held_key(&self.path));
            // only our own lock (never one that another process took over)
            if read_holder(&self.path).is_ok_and(|h| h.is_some_and(|(t, _)| t == self.content)) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // the directories made for the lock, if the run left them empty
        for dir in &self.created {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// How [`HELD`] names a lock file: its resolved path (one directory may be named in
/// several ways).
fn held_key(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Creates `path` with `content`, failing if it exists (O_EXCL).
fn create_new(path: &Path, content: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let written = f.write_all(content.as_bytes()).and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// The lock file's text and holder; `None` if it is gone. One that names no holder is
/// an error saying how to remove it.
fn read_holder(path: &Path) -> Result<Option<(String, Holder)>> {
    let bytes = match crate::files::read_bounded(path, MAX_LOCK_BYTES, crate::files::Links::Refuse)
    {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        r => r?,
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match serde_json::from_str::<Holder>(&text) {
        Ok(h) if h.pid > 0 && h.pid <= i32::MAX as u32 => Ok(Some((text, h))),
        _ => Err(Error::Format {
            path: path.to_path_buf(),
            msg: "is a lock file that names no holder (pid and host): if no run is using this directory, remove it".into(),
        }),
    }
}

/// Whether process `pid` of this host runs (a zombie counts until it is reaped).
fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists; pid is in 1..=i32::MAX
        // (read_holder), so it never names a process group
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true // cannot tell: never take another process's lock
    }
}

/// Whole unix seconds.
fn unix_now_s() -> u64 {
    crate::host::unix_time() as u64
}

/// What in `out` belongs to an earlier run: its outputs and committed checkpoints.
fn run_files(out: &Path) -> Result<Vec<String>> {
    let mut held: Vec<String> = RUN_FILES
        .iter()
        .filter(|f| std::fs::symlink_metadata(out.join(f)).is_ok())
        .map(|f| f.to_string())
        .collect();
    let committed = checkpoint::list(&out.join("checkpoints"))?.committed.len();
    if committed > 0 {
        held.push(format!("{committed} checkpoint(s)"));
    }
    Ok(held)
}

/// Refuses a start that would mix this run's outputs with another's in `--out`: a fresh
/// run without `--overwrite`, or a resume of a checkpoint from elsewhere.
fn check_free(opts: &TrainOptions) -> Result<()> {
    let out = opts.out.display();
    if let (Some(Resume::Dir(dir)), true) = (&opts.resume, opts.overwrite) {
        if is_inside(dir, &opts.out) {
            return Err(Error::Message(format!(
                "--overwrite would move {} aside with the rest of the run in {out}: resume it without --overwrite",
                dir.display()
            )));
        }
    }
    let held = run_files(&opts.out)?;
    if held.is_empty() || opts.overwrite {
        return Ok(());
    }
    let what = held.join(", ");
    match &opts.resume {
        None => Err(Error::Message(format!(
            "{out} holds a run ({what}): continue it with --resume auto, or start afresh with --overwrite (moves it aside to {out}.old-<unix time>)"
        ))),
        Some(Resume::Dir(dir)) if !is_inside(dir, &opts.out) => Err(Error::Message(format!(
            "{out} holds a run ({what}) and {} is not one of its checkpoints: continue that run with --resume auto, give another --out, or move it aside with --overwrite",
            dir.display()
        ))),
        Some(_) => Ok(()),
    }
}

/// Whether `path` is inside directory `dir` (both resolved).
fn is_inside(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// `--overwrite`: moves everything in `out` but the lock into a new sibling directory
/// `<out>.old-<unix time>` (when `out` holds a run) and says so. Returns it.
pub fn move_aside(out: &Path, logger: &Logger) -> Result<Option<PathBuf>> {
    if run_files(out)?.is_empty() {
        return Ok(None);
    }
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| Error::io(out, e)))
        .collect::<Result<_>>()?;
    names.retain(|n| n != LOCK);
    names.sort();
    let aside = aside_dir(out)?;
    for name in &names {
        let to = aside.join(name);
        std::fs::rename(out.join(name), &to).map_err(|e| Error::io(&to, e))?;
    }
    logger.info(format!(
        "--overwrite: moved the earlier run in {} ({}) aside to {}",
        out.display(),
        names
            .iter()
            .map(|n| n.to_string_lossy())
            .collect::<Vec<_>>()
            .join(", "),
        aside.display()
    ));
    Ok(Some(aside))
}

/// A new directory beside `out`, `<out>.old-<unix time>` (`-2`, `-3`, … appended if
/// taken).
fn aside_dir(out: &Path) -> Result<PathBuf> {
    let full = out.canonicalize().map_err(|e| Error::io(out, e))?;
    let name = full.file_name().ok_or_else(|| {
        Error::Message(format!("cannot move the run in {} aside", full.display()))
    })?;
    let base = format!("{}.old-{}", name.to_string_lossy(), unix_now_s());
    for k in 1..1000 {
        let dir = full.with_file_name(match k {
            1 => base.clone(),
            k => format!("{base}-{k}"),
        });
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    Err(Error::Message(format!(
        "no free name {base}-N beside {}",
        full.display()
    )))
}
