//! The TCP process group and its rendezvous store, with ranks as threads of this
//! process talking over loopback: every operation agrees with a serial computation,
//! any u64 tag and large messages travel intact, and failures (a rank that leaves, a
//! rank that never comes, a store key never set) are prompt errors naming the culprit.

use crate::common;

use crate::common::rank_data;
use ferrovit::dist::{DistEnv, ProcessGroup, ReduceOp, SubGroup, TcpGroup, TcpStore};
use ferrovit::rng::Rng;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((HOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `f` on ranks `ranks` of a fresh TCP group of `world` (each in its own thread,
/// connecting by itself); results in the order of `ranks`.
fn on_some_ranks<T: Send + 'static>(
    ranks: &[usize],
    world: usize,
    timeout: Duration,
    f: impl Fn(ferrovit::Result<TcpGroup>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = ranks
        .iter()
        .map(|&rank| {
            let f = f.clone();
            std::thread::spawn(move || f(TcpGroup::connect(rank, world, HOST, port, timeout)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(TcpGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let ranks: Vec<usize> = (0..world).collect();
    on_some_ranks(&ranks, world, timeout, move |g| f(g.unwrap()))
}

/// Element-wise fold over every rank's data, in rank order.
fn serial(world: usize, n: usize, f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    let all: Vec<Vec<f32>> = (0..world).map(|r| rank_data(r, n)).collect();
    (0..n)
        .map(|i| all[1..].iter().fold(all[0][i], |a, d| f(a, d[i])))
        .collect()
}

#[test]
fn collectives_agree_with_a_serial_computation() {
    on_ranks(4, Duration::from_secs(30), |g| {
        common::check_collectives(&g)
    });
}

#[test]
fn messages_keep_order_per_tag_and_any_tag_travels() {
    let tags = [0u64, 7, (1 << 56) - 1, 1 << 56, 1 << 63, u64::MAX];
    let out = on_ranks(3, Duration::from_secs(30), move |g| {
        let r = g.rank();
        // every rank sends to every rank (itself included) under every tag, twice
        for to in 0..3 {
            for (i, &t) in tags.iter().enumerate() {
                g.send(&[r as f32, i as f32, 0.0], to, t).unwrap();
                g.send(&[r as f32, i as f32, 1.0], to, t).unwrap();
            }
        }
        // receive in another order than sent: by tag, last tag first
        let mut got = HashMap::new();
        for (i, &t) in tags.iter().enumerate().rev() {
            for from in (0..3).rev() {
                let a = g.recv(from, t).unwrap();
                let b = g.recv(from, t).unwrap();
                got.insert((from, i), (a, b));
            }
        }
        g.barrier().unwrap();
        got
    });
    for got in &out {
        for ((from, i), (a, b)) in got {
            assert_eq!(a, &vec![*from as f32, *i as f32, 0.0]);
            assert_eq!(b, &vec![*from as f32, *i as f32, 1.0]);
        }
        assert_eq!(got.len(), 3 * tags.len());
    }
}

#[test]
fn large_messages_round_trip_exactly() {
    let n = 3_000_000;
    let out = on_ranks(4, Duration::from_secs(60), move |g| {
        let r = g.rank();
        // ranks 0 and 1 send each other 3M floats at the same time (no deadlock:
        // reader threads drain both directions), then return what they got
        if r < 2 {
            let peer = 1 - r;
            g.send(&rank_data(r, n), peer, 5).unwrap();
            let got = g.recv(peer, 5).unwrap();
            g.send(&got, peer, 6).unwrap();
            let back = g.recv(peer, 6).unwrap();
            assert!(
                back == rank_data(r, n),
                "rank {r}: round trip changed the data"
            );
            assert!(
                got == rank_data(peer, n),
                "rank {r}: got rank {peer}'s data"
            );
        }
        let mut x = rank_data(r, 1_000_000);
        g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        x
    });
    let sum = serial(4, 1_000_000, |a, b| a + b);
    for (r, x) in out.iter().enumerate() {
        assert!(*x == sum, "rank {r}: large all_reduce");
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_at_once() {
    let timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let out = on_ranks(4, timeout, |g| {
        let r = g.rank();
        g.barrier().unwrap();
        if r == 3 {
            // sends one message, then goes away while rank 1 waits for the next
            g.send(&[42.0], 1, 9).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(g);
            return Vec::new();
        }
        let mut errors = Vec::new();
        if r == 1 {
            assert_eq!(g.recv(3, 9).unwrap(), vec![42.0], "sent before leaving");
            errors.push(g.recv(3, 9).unwrap_err().to_string()); // pending
            errors.push(g.recv(3, 10).unwrap_err().to_string()); // later
            errors.push(g.send(&[1.0], 3, 0).unwrap_err().to_string());
        }
        // a collective needs rank 3: rank 0 fails on it, the others on rank 0
        let mut x = vec![1.0; 4];
        errors.push(g.all_reduce(&mut x, ReduceOp::Sum).unwrap_err().to_string());
        errors
    });
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "no waiting for the timeout: {:?}",
        t0.elapsed()
    );
    let e = &out[1];
    assert!(
        e[0].contains("rank 1: recv from rank 3 (tag 9): rank 3 left the group (connection closed"),
        "{e:?}"
    );
    assert!(
        e[1].contains("recv from rank 3 (tag 10): rank 3 left"),
        "{e:?}"
    );
    assert!(
        e[2].contains("send to rank 3") && e[2].contains("rank 3 left"),
        "{e:?}"
    );
    assert!(out[0][0].contains("rank 3 left the group"), "{:?}", out[0]);
    for r in [1, 2] {
        let last = out[r].last().unwrap();
        assert!(last.contains("left the group"), "rank {r}: {last}");
    }
}

#[test]
fn a_rank_that_never_comes_fails_connect_after_the_timeout() {
    let timeout = Duration::from_millis(1500);
    let t0 = Instant::now();
    // ranks 0 and 1 of 3 start; rank 2 never does
    let out = on_some_ranks(&[0, 1], 3, timeout, |g| g.map(|_| ()));
    let took = t0.elapsed();
    assert!(took >= timeout && took < timeout * 4, "{took:?}");
    for (r, o) in out.iter().enumerate() {
        let e = o.as_ref().unwrap_err().to_string();
        assert!(
            e.contains(&format!("rank {r}:")) && e.contains("timed out") && e.contains("[2]"),
            "{e}"
        );
    }

    // rank 0 (the store's host) never comes
    let port = free_port();
    let t0 = Instant::now();
    let e = TcpGroup::connect(1, 2, HOST, port, timeout)
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() >= timeout);
    assert!(
        e.contains("rank 1:")
            && e.contains(&format!("rendezvous store at {HOST}:{port}"))
            && e.contains("rank 0"),
        "{e}"
    );
}

#[test]
fn ranks_may_start_late_and_a_world_of_one_needs_no_network() {
    // rank 0 starts a second after the others: they keep trying
    let port = free_port();
    let late: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                if rank == 0 {
                    std::thread::sleep(Duration::from_secs(1));
                }
                let g = TcpGroup::connect(rank, 3, HOST, port, Duration::from_secs(20))?;
                let mut x = [rank as f32];
                g.all_reduce(&mut x, ReduceOp::Sum)?;
                Ok::<f32, ferrovit::Error>(x[0])
            })
        })
        .collect();
    for h in late {
        assert_eq!(h.join().unwrap().unwrap(), 3.0);
    }

    let g = TcpGroup::connect(0, 1, "no.such.host.invalid", 0, Duration::from_secs(1)).unwrap();
    let mut x = vec![1.5, -2.0];
    g.all_reduce(&mut x, ReduceOp::Avg).unwrap();
    assert_eq!(x, vec![1.5, -2.0]);
    assert_eq!(g.all_gather(&[3.0]).unwrap(), vec![3.0]);
    g.send(&[7.0], 0, u64::MAX).unwrap();
    assert_eq!(g.recv(0, u64::MAX).unwrap(), vec![7.0]);
    g.store().set("k", b"v").unwrap();
    assert_eq!(g.store().get("k").unwrap(), b"v");

    // bad arguments are configuration errors
    let bad = |r: ferrovit::Result<TcpGroup>| matches!(r, Err(ferrovit::Error::Config(_)));
    assert!(bad(TcpGroup::connect(
        2,
        2,
        HOST,
        1234,
        Duration::from_secs(1)
    )));
    assert!(bad(TcpGroup::connect(
        0,
        2,
        HOST,
        0,
        Duration::from_secs(1)
    )));
    let e = g.send(&[1.0], 4, 0).unwrap_err().to_string();
    assert!(e.contains("rank 4"), "{e}");
}

#[test]
fn a_sub_group_over_tcp_reduces_within_its_members() {
    let n = 6;
    let out = on_ranks(4, Duration::from_secs(30), move |g| {
        let r = g.rank();
        let g: Arc<dyn ProcessGroup> = Arc::new(g);
        // ranks {0, 2} and {1, 3}
        let members = if r % 2 == 0 { vec![0, 2] } else { vec![1, 3] };
        let sub = SubGroup::new(g.clone(), members, 1).unwrap();
        let mut x = rank_data(r, n);
        sub.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        let mut whole = rank_data(r, n);
        g.all_reduce(&mut whole, ReduceOp::Max).unwrap();
        (sub.rank(), x, whole)
    });
    let pair = |a: usize, b: usize| -> Vec<f32> {
        rank_data(a, n)
            .iter()
            .zip(rank_data(b, n))
            .map(|(x, y)| x + y)
            .collect()
    };
    for (r, (sub_rank, x, whole)) in out.iter().enumerate() {
        assert_eq!(*sub_rank, r / 2);
        let want = if r % 2 == 0 { pair(0, 2) } else { pair(1, 3) };
        assert_eq!(x, &want, "rank {r}");
        assert_eq!(
            whole,
            &serial(4, n, f32::max),
            "rank {r}: parent still works"
        );
    }
}

#[test]
fn the_store_shares_values_and_waits_for_them() {
    let timeout = Duration::from_secs(10);
    let host = Arc::new(TcpStore::host(HOST, 0, timeout).unwrap());
    let port = host.port();
    assert_ne!(port, 0);
    host.set("empty", b"").unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();

    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            let big = big.clone();
            std::thread::spawn(move || {
                let c = TcpStore::connect(HOST, port, timeout).unwrap();
                c.set(&format!("client/{i}"), &[i; 3]).unwrap();
                if i == 0 {
                    c.set("big", &big).unwrap();
                }
                // waits for the host's later set
                let t0 = Instant::now();
                let late = c.get("late").unwrap();
                assert!(t0.elapsed() >= Duration::from_millis(100));
                let others: Vec<Vec<u8>> = (0..3u8)
                    .map(|j| c.get(&format!("client/{j}")).unwrap())
                    .collect();
                (late, others, c.get("empty").unwrap(), c.get("big").unwrap())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    host.set("late", b"at last").unwrap();
    for h in clients {
        let (late, others, empty, got_big) = h.join().unwrap();
        assert_eq!(late, b"at last");
        assert_eq!(others, vec![vec![0; 3], vec![1; 3], vec![2; 3]]);
        assert!(empty.is_empty());
        assert!(got_big == big);
    }
    assert_eq!(host.get("client/2").unwrap(), vec![2; 3]);

    // a key nobody sets: an error after the timeout, naming the key and the store
    let c = TcpStore::connect(HOST, port, timeout).unwrap();
    let t0 = Instant::now();
    let e = c
        .get_timeout("never", Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(
        e.contains("never") && e.contains(&format!("{HOST}:{port}")),
        "{e}"
    );
    let e = host
        .get_timeout("never", Duration::from_millis(50))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`never` was not set"), "{e}");

    // the host goes away: clients get errors, not hangs
    drop(host);
    let e = c.get("client/0").unwrap_err().to_string();
    assert!(e.contains(&format!("{HOST}:{port}")), "{e}");

    // nobody hosts: connecting fails after the timeout, naming the address
    let port = free_port();
    let t0 = Instant::now();
    let e = TcpStore::connect(HOST, port, Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert!(
        e.contains(&format!(
            "cannot reach the rendezvous store at {HOST}:{port}"
        )),
        "{e}"
    );
}

#[test]
fn the_environment_describes_the_group() {
    let env = |vars: &[(&str, &str)]| {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(move |k| vars.get(k).cloned())
    };
    assert_eq!(env(&[]).unwrap(), None);
    let e = env(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "node7"),
        ("MASTER_PORT", "29500"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        e,
        DistEnv {
            rank: 2,
            world: 4,
            local_rank: Some(0),
            local_world: None,
            master_addr: "node7".into(),
            master_port: 29500,
            secret: String::new(),
        }
    );
    let e = env(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
        ("FERROVIT_SECRET", "s3cr3t"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(e.secret, "s3cr3t");
    assert!(!format!("{e:?}").contains("s3cr3t"), "kept out of logs");
    // SLURM's names where torchrun's are unset
    let e = env(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((e.rank, e.world, e.local_rank), (1, 2, None));
    // a world of one needs no master
    let e = env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap().unwrap();
    assert_eq!(e.world, 1);
    assert!(e.connect(Duration::from_secs(1)).is_ok());

    let err = |vars: &[(&str, &str)]| env(vars).unwrap_err().to_string();
    let full = |over: (&'static str, &'static str)| {
        let mut v = vec![
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ];
        v.retain(|(k, _)| *k != over.0);
        if !over.1.is_empty() {
            v.push(over);
        }
        err(&v)
    };
    assert!(full(("WORLD_SIZE", "four")).contains("WORLD_SIZE=\"four\""));
    assert!(full(("RANK", "-1")).contains("RANK=\"-1\""));
    assert!(full(("RANK", "2")).contains("RANK=2 is not below WORLD_SIZE=2"));
    assert!(full(("RANK", "")).contains("RANK is not"));
    assert!(full(("MASTER_PORT", "70000")).contains("MASTER_PORT=\"70000\""));
    assert!(full(("MASTER_PORT", "")).contains("MASTER_PORT is not set"));
    assert!(full(("MASTER_ADDR", "")).contains("MASTER_ADDR is not set"));
    assert!(err(&[("WORLD_SIZE", "0"), ("RANK", "0")]).contains("WORLD_SIZE=0"));
    // the processes on this machine, which share its cores
    let one = [("WORLD_SIZE", "1"), ("RANK", "0")];
    let local = |n| env(&[&one[..], &[("LOCAL_WORLD_SIZE", n)]].concat());
    assert_eq!(local("2").unwrap().unwrap().local_world, Some(2));
    assert!(local("0")
        .unwrap_err()
        .to_string()
        .contains("LOCAL_WORLD_SIZE=0"));
    assert!(local("x")
        .unwrap_err()
        .to_string()
        .contains("LOCAL_WORLD_SIZE=\"x\""));
}

/// The NCCL group on a machine with a GPU (world size 1: every collective must return
/// its input, through the device, and device tensors are reduced where they are);
/// elsewhere, a clear error instead of a panic.
#[test]
fn nccl_group_of_one_or_a_clear_error_without_a_gpu() {
    use ferrovit::dist::NcclGroup;
    use ferrovit::tensor::{Device, Tensor};
    let timeout = Duration::from_secs(30);
    let tcp = TcpGroup::connect(0, 1, HOST, free_port(), timeout).unwrap();
    if !NcclGroup::available() {
        let err = NcclGroup::new(Box::new(tcp), 0, timeout)
            .err()
            .expect("no NCCL here")
            .to_string();
        assert!(
            err.contains("cannot be loaded") && err.contains("libnccl.so"),
            "{err}"
        );
        if std::env::var("FERROVIT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("FERROVIT_REQUIRE_GPU=1 but NCCL is unavailable: {err}");
        }
        eprintln!("skipped the NCCL collectives: no CUDA driver or NCCL library on this machine");
        return;
    }
    let device = Device::cuda(0).unwrap();
    let g = NcclGroup::on_device(Box::new(tcp), device, timeout).unwrap();
    let data = Rng::new(3).vec(1000, |r| r.normal());
    let mut x = data.clone();
    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x, data);
    g.broadcast(&mut x, 0).unwrap();
    assert_eq!(x, data);
    assert_eq!(g.all_gather(&data).unwrap(), data);
    assert_eq!(g.reduce_scatter(&data, ReduceOp::Max).unwrap(), data);
    g.barrier().unwrap();
    // tensors on the GPU, reduced in place on the backend's stream; one on the host too
    let mut a = Tensor::from_vec(data[..600].to_vec(), &[20usize, 30][..])
        .unwrap()
        .to_device(device)
        .unwrap();
    let mut b = Tensor::from_vec(data[600..].to_vec(), &[400usize][..])
        .unwrap()
        .to_device(device)
        .unwrap();
    g.all_reduce_tensors(&mut [&mut a, &mut b], ReduceOp::Avg, 64)
        .unwrap();
    assert_eq!(
        [a.host_f32s().unwrap(), b.host_f32s().unwrap()].concat(),
        data
    );
    let mut host = Tensor::from_vec(data.clone(), &[1000usize][..]).unwrap();
    g.all_reduce_tensors(&mut [&mut host, &mut a], ReduceOp::Sum, 64)
        .unwrap();
    assert_eq!(host.host_f32s().unwrap().to_vec(), data);
    // the emulated device is not NCCL's
    let tcp = TcpGroup::connect(0, 1, HOST, free_port(), timeout).unwrap();
    let err = NcclGroup::on_device(Box::new(tcp), Device::cuda_emulated(), timeout)
        .err()
        .expect("not a GPU")
        .to_string();
    assert!(err.contains("needs a real GPU"), "{err}");
}

/// Writes `bytes` to a fresh connection to `port` and reads until the other side closes
/// it; `None` when it is still open after `within`.
fn closed_after(port: u16, bytes: &[u8], within: Duration) -> Option<Duration> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((HOST, port)).unwrap();
    let t0 = Instant::now();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
            Err(_) => return None,
        }
    }
}

#[test]
fn a_stranger_claiming_a_huge_store_value_is_dropped_at_once() {
    let host = TcpStore::host(HOST, 0, Duration::from_secs(30)).unwrap();
    // the old, unauthenticated protocol: magic, then a SET of key "k" claiming 1 GiB
    let mut req = b"FVST".to_vec();
    req.push(1);
    req.extend_from_slice(&1u64.to_le_bytes());
    req.push(b'k');
    req.extend_from_slice(&(1u64 << 30).to_le_bytes());
    req.extend_from_slice(&[7; 100]);
    let took = closed_after(host.port(), &req, Duration::from_secs(3));
    assert!(took.is_some(), "the store kept the connection open");
    // one that says nothing is dropped after the hello timeout
    let silent = closed_after(host.port(), b"", Duration::from_secs(15));
    assert!(silent.is_some(), "the store kept a silent connection open");
    // and the store still serves its ranks
    let c = TcpStore::connect(HOST, host.port(), Duration::from_secs(5)).unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(host.get("k").unwrap(), b"v");
}

#[test]
fn only_processes_that_know_the_secret_get_in() {
    let timeout = Duration::from_secs(10);
    let host = TcpStore::host_with_secret(HOST, 0, timeout, b"right").unwrap();
    let port = host.port();
    host.set("addr/0", b"mine").unwrap();
    for wrong in [&b"wrong"[..], b""] {
        let e = TcpStore::connect_with_secret(HOST, port, timeout, wrong)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("rendezvous store at {HOST}:{port}"))
                && e.contains("FERROVIT_SECRET"),
            "{e}"
        );
    }
    let c = TcpStore::connect_with_secret(HOST, port, timeout, b"right").unwrap();
    assert_eq!(c.get("addr/0").unwrap(), b"mine", "nobody overwrote it");
    // a client of the right store with the wrong secret, the other way round: a
    // store that does not know the client's secret is not trusted either
    let open = TcpStore::host(HOST, 0, timeout).unwrap();
    let e = TcpStore::connect_with_secret(HOST, open.port(), timeout, b"right")
        .unwrap_err()
        .to_string();
    assert!(e.contains("the store does not know"), "{e}");

    // ranks with different secrets never form a group
    let port = free_port();
    let t = Duration::from_secs(2);
    let ranks: Vec<_> = [&b"one"[..], b"two"]
        .into_iter()
        .enumerate()
        .map(|(rank, s)| {
            std::thread::spawn(move || {
                TcpGroup::connect_with_secret(rank, 2, HOST, port, t, s).map(|_| ())
            })
        })
        .collect();
    let errs: Vec<String> = ranks
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err().to_string())
        .collect();
    assert!(
        errs[1].contains("rank 1:") && errs[1].contains("FERROVIT_SECRET"),
        "{errs:?}"
    );
    assert!(
        errs[0].contains("rank 0:") && errs[0].contains("[1]"),
        "{errs:?}"
    );
}

#[test]
fn strangers_at_a_ranks_port_do_not_disturb_the_rendezvous() {
    use std::io::Write;
    let port = free_port();
    let secret = b"run-42";
    let t = Duration::from_secs(30);
    let zero = std::thread::spawn(move || {
        let g = TcpGroup::connect_with_secret(0, 2, HOST, port, t, secret)?;
        let mut x = [1.0f32];
        g.all_reduce(&mut x, ReduceOp::Sum)?;
        Ok::<f32, ferrovit::Error>(x[0])
    });
    // where rank 0 waits for rank 1 (the store tells those who know the secret)
    let store = TcpStore::connect_with_secret(HOST, port, t, secret).unwrap();
    let addr = String::from_utf8(store.get("addr/0").unwrap()).unwrap();
    // a stranger claims to be rank 1 of another world size (once fatal), and rank 1
    // with a made-up answer; neither knows the secret, both are turned away
    for world in [3u64, 2] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let mut hello = b"FVTG".to_vec();
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(&1u64.to_le_bytes());
        hello.extend_from_slice(&world.to_le_bytes());
        hello.extend_from_slice(&[9; 16 + 32]);
        s.write_all(&hello).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let one = TcpGroup::connect_with_secret(1, 2, HOST, port, t, secret).unwrap();
    let mut x = [2.0f32];
    one.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x[0], 3.0);
    assert_eq!(zero.join().unwrap().unwrap(), 3.0);
}
