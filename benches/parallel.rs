//! Parallel training on one CPU machine:
//! - `parallel_step/<layout>`: a training step of the default model on a global batch
//!   of 64 under each layout (ranks as threads), images/s. On a machine with fewer
//!   cores than ranks this measures the overhead of splitting, not a speed-up.
//! - `all_reduce/<group>/<MiB>`: all-reduce bandwidth of the in-process and TCP
//!   (loopback) groups, 2 ranks, against `memcpy` of the same buffer.
//! - the measured pipeline bubble (time stages spend waiting for their neighbours)
//!   against the 1F1B figure (S−1)/(M+S−1), printed after the step benchmarks.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ferrovit::data::Batch;
use ferrovit::dist::{Layout, ProcessGroup, ReduceOp, TcpGroup, ThreadGroup};
use ferrovit::engine::{Engine, Parallel, TrainConfig};
use ferrovit::rng::Rng;
use ferrovit::{Tensor, VitConfig};
use std::hint::black_box;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 64;

fn model() -> VitConfig {
    VitConfig {
        dim: 128,
        depth: 4,
        heads: 4,
        mlp_dim: 256,
        ..VitConfig::preset("vit_tiny_patch4_32").expect("preset")
    }
}

fn share(replica: usize, replicas: usize) -> Batch {
    let rows = replica * BATCH / replicas..(replica + 1) * BATCH / replicas;
    let mut rng = Rng::new(replica as u64);
    let n = rows.len();
    Batch {
        images: Tensor::from_vec(rng.vec(n * 3 * 32 * 32, |r| r.normal()), [n, 3, 32, 32])
            .expect("images"),
        raw: None,
        labels: rows.clone().map(|i| i % 10).collect(),
        samples: rows.clone().map(|i| i as u64).collect(),
        global: BATCH,
        offset: rows.start,
        mix: None,
    }
}

/// Rank threads that each run `n` steps when told, then report (elapsed, bubble).
struct Ranks {
    go: Vec<Sender<u64>>,
    done: Receiver<(Duration, f64)>,
}

fn start(dp: usize, pp: usize, microbatches: usize) -> Ranks {
    let groups = ThreadGroup::new(dp * pp, Duration::from_secs(600)).expect("group");
    let (done_tx, done) = channel();
    let go = groups
        .into_iter()
        .map(|g| {
            let (tx, rx) = channel::<u64>();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let cfg = model();
                let layout = Layout::new(dp, pp, cfg.depth, None).expect("layout");
                let (replica, _) = layout.coords(g.rank());
                let g: Arc<dyn ProcessGroup> = Arc::new(g);
                let par = Parallel::new(g, layout, microbatches, 1 << 22).expect("parallel");
                let mut e = Engine::parallel(&cfg, TrainConfig::default(), par).expect("engine");
                while let Ok(n) = rx.recv() {
                    let t = Instant::now();
                    for _ in 0..n {
                        e.train_batch(share(replica, dp)).expect("step");
                    }
                    let p = e.parallel_info_mut().expect("parallel");
                    let bubble = p.pipeline_wait.as_secs_f64() / p.pipeline_time.as_secs_f64();
                    p.pipeline_wait = Duration::ZERO;
                    p.pipeline_time = Duration::ZERO;
                    let _ = done.send((t.elapsed(), bubble));
                }
            });
            tx
        })
        .collect();
    Ranks { go, done }
}

impl Ranks {
    /// Runs `n` steps on every rank: the slowest rank's time, and the mean bubble.
    fn run(&self, n: u64) -> (Duration, f64) {
        for g in &self.go {
            g.send(n).expect("rank alive");
        }
        let results: Vec<(Duration, f64)> = (0..self.go.len())
            .map(|_| self.done.recv().expect("rank reports"))
            .collect();
        let slowest = results.iter().map(|r| r.0).max().unwrap_or_default();
        let bubble = results.iter().map(|r| r.1).sum::<f64>() / results.len() as f64;
        (slowest, bubble)
    }
}

fn parallel_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("parallel_step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(BATCH as u64));
    let layouts = [(1, 1, 1), (2, 1, 1), (1, 2, 4), (2, 2, 4)];
    for (dp, pp, m) in layouts {
        let ranks = start(dp, pp, m);
        group.bench_function(format!("dp{dp}_pp{pp}_m{m}"), |b| {
            b.iter_custom(|n| ranks.run(n).0)
        });
    }
    group.finish();
    // the bubble: stage time spent waiting, against (S−1)/(M+S−1)
    eprintln!("pipeline bubble (mean over stages; 1F1B ideal = (S-1)/(M+S-1)):");
    for (pp, m) in [(2, 2), (2, 4), (2, 8), (4, 8)] {
        let ranks = start(1, pp, m);
        ranks.run(2); // warm up
        let (_, bubble) = ranks.run(10);
        let ideal = (pp - 1) as f64 / (m + pp - 1) as f64;
        eprintln!(
            "  S={pp} M={m}: measured {:5.1}%  ideal {:5.1}%",
            100.0 * bubble,
            100.0 * ideal
        );
    }
}

/// Two TCP ranks on loopback (a free port picked by binding port 0).
fn tcp_pair() -> (TcpGroup, TcpGroup) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let t = Duration::from_secs(60);
    let other = std::thread::spawn(move || TcpGroup::connect(1, 2, "127.0.0.1", port, t));
    let zero = TcpGroup::connect(0, 2, "127.0.0.1", port, t).expect("rank 0");
    (zero, other.join().expect("thread").expect("rank 1"))
}

fn all_reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("all_reduce");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for mib in [1usize, 16] {
        let n = mib << 18; // f32 elements
        group.throughput(Throughput::Bytes((n * 4) as u64));
        let src = vec![1.0f32; n];
        let mut dst = vec![0.0f32; n];
        group.bench_function(format!("memcpy/{mib}MiB"), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        let threads: Vec<ThreadGroup> = ThreadGroup::new(2, Duration::from_secs(60)).expect("g");
        let tcp = tcp_pair();
        let pairs: [(&str, [Arc<dyn ProcessGroup>; 2]); 2] = {
            let mut t = threads.into_iter();
            let (a, b) = (t.next().expect("rank 0"), t.next().expect("rank 1"));
            [
                ("threads", [Arc::new(a), Arc::new(b)]),
                ("tcp", [Arc::new(tcp.0), Arc::new(tcp.1)]),
            ]
        };
        for (name, [g0, g1]) in pairs {
            // rank 1 mirrors rank 0's calls on its own thread
            let (tx, rx) = channel::<u64>();
            let (done_tx, done) = channel::<()>();
            let peer = std::thread::spawn(move || {
                let mut buf = vec![1.0f32; n];
                while let Ok(k) = rx.recv() {
                    for _ in 0..k {
                        g1.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                    }
                    let _ = done_tx.send(());
                }
            });
            let mut buf = vec![1.0f32; n];
            group.bench_function(format!("{name}/{mib}MiB"), |b| {
                b.iter_custom(|k| {
                    tx.send(k).expect("peer");
                    let t = Instant::now();
                    for _ in 0..k {
                        g0.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                    }
                    done.recv().expect("peer done");
                    t.elapsed()
                })
            });
            drop(tx);
            peer.join().expect("peer");
        }
    }
    group.finish();
}

criterion_group!(benches, parallel_step, all_reduce);
criterion_main!(benches);
