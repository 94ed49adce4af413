//! Checkpoint save and load throughput against the `safetensors` crate on the same
//! state, in the same run, with the page-cache copy bandwidth as the ceiling; and how
//! long an async save blocks the training loop compared with a synchronous save.
//!
//! States: `vit_tiny` (the vit_tiny_patch4_32 preset's weights and AdamW moments,
//! 114 MB) and `1gb` (64 tensors of 4 Mi f32, 1 GiB). Saves end with fsync on both
//! sides (a checkpoint that is not on disk is not saved); ferrovit also computes a
//! CRC-32 per tensor. Loads copy every tensor into existing tensors (as a resume
//! does): ferrovit maps the shards, validates the headers, verifies every CRC-32 and
//! copies; the baseline maps the file, parses it with `SafeTensors::deserialize` and
//! copies. `page_cache_copy` is one memcpy of the whole file from the page cache;
//! `crc32_only` is the checksum's own cost. Run with
//! `cargo bench --bench checkpoint`; docs/PERFORMANCE.md has the figures.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ferrovit::checkpoint::{
    self, AsyncSaver, Checkpoint, Group, SaveOptions, SnapTensor, Snapshot, TrainingState,
};
use ferrovit::engine::{Engine, TrainConfig};
use ferrovit::VitConfig;
use safetensors::tensor::TensorView;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

fn vit_state() -> Snapshot {
    let cfg = VitConfig::preset("vit_tiny_patch4_32").expect("preset");
    let engine = Engine::new(&cfg, TrainConfig::default()).expect("engine");
    let mut s = engine.snapshot(TrainingState::default());
    // fresh AdamW moments are zero; give them values like a trained run's
    for t in s.tensors.iter_mut().filter(|t| t.group == Group::Optimizer) {
        for (i, v) in t.tensor.f32s_mut().expect("f32").iter_mut().enumerate() {
            *v = (i % 977) as f32 * 1e-4;
        }
    }
    s
}

/// A 1 GiB model (268 M parameters, dim 2048, 8 blocks) without optimizer state: a
/// checkpoint's index must describe a real model, so the big state is one.
fn gigabyte_state() -> Snapshot {
    let cfg = VitConfig {
        dim: 2048,
        depth: 8,
        heads: 16,
        mlp_dim: 4096,
        ..VitConfig::preset("vit_tiny_patch4_32").expect("preset")
    };
    let mut store = ferrovit::autograd::ParamStore::new();
    ferrovit::Vit::skeleton(&cfg, &mut store).expect("model");
    let mut s = vit_state();
    s.model = cfg;
    s.layout = ferrovit::dist::Layout::single(s.model.depth);
    s.optimizer = None;
    s.tensors = store
        .named_parameters()
        .enumerate()
        .map(|(k, (name, t))| {
            let n = t.numel() as u32;
            SnapTensor {
                name: name.to_string(),
                group: Group::Model,
                tensor: ferrovit::Tensor::from_vec(
                    (0..n).map(|i| (i ^ k as u32) as f32).collect(),
                    t.dims(),
                )
                .expect("tensor"),
            }
        })
        .collect();
    s
}

fn bytes(s: &Snapshot) -> u64 {
    s.tensors.iter().map(|t| t.bytes().len() as u64).sum()
}

fn safetensors_save(s: &Snapshot, path: &Path) {
    let views: Vec<(&str, TensorView)> = s
        .tensors
        .iter()
        .map(|t| {
            let data: &[u8] = bytemuck::cast_slice(t.tensor.f32s().expect("f32"));
            (
                t.name.as_str(),
                TensorView::new(safetensors::Dtype::F32, t.tensor.dims().to_vec(), data)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("safetensors save");
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("fsync");
}

/// Destination tensors for a load, allocated and touched once (loads copy into
/// existing parameters, as a resume does).
fn destinations(s: &Snapshot) -> Vec<(String, ferrovit::Tensor)> {
    s.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                ferrovit::Tensor::zeros(t.tensor.dims(), ferrovit::Device::Cpu),
            )
        })
        .collect()
}

