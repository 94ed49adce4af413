//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferrovit::rng::Rng;
use ferrovit::Tensor;

/// A tensor of standard-normal values (never all zeros) from `seed`.
pub fn randn(dims: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n = dims.iter().product();
    Tensor::from_vec(r.vec(n, |r| r.normal()), dims).expect("shape matches")
}

/// Largest |a - b| relative to the largest |b| (plus a floor), with the index.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / scale)
        .enumerate()
        .fold(
            (0.0, 0),
            |(m, mi), (i, e)| if e > m { (e, i) } else { (m, mi) },
        )
}

/// Runs the `ferrovit` binary: (success, stdout, stderr).
pub fn ferrovit(args: &[&str]) -> (bool, String, String) {
    ferrovit_with_env(args, &[])
}

/// Runs the `ferrovit` binary with extra environment variables: (success, stdout, stderr).
pub fn ferrovit_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    // FERROVIT_BIN: the binary beside test binaries run on another machine
    // (scripts/gpu-check.sh), where cargo's build path does not exist.
    let bin =
        std::env::var_os("FERROVIT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ferrovit").into());
    let out = std::process::Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run ferrovit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A PNG of `w × h` pixels by its header alone (signature, IHDR, an empty IDAT, IEND):
/// what a decoder reads to learn the size, with no pixels behind it.
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc32fast::hash(&c[4..]).to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[]));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// Runs `f` on another thread; fails the test if it takes over 20 s (a read of a named
/// pipe blocks until someone writes to it).
pub fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("hung on a non-regular file")
}

pub fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A fresh, empty temporary directory unique to this test process, the calling test
/// file and `name` (files of one test binary share its pid: the same `name` in two of
/// them must not be one directory).
#[track_caller]
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let file = std::path::Path::new(std::panic::Location::caller().file());
    let module = file.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
    let d = std::env::temp_dir().join(format!(
        "ferrovit-test-{module}-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Whether to run the body of `test` (its full name in this binary, `module::name`)
/// here: true in a process of its own. Called in the test binary's shared process, it
/// runs the binary again with only `test` selected, checks that it ran and passed, and
/// returns false. For tests of process-wide state (the tensor buffer pool) that the
/// binary's other tests, running beside them, would disturb.
pub fn alone_in_a_process(test: &str) -> bool {
    const ALONE: &str = "FERROVIT_TEST_ALONE";
    if std::env::var_os(ALONE).is_some_and(|v| v == test) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, test)
        .output()
        .expect("run the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test}, alone in a process:\n{stdout}\n{stderr}"
    );
    false
}

/// Flags of a one-block, width-32 model: a training epoch on the digits takes ~1 s.
pub const TINY: [&str; 6] = ["--dim", "32", "--depth", "1", "--mlp-dim", "32"];

/// Rank `rank`'s distinct data for the collective checks.
pub fn rank_data(rank: usize, n: usize) -> Vec<f32> {
    Rng::new(0x7c9 + rank as u64).vec(n, |r| r.uniform(-2.0, 2.0))
}

/// Runs every collective on this rank of `g` (all ranks call it) and checks each
/// result against a serial computation over every rank's [`rank_data`]: reductions
/// in rank order, bit-identical on every rank.
pub fn check_collectives(g: &dyn ferrovit::dist::ProcessGroup) {
    use ferrovit::dist::ReduceOp;
    let (r, world, n) = (g.rank(), g.world(), 4 * g.world());
    let all: Vec<Vec<f32>> = (0..world).map(|q| rank_data(q, n)).collect();
    let fold = |f: fn(f32, f32) -> f32| -> Vec<f32> {
        (0..n)
            .map(|i| all[1..].iter().fold(all[0][i], |a, d| f(a, d[i])))
            .collect()
    };
    let sum = fold(|a, b| a + b);
    let mut x = rank_data(r, n);
    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x, sum, "rank {r}: sum");
    let mut x = rank_data(r, n);
    g.all_reduce(&mut x, ReduceOp::Avg).unwrap();
    let avg: Vec<f32> = sum.iter().map(|s| s / world as f32).collect();
    assert_eq!(x, avg, "rank {r}: avg");
    let mut x = rank_data(r, n);
    g.all_reduce(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(x, fold(f32::max), "rank {r}: max");
    let root = world - 1;
    let mut x = if r == root {
        rank_data(r, n)
    } else {
        vec![0.0; n]
    };
    g.broadcast(&mut x, root).unwrap();
    assert_eq!(x, all[root], "rank {r}: broadcast from rank {root}");
    let want: Vec<f32> = (0..world).flat_map(|q| rank_data(q, 3)).collect();
    assert_eq!(
        g.all_gather(&rank_data(r, 3)).unwrap(),
        want,
        "rank {r}: all_gather"
    );
    let mine = g.reduce_scatter(&rank_data(r, n), ReduceOp::Sum).unwrap();
    assert_eq!(mine, sum[r * 4..(r + 1) * 4], "rank {r}: reduce_scatter");
    g.barrier().unwrap();
}

/// A copy of checkpoint directory `from` at `to` (created); returns `to`.
pub fn copy_checkpoint(from: &std::path::Path, to: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).expect("create copy");
    for f in std::fs::read_dir(from).expect("read checkpoint") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, to.join(f.file_name().expect("name"))).expect("copy");
    }
    to.to_path_buf()
}

/// Edits a checkpoint's index as a crafter would: consistently, its checksum rewritten
/// to match.
pub fn edit_index(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(ferrovit::checkpoint::INDEX);
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read index")).expect("index JSON");
    f(&mut v);
    write_index(dir, &serde_json::to_vec(&v).expect("index JSON"));
}

/// Replaces a checkpoint's index and its checksum.
pub fn write_index(dir: &std::path::Path, bytes: &[u8]) {
    let sum = format!("{:08x}\n", crc32fast::hash(bytes));
    std::fs::write(dir.join(ferrovit::checkpoint::INDEX_CHECKSUM), sum).expect("checksum");
    std::fs::write(dir.join(ferrovit::checkpoint::INDEX), bytes).expect("index");
}

/// Every file and directory under `dir` (relative path → the file's bytes, `None` for
/// a directory): equal before and after means nothing under `dir` changed.
pub fn dir_snapshot(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<std::path::PathBuf, Option<Vec<u8>>> {
    let mut all = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(dir).expect("inside").to_path_buf();
            if p.is_dir() {
                all.insert(rel, None);
                todo.push(p);
            } else {
                all.insert(rel, Some(std::fs::read(&p).expect("read file")));
            }
        }
    }
    all
}
