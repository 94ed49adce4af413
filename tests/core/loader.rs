//! Sampler and loader: epoch coverage, order, data-parallel shares, drop_last, worker
//! independence.

use ferrovit::data::{default_data_dir, Augment, Dataset, Loader, Sampler};
use std::sync::Arc;

#[test]
fn each_epoch_covers_every_sample_once_in_a_seeded_order() {
    let s = Sampler::new(100, true, 3);
    let e0 = s.indices(0);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_eq!(
        e0,
        Sampler::new(100, true, 3).indices(0),
        "same seed, same order"
    );
    assert_ne!(e0, s.indices(1), "epochs differ");
    assert_ne!(e0, Sampler::new(100, true, 4).indices(0), "seeds differ");
    assert_eq!(
        Sampler::new(5, false, 3).indices(7),
        [0, 1, 2, 3, 4],
        "no shuffle keeps order"
    );
}

#[test]
fn replicas_split_every_global_batch_into_contiguous_shares() {
    let data = digits();
    let batches = |replica: usize, replicas: usize| {
        Loader::new(data.clone(), Sampler::new(data.len(), true, 9), 100)
            .unwrap()
            .shard(replica, replicas)
            .unwrap()
            .epoch(5)
            .map(|b| b.unwrap())
            .collect::<Vec<_>>()
    };
    let whole = batches(0, 1);
    for replicas in [2, 3, 4] {
        let shares: Vec<_> = (0..replicas).map(|r| batches(r, replicas)).collect();
        for (k, w) in whole.iter().enumerate() {
            // the shares of global batch k, in replica order, are batch k of one rank
            let joined: Vec<u64> = shares.iter().flat_map(|s| s[k].samples.clone()).collect();
            assert_eq!(joined, w.samples, "{replicas} replicas, batch {k}");
            let mut at = 0;
            for s in &shares {
                let b = &s[k];
                assert_eq!((b.global, b.offset), (w.samples.len(), at));
                assert!(b.labels.len().abs_diff(w.samples.len() / replicas) <= 1);
                assert_eq!(b.images.dims()[0], b.labels.len());
                at += b.labels.len();
            }
        }
    }
    assert_eq!(
        whole.last().unwrap().samples.len(),
        37,
        "1437 = 14 × 100 + 37"
    );
    let l = Loader::new(data.clone(), Sampler::new(10, false, 0), 4).unwrap();
    assert!(l.clone().shard(2, 2).is_err());
    // later pipeline stages need only the labels
    let mut labels_only = l.shard(1, 2).unwrap();
    labels_only.images = false;
    let b = labels_only.epoch(0).next().unwrap().unwrap();
    assert_eq!((b.labels.len(), b.images.numel()), (2, 0));
}

fn digits() -> Arc<Dataset> {
    Arc::new(Dataset::cifar_dir(&default_data_dir()).unwrap().0)
}

#[test]
fn batches_arrive_in_order_whatever_the_worker_count() {
    let data = digits();
    let run = |workers: usize| {
        let mut l = Loader::new(data.clone(), Sampler::new(data.len(), true, 1), 100).unwrap();
        l.workers = workers;
        l.augment = Augment::parse("crop,flip,autoaugment").unwrap();
        l.epoch(2)
            .map(|b| {
                let b = b.unwrap();
                (b.samples, b.images.to_vec_f32())
            })
            .collect::<Vec<_>>()
    };
    let one = run(1);
    assert_eq!(one.len(), 15); // 1437 images in batches of 100
    assert_eq!(one.last().unwrap().0.len(), 37);
    assert_eq!(
        one,
        run(3),
        "identical batches and augmentation with 1 or 3 workers"
    );
    let order: Vec<u64> = one.iter().flat_map(|(s, _)| s.clone()).collect();
    let want: Vec<u64> = Sampler::new(data.len(), true, 1)
        .indices(2)
        .iter()
        .map(|&i| i as u64)
        .collect();
    assert_eq!(order, want);
}

#[test]
fn drop_last_and_early_stop() {
    let data = digits();
    let mut l = Loader::new(data.clone(), Sampler::new(data.len(), false, 0), 100).unwrap();
    l.drop_last = true;
    assert_eq!(l.batches_per_epoch(), 14);
    assert!(l.epoch(0).all(|b| b.unwrap().labels.len() == 100));
    // Stopping after one batch must not hang on workers blocked on a full queue.
    let first = l.epoch(1).next().unwrap().unwrap();
    assert_eq!(first.samples[..3], [0, 1, 2]);
    assert!(Loader::new(data, Sampler::new(1, false, 0), 0).is_err());
}

#[test]
fn an_images_augmentation_depends_on_its_sample_not_its_batch_or_rank() {
    let data = digits();
    let images = |batch: usize, rank: usize, world: usize| {
        let s = Sampler::new(data.len(), true, 4);
        let mut l = Loader::new(data.clone(), s, batch)
            .unwrap()
            .shard(rank, world)
            .unwrap();
        l.augment = Augment::parse("crop,flip,autoaugment").unwrap();
        let mut by_sample = std::collections::HashMap::new();
        for b in l.epoch(3) {
            let b = b.unwrap();
            let v = b.images.to_vec_f32();
            for (k, s) in b.samples.iter().enumerate() {
                by_sample.insert(*s, v[k * 3072..(k + 1) * 3072].to_vec());
            }
        }
        by_sample
    };
    let whole = images(100, 0, 1);
    let small = images(7, 0, 1);
    let rank1 = images(50, 1, 2);
    assert_eq!(whole.len(), data.len());
    for (s, img) in &rank1 {
        assert_eq!(img, &whole[s], "sample {s} on rank 1 of 2");
        assert_eq!(img, &small[s], "sample {s} in batches of 7");
    }
    // a new epoch draws anew
    let mut l = Loader::new(data.clone(), Sampler::new(data.len(), true, 4), 100).unwrap();
    l.augment = Augment::parse("crop,flip,autoaugment").unwrap();
    let b = l.epoch(4).next().unwrap().unwrap();
    let first = &b.images.to_vec_f32()[..3072];
    assert_ne!(first, &whole[&b.samples[0]][..], "a new epoch, a new draw");
}
