//! The in-process process group: every operation across 4 ranks (results identical on
//! every rank), point-to-point order, and failures (a rank that leaves, a rank that
//! never comes, collectives called out of order) as errors, never hangs.

use crate::common;

use ferrovit::dist::{ProcessGroup, ReduceOp, ThreadGroup};
use std::time::{Duration, Instant};

/// Runs `f` on every rank of a fresh group in its own thread; results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(ThreadGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let groups = ThreadGroup::new(world, timeout).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let f = f.clone();
            std::thread::spawn(move || f(g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn collectives_agree_with_a_serial_computation() {
    on_ranks(4, Duration::from_secs(30), |g| {
        common::check_collectives(&g)
    });
}

#[test]
fn send_and_recv_keep_order_per_tag() {
    let out = on_ranks(2, Duration::from_secs(30), |g| {
        if g.rank() == 0 {
            g.send(&[1.0], 1, 7).unwrap();
            g.send(&[2.0, 2.0], 1, 7).unwrap();
            g.send(&[3.0], 1, 8).unwrap();
            g.recv(1, 0).unwrap()
        } else {
            let c = g.recv(0, 8).unwrap();
            let a = g.recv(0, 7).unwrap();
            let b = g.recv(0, 7).unwrap();
            g.send(&[a[0] + b[0] + c[0]], 0, 0).unwrap();
            vec![]
        }
    });
    assert_eq!(out[0], vec![6.0]);
}

#[test]
fn a_rank_that_leaves_fails_the_others_at_once() {
    let t0 = Instant::now();
    let out = on_ranks(3, Duration::from_secs(60), |g| {
        if g.rank() == 1 {
            drop(g); // the rank's thread fails before the collective
            return Ok(());
        }
        let mut x = vec![1.0; 4];
        g.all_reduce(&mut x, ReduceOp::Sum)
    });
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "no waiting for the timeout"
    );
    for r in [0, 2] {
        let e = out[r].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 1 left the group"), "{e}");
    }
    // a receiver whose sender is gone
    let out = on_ranks(2, Duration::from_secs(60), |g| {
        if g.rank() == 0 {
            return Ok(vec![]);
        }
        g.recv(0, 3)
    });
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("recv from rank 0 (tag 3): rank 0 left"), "{e}");
}

#[test]
fn a_missing_rank_times_out_and_misordered_collectives_are_named() {
    let groups = ThreadGroup::new(2, Duration::from_millis(200)).unwrap();
    let t0 = Instant::now();
    let e = groups[0].barrier().unwrap_err().to_string();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(e.contains("timed out") && e.contains("[1]"), "{e}");
    drop(groups);

    let out = on_ranks(2, Duration::from_secs(5), |g| {
        if g.rank() == 0 {
            g.barrier().map(|_| ())
        } else {
            g.all_gather(&[1.0]).map(|_| ())
        }
    });
    let errors: Vec<String> = out
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("out of order")),
        "{errors:?}"
    );
    // bad arguments are configuration errors
    let g = ThreadGroup::new(2, Duration::from_secs(1)).unwrap();
    assert!(g[0]
        .send(&[1.0], 5, 0)
        .unwrap_err()
        .to_string()
        .contains("rank 5"));
    assert!(g[0].reduce_scatter(&[1.0; 3], ReduceOp::Sum).is_err());
}

use ferrovit::data::{default_data_dir, Dataset};
use ferrovit::dist::average_gradients;
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::VitConfig;
use std::sync::Arc;

fn dp_engine() -> Engine {
    let cfg = VitConfig {
        dim: 32,
        depth: 2,
        heads: 4,
        mlp_dim: 64,
        ..VitConfig::preset("vit_tiny_patch4_32").unwrap()
    };
    // SGD: Adam would turn the rounding noise of the attention key bias's
    // analytically zero gradient into full-size updates (see tests/pytorch_parity.rs)
    let tc = TrainConfig {
        seed: 11,
        lr: 0.05,
        label_smoothing: 0.1,
        optimizer: ferrovit::optim::OptimizerKind::sgd(0.9, false),
        ..TrainConfig::default()
    };
    Engine::new(&cfg, tc).unwrap()
}

/// Steps on global batches of 8 digits images: on one rank, or split across `dp`
/// ranks with averaged gradients. Returns the global loss per step and the final
/// parameters (of rank 0).
fn train_dp(dp: usize, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (ds, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let ds = Arc::new(ds);
    let out = on_ranks(dp, Duration::from_secs(60), move |g| {
        let mut e = dp_engine();
        let per = 8 / g.world();
        let mut losses = Vec::new();
        for s in 0..steps {
            let idx: Vec<usize> = (0..per).map(|i| s * 8 + g.rank() * per + i).collect();
            let (x, y) = ds.batch(&idx, None).unwrap();
            let samples: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
            e.zero_grad().unwrap();
            let out = e.forward(x, &samples).unwrap();
            let loss = e.criterion(&out, &y).unwrap();
            e.backward(&loss).unwrap();
            average_gradients(e.params_mut(), &g, 10_000).unwrap();
            e.step().unwrap();
            let mut l = [loss.value];
            g.all_reduce(&mut l, ReduceOp::Avg).unwrap();
            losses.push(l[0]);
        }
        let params: Vec<Vec<f32>> = e.params().iter().map(|p| p.value.to_vec_f32()).collect();
        (losses, params)
    });
    for (r, o) in out.iter().enumerate().skip(1) {
        assert_eq!(o.1, out[0].1, "rank {r}'s replica equals rank 0's");
    }
    out.into_iter().next().unwrap()
}

#[test]
fn data_parallel_steps_equal_a_single_rank_on_the_global_batch() {
    let (l1, p1) = train_dp(1, 4);
    for dp in [2, 4] {
        let (l, p) = train_dp(dp, 4);
        let (err, _) = common::max_rel_err(&l, &l1);
        assert!(err < 1e-5, "dp={dp}: losses {l:?} vs {l1:?}");
        for (a, b) in p.iter().zip(&p1) {
            let (err, i) = common::max_rel_err(a, b);
            assert!(err < 1e-4, "dp={dp}: parameter differs by {err} at {i}");
        }
    }
}
