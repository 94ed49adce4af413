//! A graceful stop with real signals: SIGINT/SIGTERM to `ferrovit train` (one process,
//! ranks in threads) or to `ferrovit launch` ends the run after the current step, on
//! every rank at the same one, with a whole checkpoint there and exit code 128 + the
//! signal; the resume continues exactly; a second signal exits at once.
//!
//! Every wait is for a line the run prints (never a fixed sleep) and is bounded, so a
//! broken build fails instead of hanging.

use crate::common::{ferrovit, temp_dir, TINY};
use ferrovit::checkpoint::{self, Checkpoint};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(180);

/// A running `ferrovit` whose stdout and stderr lines arrive on a channel.
struct Run {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    log: String,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferrovit");
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Run {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Reads lines until one contains `needle` (panics after [`WAIT`] or at the end
    /// of the output).
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log += &line;
                    self.log.push('\n');
                    if line.contains(needle) {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no line with {needle:?} ({e}):\n{}", self.log);
                }
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill only sends a signal, to our child (not reaped yet).
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// Waits (bounded) for the exit; its status and the whole output.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("still running after {WAIT:?}:\n{}", self.log);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // the pipes close with the process: the rest of the output
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.log += &line;
            self.log.push('\n');
        }
        (status, self.log)
    }
}

/// `(step, epoch)` from the line `stopped by … after step N (epoch E, batch B)…`.
fn stopped_at(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with("stopped by"))
        .unwrap_or_else(|| panic!("no `stopped by` line:\n{log}"));
    let num = |after: &str| -> u64 {
        let rest = &line[line.find(after).unwrap() + after.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    (num("after step "), num("(epoch "))
}

/// Per-epoch `(epoch, [train_loss, train_acc, test_loss, test_acc])` from metrics.jsonl,
/// exactly as written.
fn losses(out: &Path) -> Vec<(u64, [String; 4])> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let keys = ["train_loss", "train_acc", "test_loss", "test_acc"];
            (v["epoch"].as_u64().unwrap(), keys.map(|k| v[k].to_string()))
        })
        .collect()
}

/// The newest checkpoint under `out`, verified by `ferrovit ckpt verify`; its index.
fn verified(out: &Path) -> Checkpoint {
    let root = out.join("checkpoints");
    let (ok, stdout, err) = ferrovit(&["ckpt", "verify", root.to_str().unwrap()]);
    assert!(ok && stdout.starts_with("ok:"), "{stdout}{err}");
    let dir = checkpoint::newest(&root).unwrap().expect("a checkpoint");
    Checkpoint::open(&dir).unwrap()
}

