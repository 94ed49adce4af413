//! Multi-process training: `ferrovit launch` runs ranks as processes over the TCP
//! group; they train, save and resume across layouts; a killed rank brings the others
//! down with a clear error instead of a hang; bad layouts are refused up front.

use crate::common::{ferrovit, temp_dir, TINY};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A three-block model of width 32 (pp up to 3).
const MODEL: [&str; 10] = [
    "--dim",
    "32",
    "--depth",
    "3",
    "--heads",
    "2",
    "--mlp-dim",
    "64",
    "--seed",
    "7",
];

fn launch(nproc: usize, train: &[&str]) -> (bool, String, String) {
    let n = nproc.to_string();
    let args = [
        &["launch", "--nproc", &n, "--", "train", "--epochs", "2"],
        &MODEL[..],
        train,
    ]
    .concat();
    ferrovit(&args)
}

/// Train and test loss per epoch, from metrics.jsonl.
fn losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["train_loss", "test_loss"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 2e-3 * y.abs(), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn processes_train_save_and_resume_across_layouts() {
    let root = temp_dir("launch");
    let dir = |n: &str| root.join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // reference: one process, one rank
    let single = dir("single");
    let (ok, _, err) = ferrovit(
        &[
            &["train", "--epochs", "2"],
            &MODEL[..],
            &["--out", &s(&single)],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    // two processes: dp = WORLD_SIZE = 2
    let a = dir("a");
    let (ok, stdout, err) = launch(2, &["--out", &s(&a)]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("final test accuracy"),
        "rank 0 reports: {stdout}"
    );
    assert_eq!(
        stdout.matches("final test accuracy").count(),
        1,
        "only rank 0 reports"
    );
    assert_close(&losses(&a), &losses(&single), "dp=2 in 2 processes");
    // four processes, dp=2 × pp=2, resuming the two-process run's epoch-1 checkpoint
    let from = s(&a.join("checkpoints").join("step-0000000023"));
    let b = dir("b");
    let (ok, stdout, err) = launch(4, &["--pp", "2", "--out", &s(&b), "--resume", &from]);
    assert!(ok, "{err}");
    assert!(stdout.contains("saved under dp=2"), "{stdout}");
    assert_close(&losses(&b), &losses(&single), "resumed as dp=2 × pp=2");
    // and back: a four-process run's checkpoint resumed by 2 processes as pp=2
    let d = dir("d");
    let (ok, _, err) = launch(4, &["--dp", "2", "--pp", "2", "--out", &s(&d)]);
    assert!(ok, "{err}");
    assert_close(&losses(&d), &losses(&single), "dp=2 × pp=2 in 4 processes");
    let from = s(&d.join("checkpoints").join("step-0000000023"));
    let c = dir("c");
    let (ok, _, err) = launch(2, &["--pp", "2", "--out", &s(&c), "--resume", &from]);
    assert!(ok, "{err}");
    assert_close(&losses(&c), &losses(&single), "resumed as pp=2");
    let (ok, stdout, err) = ferrovit(&["ckpt", "verify", &s(&c.join("checkpoints"))]);
    assert!(ok && stdout.contains("ok:"), "{stdout}{err}");
    std::fs::remove_dir_all(root).unwrap();
}

/// The RANK of a process, from its environment.
fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_rank_stops_every_other_rank_with_a_clear_error() {
    let out = temp_dir("launch-kill");
    let o = out.to_str().unwrap();
    let timeout = 120;
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
        .args([&["launch", "--nproc", "4", "--", "train"], &MODEL[..]].concat())
        .args(["--pp", "2", "--epochs", "200", "--no-save", "--out", o])
        .args(["--comm-timeout", &timeout.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until training runs (an epoch is logged), then kill rank 2
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id())).unwrap();
    let victim: u32 = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|&p| rank_of(p) == Some(2))
        .expect("rank 2 is a child of the launcher");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(timeout),
            "the ranks hang after one was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    // the others noticed the closed connections, not the timeout
    assert!(
        killed.elapsed() < Duration::from_secs(timeout / 2),
        "{:?}",
        killed.elapsed()
    );
    assert!(err.contains("rank 2 left the group"), "{err}");
    for r in [0, 1, 3] {
        assert!(
            err.contains(&format!("error (rank {r})")),
            "rank {r}: {err}"
        );
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn wrong_layouts_are_refused_before_any_work() {
    let out = temp_dir("launch-bad");
    let o = out.to_str().unwrap();
    for (nproc, flags, want) in [
        (
            3,
            vec!["--dp", "2", "--pp", "2"],
            "= 4 ranks, but WORLD_SIZE is 3",
        ),
        (3, vec!["--pp", "2"], "WORLD_SIZE is 3"),
        (
            4,
            vec!["--pp", "4"],
            "more pipeline stages than the model's 3 blocks",
        ),
    ] {
        let (ok, _, err) = launch(nproc, &[&flags[..], &["--out", o]].concat());
        assert!(!ok && err.contains(want), "{flags:?}: {err}");
        assert!(!out.join("metrics.jsonl").exists(), "nothing trained");
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// The pids of `parent`'s children.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` still runs (a zombie nobody reaped has finished).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // the state follows the parenthesized command name
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(target_os = "linux")]
#[test]
fn ranks_die_with_their_launcher() {
    let out = temp_dir("launch-signal");
    for (sig, name) in [(9, "KILL"), (15, "TERM"), (2, "INT")] {
        let run = out.join(name); // one run per directory
        let o = run.to_str().unwrap();
        let mut launcher = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
            .args([&["launch", "--nproc", "2", "--", "train"], &MODEL[..]].concat())
            .args(["--epochs", "500", "--no-save", "--out", o])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let ranks = loop {
            let c = children_of(launcher.id());
            // both started, and past their exec (their environment is the ranks')
            if c.len() == 2 && c.iter().all(|&p| rank_of(p).is_some()) {
                break c;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no ranks");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(300));
        Command::new("kill")
            .args([&format!("-{name}"), &launcher.id().to_string()])
            .status()
            .unwrap();
        let killed = Instant::now();
        let status = loop {
            if let Some(s) = launcher.try_wait().unwrap() {
                break Some(s);
            }
            if killed.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while ranks.iter().any(|&p| running(p)) && killed.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<u32> = ranks.iter().copied().filter(|&p| running(p)).collect();
        for p in &left {
            Command::new("kill")
                .args(["-9", &p.to_string()])
                .status()
                .unwrap();
        }
        let _ = launcher.kill();
        let _ = launcher.wait();
        assert!(
            left.is_empty(),
            "SIG{name}: ranks {left:?} outlived the launcher"
        );
        let status = status.expect("the launcher exits");
        if sig == 9 {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9));
        } else {
            assert_eq!(status.code(), Some(128 + sig), "SIG{name}");
        }
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// A `ferrovit` command with `args`, FERROVIT_SECRET set to `secret` (or removed).
fn launch_with_secret(args: &[&str], secret: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrovit"));
    c.args(args);
    match secret {
        Some(s) => c.env("FERROVIT_SECRET", s),
        None => c.env_remove("FERROVIT_SECRET"),
    };
    c
}

#[test]
fn each_rank_computes_on_its_share_of_the_cores() {
    let out = temp_dir("launch-threads");
    let cores = std::thread::available_parallelism().unwrap().get();
    let n = (cores / 2).max(1);
    let threads = if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    };
    let run = |extra: &[&str]| {
        let args = [
            &[
                "launch",
                "--nproc",
                "2",
                "--",
                "--verbose",
                "train",
                "--epochs",
                "1",
            ][..],
            &TINY,
            &["--no-save", "--overwrite", "--out", out.to_str().unwrap()],
            extra,
        ]
        .concat();
        let (ok, stdout, err) = ferrovit(&args);
        assert!(ok, "{err}");
        stdout
    };
    let stdout = run(&[]);
    let split = format!("{threads} ({cores} cores / 2 local ranks)");
    for rank in 0..2 {
        let line = format!("[rank {rank}/2] compute on {split}\n");
        assert!(stdout.contains(&line), "{line}: {stdout}");
    }
    assert!(
        stdout.contains(&format!("augment none; {split}\n")),
        "the description line: {stdout}"
    );
    // --threads wins
    let stdout = run(&["--threads", "1"]);
    assert!(
        stdout.contains("[rank 1/2] compute on 1 thread\n"),
        "{stdout}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn two_launchers_make_one_run_as_two_nodes() {
    let out = temp_dir("launch-nodes");
    let o = out.to_str().unwrap();
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let nodes: Vec<_> = ["0", "1"]
        .iter()
        .map(|node| {
            let args = [
                &[
                    "launch",
                    "--nnodes",
                    "2",
                    "--node-rank",
                    node,
                    "--nproc-per-node",
                    "1",
                ][..],
                &[
                    "--master-port",
                    &port,
                    "--",
                    "train",
                    "--epochs",
                    "1",
                    "--dp",
                    "2",
                ],
                &TINY,
                &["--out", o, "--json", "--comm-timeout", "60"],
            ]
            .concat();
            launch_with_secret(&args, Some("0123456789abcdef0123456789abcdef"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = nodes
        .into_iter()
        .map(|n| n.wait_with_output().unwrap())
        .collect();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (node, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "node {node}: {}", text(&o.stderr));
    }
    let (first, second) = (&outputs[0], &outputs[1]);
    assert!(
        text(&first.stderr).contains("launching rank 0 of 2"),
        "{}",
        text(&first.stderr)
    );
    assert!(
        text(&second.stderr).contains("launching rank 1 of 2"),
        "{}",
        text(&second.stderr)
    );
    assert!(
        text(&first.stderr).contains("[rank 0/2] layout dp=2"),
        "{}",
        text(&first.stderr)
    );
    // rank 0 alone prints the summary, as JSON with nothing else on stdout
    let summary: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(summary["images"], 360);
    assert_eq!(losses(&out).len(), 2, "one epoch's train and test loss");
    assert!(second.stdout.is_empty(), "{}", text(&second.stdout));
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn launch_refuses_node_options_that_cannot_make_a_run() {
    let secret = Some("0123456789abcdef");
    let cases: [(&[&str], Option<&str>, &str); 8] = [
        (&["--nproc", "0"], None, "--nproc 0: must be in 1..=1024"),
        (
            &["--nproc", "5000"],
            None,
            "--nproc 5000: must be in 1..=1024",
        ),
        (
            &["--nproc", "64", "--nnodes", "2000"],
            None,
            "--nnodes 2000: must be in 1..=1024",
        ),
        (&["--nproc", "1", "--nnodes", "0"], None, "--nnodes 0"),
        (
            &[
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--master-port",
                "29500",
            ],
            secret,
            "--node-rank 2 must be below --nnodes 2",
        ),
        (
            &["--nproc", "1", "--nnodes", "2"],
            secret,
            "needs --master-port",
        ),
        (
            &["--nproc", "1", "--nnodes", "2", "--master-port", "29500"],
            None,
            "export FERROVIT_SECRET=$(openssl rand -hex 16)",
        ),
        (
            &["--nproc", "1", "--nnodes", "2", "--master-port", "29500"],
            Some("short"),
            "at least 16 characters; it has 5",
        ),
    ];
    for (flags, secret, want) in cases {
        let args = [&["launch"][..], flags, &["--", "train"]].concat();
        let out = launch_with_secret(&args, secret).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{flags:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}
