//! Epoch order and batch loading.
//!
//! [`Sampler`] decides the order of an epoch's samples (a seeded shuffle per epoch).
//! [`Loader`] cuts it into global batches and builds this rank's share of each (the
//! whole batch on one rank; a contiguous slice per data-parallel replica) on
//! background threads with a bounded prefetch queue. Global batch `k` holds the same
//! samples under every layout, so a run's data does not depend on how it is split. Batch `i` is always built by worker `i % workers`, each
//! image augmented from a stream keyed by (seed, epoch, sample index), and the consumer
//! reads the workers in turn, so the batches, their order and their augmentation do
//! not depend on the number of workers (nor on how replicas split the batches).

use super::mixup::{Mixed, Mixup};
use super::{Augment, Dataset, RawImages, RawMix};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{Device, Tensor};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The order of each epoch's samples.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub len: usize,
    pub shuffle: bool,
    pub seed: u64,
}

impl Sampler {
    pub fn new(len: usize, shuffle: bool, seed: u64) -> Sampler {
        Sampler { len, shuffle, seed }
    }

    /// The dataset indices of `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = Rng::new(self.seed ^ (epoch + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            for i in (1..all.len()).rev() {
                all.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
        }
        all
    }
}

/// One batch (or this rank's share of one): normalised images `[b, 3, 32, 32]` (or,
/// for a device that augments itself, raw pixels with each sample's crop and flip),
/// labels, and the dataset index of each sample (dropout masks are keyed by it).
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    /// Set instead of `images` by a loader with `device_augment`.
    pub raw: Option<RawImages>,
    pub labels: Vec<usize>,
    pub samples: Vec<u64>,
    /// Size of the global batch this is a share of, and where the share starts in it.
    pub global: usize,
    pub offset: usize,
    /// Mixup/CutMix of this batch (the images, or `raw`, are mixed): the loss takes soft
    /// targets, train accuracy the dominant labels ([`Batch::accuracy_labels`]).
    pub mix: Option<Mixed>,
}

impl Batch {
    /// A whole batch (not a share).
    pub fn new(images: Tensor, labels: Vec<usize>, samples: Vec<u64>) -> Batch {
        let global = labels.len();
        Batch {
            images,
            raw: None,
            labels,
            samples,
            global,
            offset: 0,
            mix: None,
        }
    }

    /// The labels predictions are compared with: each sample's own, or under mixing
    /// the class with the larger share of its target ([`super::mixup::Mix::dominant`]).
    pub fn accuracy_labels(&self) -> Vec<usize> {
        match &self.mix {
            Some(m) => m.mix.dominant(&self.labels, &m.partners),
            None => self.labels.clone(),
        }
    }
}

/// Builds batches of a data set on background threads.
#[derive(Clone, Debug)]
pub struct Loader {
    pub data: Arc<Dataset>,
    pub sampler: Sampler,
    /// Samples per global batch (over all data-parallel replicas).
    pub batch_size: usize,
    /// This replica and the number of replicas: each builds its contiguous share of
    /// every global batch (shares differ by at most one sample).
    pub shard: (usize, usize),
    /// Build the images (stages after a pipeline's first need only the labels).
    pub images: bool,
    /// Leave cropping, flipping, normalising and mixing to the device: batches carry raw
    /// pixels (`Batch::raw`), a quarter of the bytes to copy. Not with AutoAugment.
    pub device_augment: bool,
    /// Drop the last partial batch of an epoch.
    pub drop_last: bool,
    /// Random augmentation of every image.
    pub augment: Augment,
    /// Mixup/CutMix of every global batch (`None`: none).
    pub mixup: Option<Mixup>,
    /// Background threads building batches (at least 1).
    pub workers: usize,
    /// Batches each worker may hold ready ahead of the consumer.
    pub prefetch: usize,
}

impl Loader {
    pub fn new(data: Arc<Dataset>, sampler: Sampler, batch_size: usize) -> Result<Loader> {
        if batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        Ok(Loader {
            data,
            sampler,
            batch_size,
            shard: (0, 1),
            images: true,
            device_augment: false,
            drop_last: false,
            augment: Augment::default(),
            mixup: None,
            workers: 2,
            prefetch: 2,
        })
    }