#[test]
fn sigint_saves_where_it_stops_and_the_resume_equals_an_uninterrupted_run() {
    let root = temp_dir("sigint");
    let (straight, stopped) = (root.join("straight"), root.join("stopped"));
    fn run(out: &Path) -> Vec<&str> {
        [
            &[
                "train",
                "--epochs",
                "30",
                "--seed",
                "5",
                "--augment",
                "crop,flip",
            ][..],
            &TINY[..],
            &["--out", out.to_str().unwrap()],
        ]
        .concat()
    }
    let (ok, _, err) = ferrovit(&run(&straight));
    assert!(ok, "{err}");

    let mut r = Run::start(&run(&stopped));
    r.wait_for("epoch   2/30");
    r.signal(libc::SIGINT);
    r.wait_for("stopping after this step (SIGINT); a second signal exits at once");
    let (status, log) = r.finish();
    assert_eq!(status.code(), Some(130), "{log}");
    let resume = format!(
        "resume with `ferrovit train --out {} --resume auto`",
        stopped.display()
    );
    assert!(log.contains(&resume), "{log}");
    let (step, epoch) = stopped_at(&log);
    assert!(log.contains(&format!("stopping at step {step}")), "{log}");
    let ck = verified(&stopped);
    assert_eq!(ck.index.training.step, step, "saved where it stopped");
    assert_eq!(ck.index.training.epoch + 1, epoch);
    let last = verified(&straight).index.training.step;
    assert!(step < last, "stopped before the end: step {step} of {last}");

    // the checkpoint alone: no other flag
    let again = [
        "train",
        "--out",
        stopped.to_str().unwrap(),
        "--resume",
        "auto",
    ];
    let (ok, stdout, err) = ferrovit(&again);
    assert!(ok, "{err}");
    assert!(stdout.contains("resuming from"), "{stdout}");
    // bit for bit, every epoch's train and test loss: the stopped epoch's running
    // means travel in the checkpoint
    let (want, got) = (losses(&straight), losses(&stopped));
    assert_eq!(got.len(), 30);
    assert_eq!(want, got);
    let tensors = |out: &Path| verified(out).index.tensors;
    assert_eq!(tensors(&straight), tensors(&stopped), "final checkpoints");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn sigterm_exits_143_and_says_when_nothing_was_saved() {
    let out = temp_dir("sigterm");
    let o = out.to_str().unwrap();
    let args = [
        &["train", "--epochs", "1000", "--no-save", "--out", o][..],
        &TINY[..],
    ]
    .concat();
    let mut r = Run::start(&args);
    r.wait_for("epoch   1/1000");
    r.signal(libc::SIGTERM);
    let (status, log) = r.finish();
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("stopping after this step (SIGTERM)"), "{log}");
    assert!(
        log.contains("nothing was saved (--no-save); `ferrovit train --out")
            && log.contains("--resume auto`"),
        "{log}"
    );
    assert!(!out.join("checkpoints").exists());
    assert_eq!(
        losses(&out).len() as u64,
        stopped_at(&log).1 - 1,
        "whole epochs"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_second_signal_exits_at_once() {
    let out = temp_dir("twice");
    let o = out.to_str().unwrap();
    // the default model on 1024-image batches: a step of about a second, so the
    // second signal comes while the first one's step still runs
    let mut r = Run::start(&["train", "--batch-size", "1024", "--out", o]);
    r.wait_for("data ");
    r.signal(libc::SIGINT);
    r.wait_for("stopping after this step (SIGINT)");
    r.signal(libc::SIGINT);
    let (status, log) = r.finish();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("SIGINT again: exiting at once"), "{log}");
    assert!(
        !log.contains("stopped by"),
        "it did not wait to save: {log}"
    );
    let committed = checkpoint::list(&out.join("checkpoints"))
        .map(|l| l.committed.len())
        .unwrap_or(0);
    assert_eq!(committed, 0, "{log}");
    std::fs::remove_dir_all(out).unwrap();
}

/// A three-block model of width 32 (pp up to 3), as the launch tests use.
const MODEL: [&str; 8] = [
    "--dim",
    "32",
    "--depth",
    "3",
    "--heads",
    "2",
    "--mlp-dim",
    "64",
];

/// Signals a two-rank run once rank 0 has finished an epoch: it exits 128 + `sig`, both
/// ranks log the same stop step, and the checkpoint there verifies. Its tensor count.
fn stop_two_ranks(run: &[&str], out: &Path, sig: i32) -> usize {
    let args = [
        run,
        &MODEL[..],
        &["--epochs", "500", "--out", out.to_str().unwrap()],
    ]
    .concat();
    let mut r = Run::start(&args);
    r.wait_for("[rank 0/2] epoch   1/500");
    r.signal(sig);
    let (status, log) = r.finish();
    assert_eq!(status.code(), Some(128 + sig), "{run:?}: {log}");
    let (step, _) = stopped_at(&log);
    for rank in 0..2 {
        let line = format!("[rank {rank}/2] stopping at step {step} ");
        assert!(log.contains(&line), "{run:?}: rank {rank}: {log}");
    }
    assert_eq!(log.matches("stopping at step").count(), 2, "{log}");
    let ck = verified(out);
    assert_eq!(ck.index.training.step, step, "{run:?}");
    ck.index.tensors.len()
}

#[test]
fn every_rank_stops_at_the_same_step_under_launch_and_in_threads() {
    let root = temp_dir("ranks");
    let launch = ["launch", "--nproc", "2", "--", "train"];
    let dp = stop_two_ranks(&launch, &root.join("dp"), libc::SIGTERM);
    let pp = stop_two_ranks(
        &[&launch[..], &["--pp", "2"]].concat(),
        &root.join("pp"),
        libc::SIGTERM,
    );
    let threads = stop_two_ranks(&["train", "--dp", "2"], &root.join("threads"), libc::SIGINT);
    // whole: the two stages' parts make what one replica holds alone
    assert_eq!(pp, dp, "tensors of the pipeline's checkpoint");
    assert_eq!(threads, dp);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_second_signal_to_launch_kills_the_ranks_at_once() {
    let out = temp_dir("launch-twice");
    let o = out.to_str().unwrap();
    // steps of about two seconds: the second signal comes while the ranks still run
    let mut r = Run::start(&[
        "launch",
        "--nproc",
        "2",
        "--",
        "train",
        "--batch-size",
        "1024",
        "--out",
        o,
    ]);
    r.wait_for("[rank 0/2] data ");
    r.signal(libc::SIGTERM);
    r.wait_for("launch: SIGTERM: passing it on to the ranks");
    r.signal(libc::SIGTERM);
    let (status, log) = r.finish();
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(
        log.contains("launch: SIGTERM again: killing the ranks"),
        "{log}"
    );
    assert!(!log.contains("stopped by"), "{log}");
    std::fs::remove_dir_all(out).unwrap();
}
