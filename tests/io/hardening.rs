//! Hostile and broken input through the command line, and crashes at the worst
//! moments (issue 18): absurd model flags are errors, random damage to a checkpoint
//! never changes an answer, retention and failed saves leave nothing that looks like a
//! checkpoint, and a pipeline rank's death ends a parallel save at once.

use crate::common::{temp_dir, TINY};
use ferrovit::checkpoint::{self, Checkpoint};
use ferrovit::rng::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a run of the binary ended.
struct Outcome {
    /// The exit code, `None` when a signal ended it (or it ran past its limit).
    code: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

fn bin() -> PathBuf {
    std::env::var_os("FERROVIT_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ferrovit").into())
        .into()
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferrovit")
}

/// Waits for `child` at most `limit` (then kills it); collects its output.
fn finish(mut child: Child, limit: Duration) -> Outcome {
    let take = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = take(child.stdout.take().map(|r| Box::new(r) as _));
    let err = take(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        timed_out,
    }
}

fn run(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Outcome {
    finish(spawn(args, env), limit)
}

/// Waits until `path` holds `text` (a child's stderr is streamed into it).
fn wait_for_text(path: &Path, text: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A run that failed as it should: exit code 1, an `error:` line, no panic.
fn assert_clean_error(o: &Outcome, what: &str) {
    assert!(!o.timed_out, "{what}: hung\n{}", o.stderr);
    assert_eq!(o.code, Some(1), "{what}: exit {:?}\n{}", o.code, o.stderr);
    assert!(o.stderr.contains("error:"), "{what}: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{what}: {}", o.stderr);
}

#[test]
fn absurd_model_flags_are_errors_not_crashes() {
    let out = temp_dir("absurd-flags");
    let out = out.to_str().unwrap();
    for (flag, value, want) in [
        (
            "--dim",
            "4611686018427387904",
            "dim 4611686018427387904 is outside",
        ),
        ("--depth", "1000000000", "depth 1000000000 is outside"),
        (
            "--mlp-dim",
            "1099511627776",
            "mlp_dim 1099511627776 is outside",
        ),
        ("--heads", "0", "heads 0 is outside"),
        ("--dropout", "1.5", "dropout 1.5 is outside [0, 1)"),
        // big but bounded sizes: refused by the parameter count before any allocation
        ("--depth", "1024", "parameters"),
    ] {
        let mut args = vec!["train", "--epochs", "1", "--no-save", "--out", out];
        if want == "parameters" {
            args.extend(["--dim", "65536"]);
        }
        args.extend([flag, value]);
        let o = run(&args, &[], Duration::from_secs(60));
        assert_clean_error(&o, flag);
        assert!(o.stderr.contains(want), "{flag}: {}", o.stderr);
    }
}

/// Trains a tiny model for one epoch; returns (output dir, its checkpoint).
fn tiny_checkpoint(name: &str, extra: &[&str], env: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let out = temp_dir(name);
    let mut args = vec!["train", "--epochs", "1", "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    let o = run(&args, env, Duration::from_secs(300));
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let root = out.join("checkpoints");
    let ck = checkpoint::newest(&root).unwrap().expect("a checkpoint");
    (out, ck)
}

/// The commands that read a checkpoint, each with what it printed on the intact one.
fn readers(ck: &Path, export: &Path) -> Vec<(Vec<String>, String)> {
    let ck = ck.to_str().unwrap().to_string();
    let export = export.to_str().unwrap();
    let commands: Vec<Vec<String>> = [
        vec!["ckpt", "verify", &ck],
        vec!["eval", "--ckpt", &ck, "--json"],
        vec!["infer", "--ckpt", &ck, "--json", "data/examples/seven.png"],
        vec!["ckpt", "export", &ck, "--safetensors", export],
    ]
    .iter()
    .map(|c| c.iter().map(|s| s.to_string()).collect())
    .collect();
    commands
        .into_iter()
        .map(|c| {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            let o = run(&args, &[], Duration::from_secs(120));
            assert_eq!(
                o.code,
                Some(0),
                "{c:?} on the intact checkpoint: {}",
                o.stderr
            );
            (c, o.stdout)
        })
        .collect()
}

#[test]
fn random_damage_to_a_checkpoint_never_changes_an_answer() {
    let (out, ck) = tiny_checkpoint("fuzz-cli", &[], &[]);
    let baseline = readers(&ck, &out.join("export.safetensors"));
    let files: Vec<PathBuf> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let index = files
        .iter()
        .position(|f| f.ends_with(checkpoint::INDEX))
        .unwrap();
    let mut rng = Rng::new(18);
    let (mut refused, mut same) = (0, 0);
    for round in 0..60 {
        // half the damage goes to the index, the rest to any file
        let k = if round % 2 == 0 {
            index
        } else {
            (rng.next_u64() % files.len() as u64) as usize
        };
        let mut b = originals[k].clone();
        let at = (rng.next_u64() % b.len().max(1) as u64) as usize;
        match round % 3 {
            0 => b[at] ^= 1 << (rng.next_u64() % 8),
            1 => b.truncate(at),
            _ => b
                .iter_mut()
                .skip(at)
                .take(16)
                .for_each(|x| *x = rng.next_u64() as u8),
        }
        std::fs::write(&files[k], &b).unwrap();
        for (args, want) in &baseline {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = run(&argv, &[], Duration::from_secs(120));
            let what = format!("round {round}, {} damaged, {args:?}", files[k].display());
            match o.code {
                Some(0) => {
                    assert_eq!(&o.stdout, want, "{what}: a different answer");
                    same += 1;
                }
                _ => {
                    assert_clean_error(&o, &what);
                    refused += 1;
                }
            }
        }
        std::fs::write(&files[k], &originals[k]).unwrap();
    }
    eprintln!("refused {refused}, unchanged {same}");
    assert!(refused > 100, "refused {refused}, unchanged {same}");
    std::fs::remove_dir_all(out).unwrap();
}

/// Every committed checkpoint under `root` opens and verifies.
fn all_committed_verify(root: &Path) -> usize {
    let listing = checkpoint::list(root).unwrap();
    for dir in &listing.committed {
        let ck = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{e}"));
        ck.verify().unwrap_or_else(|e| panic!("{e}"));
    }
    listing.committed.len()
}

/// No staging or half-deleted directory under `root`.
fn assert_nothing_uncommitted(root: &Path) {
    let listing = checkpoint::list(root).unwrap();
    assert!(
        listing.uncommitted.is_empty(),
        "left behind: {:?}",
        listing.uncommitted
    );
}

#[test]
fn a_crash_while_retention_deletes_leaves_no_broken_checkpoint() {
    let out = temp_dir("retention-crash");
    let log = out.join("stderr.log");
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--save-every-steps",
        "1",
        "--keep-last",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(TINY);
    let child = Command::new(bin())
        .args(&args)
        .env("FERROVIT_FAULT_DELETE_AFTER", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stopped = wait_for_text(&log, "fault: stopped", Duration::from_secs(120));
    let o = finish(child, Duration::ZERO); // killed where retention stopped
    assert!(stopped, "retention never deleted a file: {}", o.stderr);
    let root = out.join("checkpoints");
    assert!(all_committed_verify(&root) >= 1);
    let listed = run(
        &["ckpt", "list", root.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_save_that_fails_on_a_full_disk_leaves_no_staging_directory() {
    let out = temp_dir("disk-full");
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--save-every-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(TINY);
    // the second save runs out of space after 100 bytes
    let env = [
        ("FERROVIT_FAULT_SAVE", "1"),
        ("FERROVIT_FAULT_STOP_AT_BYTE", "100"),
        ("FERROVIT_FAULT_ENOSPC", "1"),
    ];
    let o = run(&args, &env, Duration::from_secs(120));
    assert_clean_error(&o, "a save on a full disk");
    assert!(o.stderr.contains("disk full"), "{}", o.stderr);
    let root = out.join("checkpoints");
    assert_nothing_uncommitted(&root);
    assert_eq!(all_committed_verify(&root), 1, "the first save stays");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_pipeline_rank_killed_during_a_save_stops_rank_0_at_once() {
    let out = temp_dir("rank-dies-in-save");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let args = vec![
        "train",
        "--epochs",
        "3",
        "--pp",
        "2",
        "--save-every-steps",
        "1",
        "--comm-timeout",
        "300",
        "--dim",
        "32",
        "--depth",
        "2",
        "--mlp-dim",
        "32",
        "--out",
        out.to_str().unwrap(),
    ];
    let rank = |r: &str, log: &Path, fault: bool| {
        let mut c = Command::new(bin());
        c.args(&args)
            .envs([
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("WORLD_SIZE", "2"),
                ("RANK", r),
                ("LOCAL_RANK", r),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        if fault {
            // rank 1 stops in the middle of writing its first shard
            c.envs([
                ("FERROVIT_FAULT_SAVE", "0"),
                ("FERROVIT_FAULT_STOP_AT_BYTE", "64"),
            ]);
        }
        c.spawn().unwrap()
    };
    let (log0, log1) = (out.join("rank0.log"), out.join("rank1.log"));
    let r0 = rank("0", &log0, false);
    let mut r1 = rank("1", &log1, true);
    let stopped = wait_for_text(&log1, "fault: stopped", Duration::from_secs(120));
    r1.kill().unwrap();
    let _ = r1.wait();
    assert!(stopped, "rank 1 never reached its save");
    let killed = Instant::now();
    let o = finish(r0, Duration::from_secs(60));
    assert!(
        !o.timed_out && killed.elapsed() < Duration::from_secs(30),
        "rank 0 waited {:?} for a dead rank",
        killed.elapsed()
    );
    assert_ne!(o.code, Some(0));
    assert!(
        !std::fs::read_to_string(&log0).unwrap().contains("panicked"),
        "{}",
        std::fs::read_to_string(&log0).unwrap()
    );
    assert!(all_committed_verify(&out.join("checkpoints")) == 0);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn data_parallel_saves_leave_no_staging_directories() {
    // ranks as processes, as `launch` runs them: a replica that reached its save after
    // rank 0 had committed used to create the staging directory again, empty
    let out = temp_dir("dp-staging");
    let mut args = vec!["launch", "--nproc", "2", "--", "train", "--epochs", "1"];
    args.extend(["--dp", "2", "--save-every-steps", "1", "--out"]);
    args.push(out.to_str().unwrap());
    args.extend(TINY);
    let o = run(&args, &[], Duration::from_secs(300));
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let root = out.join("checkpoints");
    assert_nothing_uncommitted(&root);
    assert!(all_committed_verify(&root) > 1);
    std::fs::remove_dir_all(out).unwrap();
}