fn safetensors_load(path: &Path, dst: &mut [(String, ferrovit::Tensor)]) {
    let f = std::fs::File::open(path).expect("open");
    let map = unsafe { memmap2::Mmap::map(&f) }.expect("mmap");
    let st = safetensors::SafeTensors::deserialize(&map).expect("parse");
    for (name, t) in dst.iter_mut() {
        let view = st.tensor(name).expect("tensor");
        let out: &mut [u8] = bytemuck::cast_slice_mut(t.f32s_mut().expect("f32"));
        out.copy_from_slice(view.data());
    }
}

/// As `Engine::load_checkpoint` reads: tensors in parallel.
fn ferrovit_load(dir: &Path, dst: &mut [(String, ferrovit::Tensor)]) {
    use rayon::prelude::*;
    let ck = Checkpoint::open(dir).expect("open");
    dst.par_iter_mut()
        .for_each(|(name, t)| ck.read_into(name, t).expect("read"));
}

/// The ceiling: copying the same bytes out of the page cache, nothing else.
fn page_cache_copy(path: &Path, dst: &mut [u8]) {
    let f = std::fs::File::open(path).expect("open");
    let map = unsafe { memmap2::Mmap::map(&f) }.expect("mmap");
    dst.copy_from_slice(&map);
}

fn checkpoint_io(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ferrovit-bench-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    for (label, state) in [("vit_tiny", vit_state()), ("1gb", gigabyte_state())] {
        let mut group = c.benchmark_group(format!("checkpoint_{label}"));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(if label == "1gb" { 30 } else { 10 }))
            .throughput(Throughput::Bytes(bytes(&state)));
        let root = dir.join(label);
        let opts = SaveOptions::default();
        let st_file = dir.join(format!("{label}.safetensors"));
        // the files the load benches read, whichever benches a filter selects
        checkpoint::save(&state, &root, "step-1", &opts).expect("save");
        safetensors_save(&state, &st_file);
        group.bench_function("save_ferrovit", |b| {
            b.iter(|| checkpoint::save(&state, &root, "step-1", &opts).expect("save"))
        });
        group.bench_function("save_safetensors", |b| {
            b.iter(|| safetensors_save(&state, &st_file))
        });
        let ckpt = root.join("step-1");
        let mut dst = destinations(&state);
        group.bench_function("load_ferrovit", |b| {
            b.iter(|| ferrovit_load(&ckpt, &mut dst))
        });
        group.bench_function("load_safetensors", |b| {
            b.iter(|| safetensors_load(&st_file, &mut dst))
        });
        let mut flat = vec![1u8; std::fs::metadata(&st_file).expect("size").len() as usize];
        group.bench_function("page_cache_copy", |b| {
            b.iter(|| page_cache_copy(&st_file, &mut flat))
        });
        group.bench_function("crc32_only", |b| {
            b.iter(|| black_box(crc32fast::hash(&flat)))
        });
        drop(dst);
        group.finish();
        let _ = std::fs::remove_file(&st_file);
        let _ = std::fs::remove_dir_all(&root);
    }

    // How long a save holds up training: snapshot + hand-off (async) vs the whole save.
    let cfg = VitConfig::preset("vit_tiny_patch4_32").expect("preset");
    let engine = Engine::new(&cfg, TrainConfig::default()).expect("engine");
    let mut group = c.benchmark_group("checkpoint_blocking_vit_tiny");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(10));
    let root = dir.join("async");
    let opts = SaveOptions::default();
    group.bench_function("sync_save", |b| {
        b.iter(|| {
            engine
                .save_checkpoint(&root, TrainingState::default(), &opts)
                .expect("save")
        })
    });
    let mut saver = AsyncSaver::default();
    group.bench_function("async_save_blocking", |b| {
        b.iter_custom(|iters| {
            let mut blocked = Duration::ZERO;
            for _ in 0..iters {
                saver.wait().expect("previous save");
                let t0 = Instant::now();
                let snap = engine.snapshot(TrainingState::default());
                saver
                    .save(snap, root.clone(), "step-2".into(), opts.clone())
                    .expect("save");
                blocked += t0.elapsed();
            }
            blocked
        })
    });
    saver.wait().expect("last save");
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, checkpoint_io);
criterion_main!(benches);