    /// This loader building `replica`'s share of each batch, of `replicas`.
    pub fn shard(mut self, replica: usize, replicas: usize) -> Result<Loader> {
        if replicas == 0 || replica >= replicas {
            return Err(Error::Config(format!(
                "replica {replica} is not one of {replicas}"
            )));
        }
        self.shard = (replica, replicas);
        Ok(self)
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.sampler.len;
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The batches of `epoch`, built ahead on `workers` threads.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (to resume mid-epoch): exactly
    /// the batches `epoch(epoch)` yields after its first `first`.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Epoch {
        let idx = self.sampler.indices(epoch);
        let mut chunks: Vec<Vec<usize>> =
            idx.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.drop_last && chunks.last().is_some_and(|c| c.len() < self.batch_size) {
            chunks.pop();
        }
        let chunks: Arc<Vec<Vec<usize>>> = Arc::new(chunks.into_iter().skip(first).collect());
        let workers = self.workers.max(1).min(chunks.len().max(1));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.prefetch.max(1));
            let (chunks, this) = (chunks.clone(), self.clone());
            handles.push(std::thread::spawn(move || {
                for (k, all) in chunks.iter().enumerate().skip(w).step_by(workers) {
                    // The consumer stopped early: nothing left to do.
                    if tx.send(this.share(epoch, first + k, all)).is_err() {
                        return;
                    }
                }
            }));
            receivers.push(rx);
        }
        Epoch {
            receivers,
            handles,
            next: 0,
            total: chunks.len(),
        }
    }
}

impl Loader {
    /// This replica's share of global batch `index` of `epoch`, whose samples are `all`:
    /// images augmented from streams keyed by (seed, epoch, sample index), then mixed
    /// (Mixup/CutMix) with the reversed global batch as drawn for (seed, epoch, index).
    fn share(&self, epoch: u64, index: usize, all: &[usize]) -> Result<Batch> {
        let key = self.sampler.seed ^ (epoch + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let (replica, replicas) = self.shard;
        let n = all.len();
        let share = replica * n / replicas..(replica + 1) * n / replicas;
        let idx = &all[share.clone()];
        let mix = self.mixup.and_then(|m| {
            m.draw(
                self.data.side,
                &mut Mixup::batch_rng(self.sampler.seed, epoch, index),
            )
        });
        // row i's partner: the reversed global batch's sample at i
        let partners: Vec<usize> = share.clone().map(|j| all[n - 1 - j]).collect();
        let none = || Tensor::zeros([0], Device::Cpu);
        let (images, raw) = if !self.images {
            (none(), None)
        } else if self.device_augment {
            let augment = Some((self.augment, key));
            let mut raw = self.data.raw_batch(idx, augment)?.0;
            if let Some(mix) = mix {
                raw = if share.len() == n {
                    RawImages {
                        mix: Some(RawMix {
                            mix,
                            partner: (0..n as u32).rev().collect(),
                        }),
                        ..raw
                    }
                } else {
                    raw.mixed_with(mix, self.data.raw_batch(&partners, augment)?.0)
                };
            }
            (none(), Some(raw))
        } else {
            let mut images = self.data.batch(idx, Some((self.augment, key)))?.0;
            if let Some(mix) = &mix {
                let partner_images = if share.len() == n {
                    flipped(&images)?
                } else {
                    self.data.batch(&partners, Some((self.augment, key)))?.0
                };
                mix.apply(images.f32s_mut()?, partner_images.f32s()?, self.data.side);
            }
            (images, None)
        };
        let labels = self.data.labels_of(idx)?;
        let mix = match mix {
            Some(mix) => Some(Mixed {
                mix,
                partners: self.data.labels_of(&partners)?,
            }),
            None => None,
        };
        Ok(Batch {
            images,
            raw,
            labels,
            samples: idx.iter().map(|&i| i as u64).collect(),
            global: n,
            offset: share.start,
            mix,
        })
    }
}

/// `[b, …]` images with their rows in reverse order.
fn flipped(images: &Tensor) -> Result<Tensor> {
    let row = images.numel() / images.dims()[0].max(1);
    let rev: Vec<f32> = images
        .f32s()?
        .chunks(row.max(1))
        .rev()
        .flatten()
        .copied()
        .collect();
    Tensor::from_vec(rev, images.shape().clone())
}

/// Iterator over one epoch's batches, in order.
pub struct Epoch {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(rx.recv().unwrap_or_else(|_| {
            Err(Error::Config(
                "a data loader worker stopped unexpectedly".into(),
            ))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the receivers makes blocked workers' sends fail, so they exit.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
