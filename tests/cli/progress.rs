//! Progress anywhere (issue 20): log lines when stderr is not a terminal, `step` and
//! `time` in metrics.jsonl at their precision, and TensorBoard event files, read back by
//! a reader written here (framing, CRCs, protobuf) and by the `tensorboard` package.

use crate::common::{ferrovit, temp_dir, TINY};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ferrovit train` on the tiny model into `out` with `extra` flags; (stdout, stderr).
fn train(out: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    let (ok, stdout, stderr) = ferrovit(&args);
    assert!(ok, "{stderr}");
    (stdout, stderr)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn log_lines_replace_the_bar_when_stderr_is_a_pipe() {
    let out = temp_dir("lines");
    // stdout and stderr are pipes here
    let (stdout, stderr) = train(&out, &["--epochs", "2", "--log-interval", "1"]);
    let per_epoch = metrics(&out)[0]["step"].as_u64().unwrap();
    let total = 2 * per_epoch;
    let lines: Vec<&str> = stdout.lines().collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line `{prefix}…`:\n{stdout}"))
    };
    let mut previous = 0;
    for step in 1..=total {
        let (epoch, batch) = ((step - 1) / per_epoch + 1, (step - 1) % per_epoch + 1);
        let i = at(&format!(
            "step {step}/{total}  epoch {epoch}/2 batch {batch}/{per_epoch}  loss "
        ));
        let line = lines[i];
        for part in ["  acc ", "%  lr ", " img/s  ETA "] {
            assert!(line.contains(part), "{part:?} missing: {line}");
        }
        assert!(i > previous || step == 1, "out of order: {line}");
        previous = i;
        // the epoch's summary line comes after its last step and before the next epoch's
        let summary = at(&format!("epoch {epoch:>3}/2"));
        assert!(i < summary, "step {step} after its epoch's line");
        if epoch == 2 {
            assert!(i > at("epoch   1/2"), "step {step} before epoch 1 ended");
        }
    }
    assert!(
        !stderr.contains("[="),
        "no bar without a terminal: {stderr}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_time_log_interval_waits_its_seconds() {
    let root = temp_dir("seconds");
    let out = root.join("hourly");
    let (stdout, _) = train(&out, &["--epochs", "1", "--log-interval", "3600s"]);
    assert!(
        !stdout.lines().any(|l| l.starts_with("step ")),
        "a run of seconds logs no line an hour apart:\n{stdout}"
    );
    assert!(stdout.contains("epoch   1/1"), "{stdout}");
    let out = root.join("often");
    let (stdout, _) = train(&out, &["--epochs", "1", "--log-interval", "0.000001s"]);
    let n = stdout.lines().filter(|l| l.starts_with("step ")).count();
    let per_epoch = metrics(&out)[0]["step"].as_u64().unwrap() as usize;
    assert!(n >= per_epoch - 1, "{n} lines:\n{stdout}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_log_intervals_are_refused_naming_the_flag() {
    let out = temp_dir("bad-interval");
    for bad in ["0", "5x", "0s", "1.5", "90000s", "nans"] {
        let run = out.join("run");
        let (ok, _, err) = ferrovit(&[
            "train",
            "--log-interval",
            bad,
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(!ok, "{bad} accepted");
        assert!(
            err.contains("--log-interval") && err.contains("30s") && err.lines().count() < 6,
            "{bad}: {err}"
        );
        assert!(!run.exists(), "{bad}: nothing written");
    }
    let cfg = out.join("run.toml");
    std::fs::write(&cfg, "log_interval = \"soon\"\n").unwrap();
    let (ok, _, err) = ferrovit(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && err.contains("log_interval") && err.contains("soon"),
        "{err}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn metrics_jsonl_has_integer_steps_unix_times_and_short_numbers() {
    let out = temp_dir("jsonl");
    let before = unix_now();
    // warm-up from the peak rate: every warm-up update runs at it exactly
    train(&out, &["--epochs", "3", "--warmup-lr", "0.002"]);
    let after = unix_now();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 3);
    let per_epoch = m[0]["step"].as_u64().expect("an integer step");
    // 1437 digits in batches of 64
    assert_eq!(per_epoch, 23);
    let mut last_time = before;
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["step"].as_u64(), Some((i as u64 + 1) * per_epoch));
        let time = line["time"].as_f64().unwrap();
        assert!(
            (last_time..=after).contains(&time),
            "{time} not within the run"
        );
        last_time = time;
    }
    // epoch 1's last step runs at the peak rate exactly, printed as given
    assert!(
        text.lines().next().unwrap().contains("\"lr\":0.002,"),
        "{text}"
    );
    for (line, raw) in m.iter().zip(text.lines()) {
        for (key, v) in line.as_object().unwrap() {
            if ["epoch", "step"].contains(&key.as_str()) {
                assert!(raw.contains(&format!("\"{key}\":{v},")), "{raw}");
                assert!(v.is_u64(), "{key}: {raw}");
            } else if key.ends_with("_acc") {
                // exact ratios of counts, at f64 precision (eval's accuracy)
                assert!(v.is_f64(), "{key}: {raw}");
            } else if key != "time" {
                // the shortest decimal of an f32: as f32 printed again, the same text
                let f = v.as_f64().unwrap() as f32;
                let short: f64 = f.to_string().parse().unwrap();
                assert_eq!(v.to_string(), serde_json::Value::from(short).to_string());
                let digits = v.to_string().chars().filter(char::is_ascii_digit).count();
                assert!(digits <= 12, "{key} = {v} is printed long: {raw}");
            }
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// One scalar of an event file: (tag, step) and (value, wall time).
type Scalars = BTreeMap<(String, u64), (f32, f64)>;

fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, each one's length and data checked against its
/// masked CRC-32C.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(at + 12 <= bytes.len(), "truncated header at {at}");
        let len = &bytes[at..at + 8];
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc(len), "length CRC at {at}");
        assert!(at + 16 + n <= bytes.len(), "truncated record at {at}");
        let data = &bytes[at + 12..at + 12 + n];
        let crc = u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc(data), "data CRC at {at}");
        out.push(data);
        at += 16 + n;
    }
    out
}

/// A protobuf field's payload by wire type.
#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn read_varint(b: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (byte, rest) = b.split_first().expect("truncated varint");
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint too long")
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
    assert!(b.len() >= n, "truncated field");
    let (head, rest) = b.split_at(n);
    *b = rest;
    head
}

/// A message's fields in order: (number, payload).
fn fields(mut b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b);
        let field = match key & 7 {
            0 => Field::Varint(read_varint(&mut b)),
            1 => Field::Fixed64(take(&mut b, 8).try_into().unwrap()),
            2 => {
                let n = read_varint(&mut b) as usize;
                Field::Bytes(take(&mut b, n))
            }
            5 => Field::Fixed32(take(&mut b, 4).try_into().unwrap()),
            t => panic!("wire type {t}"),
        };
        out.push((key >> 3, field));
    }
    out
}

/// Decodes an `Event`: its scalars into `into`; returns its file_version if it has one.
fn event(data: &[u8], into: &mut Scalars) -> Option<String> {
    let (mut wall, mut step, mut version, mut values) = (None, 0, None, Vec::new());
    for (number, f) in fields(data) {
        match (number, f) {
            (1, Field::Fixed64(b)) => wall = Some(f64::from_le_bytes(b)),
            (2, Field::Varint(v)) => step = v,
            (3, Field::Bytes(b)) => version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, v) in fields(summary) {
                    let (1, Field::Bytes(value)) = (n, v) else {
                        panic!("Summary field {n}")
                    };
                    values.push(summary_value(value));
                }
            }
            (n, f) => panic!("unexpected Event field {n}: {f:?}"),
        }
    }
    let wall = wall.expect("every event has a wall_time");
    for (tag, v) in values {
        assert!(into.insert((tag, step), (v, wall)).is_none(), "twice");
    }
    version
}

/// A `Summary.Value`: (tag, simple_value).
fn summary_value(value: &[u8]) -> (String, f32) {
    let (mut tag, mut v) = (None, None);
    for (n, f) in fields(value) {
        match (n, f) {
            (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b.to_vec()).unwrap()),
            (2, Field::Fixed32(b)) => v = Some(f32::from_le_bytes(b)),
            (n, f) => panic!("unexpected Value field {n}: {f:?}"),
        }
    }
    (tag.expect("tag"), v.expect("simple_value"))
}

/// Every event file under `dir` (sorted), each checked and decoded; their scalars.
fn read_event_files(dir: &Path) -> (Vec<PathBuf>, Scalars) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut scalars = Scalars::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let bytes = std::fs::read(f).unwrap();
        let recs = records(&bytes);
        assert!(recs.len() > 1, "{name}: no scalars");
        let version = event(recs[0], &mut scalars);
        assert_eq!(version.as_deref(), Some("brain.Event:2"), "{name}");
        for r in &recs[1..] {
            assert_eq!(event(r, &mut scalars), None, "{name}");
        }
    }
    (files, scalars)
}

/// Python's reading of the directory (tag → [(step, value)]), or None without the
/// `tensorboard` package (a failure under FERROVIT_REQUIRE_PYTHON=1, as in CI).
fn python_reads(dir: &Path) -> Option<Scalars> {
    const SCRIPT: &str = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
for tag in acc.Tags()["scalars"]:
    for e in acc.Scalars(tag):
        print(tag, e.step, repr(e.value), repr(e.wall_time))
"#;
    let have = Command::new("python3")
        .args([
            "-c",
            "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("FERROVIT_REQUIRE_PYTHON").is_none(),
            "FERROVIT_REQUIRE_PYTHON is set but python3 with tensorboard is missing"
        );
        eprintln!(
            "SKIPPED the Python reading: no python3 with tensorboard (pip install tensorboard)"
        );
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", SCRIPT, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let parse = |line: &str| {
        let w: Vec<&str> = line.split(' ').collect();
        let key = (w[0].to_string(), w[1].parse().unwrap());
        (
            key,
            (w[2].parse::<f64>().unwrap() as f32, w[3].parse().unwrap()),
        )
    };
    Some(text.lines().map(parse).collect())
}

/// The epoch tags and the metrics.jsonl keys they come from.
const TAGS: [(&str, &str); 9] = [
    ("train/loss", "train_loss"),
    ("train/acc", "train_acc"),
    ("test/loss", "test_loss"),
    ("test/acc", "test_acc"),
    ("ema/test_loss", "ema_test_loss"),
    ("ema/test_acc", "ema_test_acc"),
    ("lr", "lr"),
    ("grad_norm", "grad_norm"),
    ("images_per_s", "images_per_s"),
];

#[test]
fn tensorboard_files_hold_the_metrics_and_tensorboard_reads_them() {
    let out = temp_dir("tensorboard");
    // with the EMA and clipping, whose metrics have tags too; the best checkpoint by
    // the EMA's accuracy kept
    let flags = [
        "--epochs",
        "2",
        "--log-interval",
        "5",
        "--tensorboard",
        "--ema-decay",
        "0.9",
        "--clip-grad",
        "5",
        "--keep-best",
        "ema_test_acc",
    ];
    let before = unix_now();
    train(&out, &flags);
    // a resumed run adds a file (named by the second it starts: one later sorts later)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let resumed = ["--epochs", "3", "--resume", "auto", "--log-interval", "5"];
    train(&out, &[&resumed[..], &["--tensorboard"]].concat());
    let after = unix_now();
    let dir = out.join("tensorboard");
    assert!(
        out.join("checkpoints").join("best").is_file(),
        "--keep-best ema_test_acc"
    );
    let (files, scalars) = read_event_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let m = metrics(&out);
    assert_eq!(m.len(), 3);
    for line in &m {
        let step = line["step"].as_u64().unwrap();
        for (tag, key) in TAGS {
            let want = line[key].as_f64().unwrap() as f32;
            let (got, wall) = scalars[&(tag.to_string(), step)];
            let ulp = f32::EPSILON * want.abs();
            assert!(
                (got - want).abs() <= ulp,
                "{tag} at {step}: {got} vs {want}"
            );
            assert!(
                (before..=after).contains(&wall),
                "{tag} at {step}: time {wall}"
            );
        }
    }
    // every 5 steps within an epoch: the running train loss and the lr
    let steps = |tag: &str| -> Vec<u64> {
        scalars
            .keys()
            .filter(|(t, _)| t == tag)
            .map(|(_, s)| *s)
            .collect()
    };
    let per_epoch = m[0]["step"].as_u64().unwrap();
    let within = (5..3 * per_epoch).step_by(5);
    let mut want: Vec<u64> = within.filter(|s| s % per_epoch != 0).collect();
    want.extend((1..=3).map(|e| e * per_epoch));
    want.sort();
    assert_eq!(steps("train/loss"), want);
    assert_eq!(steps("lr"), want);
    assert_eq!(steps("test/acc"), [1, 2, 3].map(|e| e * per_epoch));
    if let Some(py) = python_reads(&dir) {
        assert_eq!(py.len(), scalars.len(), "{py:?}");
        for (k, (v, wall)) in &scalars {
            let (pv, pwall) = py.get(k).unwrap_or_else(|| panic!("{k:?} not read"));
            assert_eq!((pv, (pwall - wall).abs() < 1e-6), (v, true), "{k:?}");
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}
