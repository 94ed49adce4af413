//! One run per output directory: the lock (a second run refused while the first really
//! runs, a stale lock taken over, another host's refused), a fresh run into a used
//! directory refused, `--overwrite` moving the whole old run aside, and failed starts
//! that leave the directory exactly as it was.

use crate::common::{dir_snapshot, ferrovit, temp_dir, TINY};
use ferrovit::recipe::{RunLock, LOCK};
use ferrovit::trainer::Logger;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// A one-epoch TINY run into `out` with `extra` flags: (success, stdout, stderr).
fn train(out: &Path, extra: &[&str]) -> (bool, String, String) {
    let args = [
        &["train", "--epochs", "1", "--out", out.to_str().unwrap()][..],
        &TINY[..],
        extra,
    ]
    .concat();
    ferrovit(&args)
}

/// Writes a lock file into `out` as a holder would.
fn write_lock(out: &Path, pid: u32, host: &str) {
    let text = serde_json::json!({"pid": pid, "host": host, "started": 0}).to_string();
    std::fs::write(out.join(LOCK), text).unwrap();
}

/// Refused with one line containing every one of `want`.
fn assert_refused((ok, stdout, err): (bool, String, String), want: &[&str]) {
    assert!(!ok, "not refused: {stdout}");
    assert!(err.lines().count() == 1, "{err}");
    for w in want {
        assert!(err.contains(w), "{w}: {err}");
    }
}

#[test]
fn a_failed_start_leaves_the_output_directory_as_it_was() {
    let root = temp_dir("failed-start");
    let out = root.join("run");
    let o = out.to_str().unwrap().to_string();
    let (ok, _, err) = train(&out, &[]);
    assert!(ok, "{err}");
    let before = dir_snapshot(&root);
    let unchanged = |what: &str| assert!(dir_snapshot(&root) == before, "{what} wrote");
    // a fresh run into a directory that holds one
    assert_refused(
        train(&out, &[]),
        &[&o, "holds a run", "--resume auto", "--overwrite"],
    );
    unchanged("a fresh run");
    // bad data, resuming or starting afresh (nothing is moved aside)
    for flags in [&["--resume", "auto"][..], &["--overwrite"][..]] {
        let args = [flags, &["--data", "/nonexistent/data"][..]].concat();
        assert_refused(train(&out, &args), &["/nonexistent/data"]);
        unchanged("bad data");
    }
    // a contradiction of the checkpoint
    assert_refused(
        ferrovit(&["train", "--out", &o, "--resume", "auto", "--dim", "64"]),
        &["--dim 64", "dim 32"],
    );
    unchanged("a contradiction");
    // a directory locked by a live process (this test's)
    write_lock(&out, std::process::id(), &host());
    let before = dir_snapshot(&root);
    assert_refused(
        ferrovit(&["train", "--out", &o, "--resume", "auto"]),
        &[&format!("pid {}", std::process::id()), &host(), LOCK],
    );
    assert!(dir_snapshot(&root) == before, "a locked directory changed");
    // a directory that did not exist does not exist afterwards
    let new = root.join("new").join("run");
    assert_refused(
        train(&new, &["--data", "/nonexistent/data"]),
        &["/nonexistent"],
    );
    assert!(!root.join("new").exists(), "the failed start left {new:?}");
    std::fs::remove_dir_all(root).unwrap();
}

/// Waits up to 2 minutes for `path` to exist.
fn wait_for(path: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_second_run_is_refused_while_the_first_runs_and_a_stale_lock_is_taken_over() {
    let root = temp_dir("lock");
    let out = root.join("run");
    let o = out.to_str().unwrap().to_string();
    let args = [
        &["train", "--epochs", "1000", "--no-save", "--out", &o][..],
        &TINY[..],
    ]
    .concat();
    let mut first = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // config.toml is written once the run holds the lock and has started
    let started = wait_for(&out.join("config.toml"));
    let pid = format!("pid {}", first.id());
    let lock = out.join(LOCK);
    let second = ferrovit(&["train", "--out", &o, "--resume", "auto"]);
    let third = train(&out, &["--overwrite"]);
    let held = std::fs::read_to_string(&lock).unwrap_or_default();
    first.kill().unwrap(); // SIGKILL: the lock stays behind
    first.wait().unwrap();
    assert!(started, "the first run never started");
    assert!(held.contains(&first.id().to_string()), "{held}");
    assert_refused(second, &[&pid, &host(), lock.to_str().unwrap()]);
    assert_refused(third, &[&pid]);
    assert!(
        out.join("metrics.jsonl").exists(),
        "--overwrite moved a live run"
    );

    // the holder is gone: its lock is taken over, and removed when the run ends
    assert!(lock.exists(), "a killed run leaves its lock");
    let (ok, stdout, err) = train(&out, &["--resume", "auto"]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("taking over the stale lock") && stdout.contains(&pid),
        "{stdout}"
    );
    assert!(!lock.exists(), "the lock outlived its run");

    // another host's lock cannot be checked: refused, saying how to remove it
    write_lock(&out, 1, "elsewhere.invalid");
    let l = lock.to_str().unwrap();
    assert_refused(
        ferrovit(&["train", "--out", &o, "--resume", "auto"]),
        &["pid 1 on host elsewhere.invalid", &format!("remove {l}")],
    );
    std::fs::write(&lock, "garbage").unwrap();
    assert_refused(
        ferrovit(&["train", "--out", &o, "--resume", "auto"]),
        &[l, "names no holder"],
    );
    std::fs::remove_file(&lock).unwrap();

    // in one process: the lock is this process's while it is held, and only then
    let logger = Logger::default();
    let held = RunLock::acquire(&out, &logger).unwrap();
    let again = RunLock::acquire(&out, &logger).unwrap_err().to_string();
    assert!(
        again.contains(&format!("pid {}", std::process::id())),
        "{again}"
    );
    drop(held);
    assert!(!lock.exists());
    write_lock(&out, std::process::id(), &host()); // left by an earlier run of this pid
    drop(RunLock::acquire(&out, &logger).unwrap());
    std::fs::remove_dir_all(root).unwrap();
}

/// The sibling directories of `out` that `--overwrite` made.
fn set_aside(out: &Path) -> Vec<PathBuf> {
    let name = out.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with(&format!("{name}.old-"))
        })
        .collect()
}

#[test]
fn overwrite_moves_the_whole_old_run_aside() {
    let root = temp_dir("overwrite");
    let out = root.join("run");
    let (ok, _, err) = train(&out, &[]);
    assert!(ok, "{err}");
    std::fs::create_dir_all(out.join("tensorboard")).unwrap();
    std::fs::write(out.join("tensorboard/events.out"), b"events").unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let old = dir_snapshot(&out);
    let (ok, stdout, err) = train(&out, &["--overwrite", "--seed", "3"]);
    assert!(ok, "{err}");
    let aside = set_aside(&out);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        stdout.contains("moved the earlier run") && stdout.contains(aside[0].to_str().unwrap()),
        "{stdout}"
    );
    assert!(
        dir_snapshot(&aside[0]) == old,
        "the old run, whole and unchanged"
    );
    let mut now: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    now.sort();
    assert_eq!(
        now,
        ["checkpoints", "config.toml", "metrics.jsonl", "metrics.png"],
        "the new run alone"
    );
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("seed = 3"), "{config}");
    std::fs::remove_dir_all(root).unwrap();
}
