//! A size-keyed pool of large f32 buffers.
//!
//! A training step allocates the same activation and gradient buffers every time.
//! Fresh large allocations come from `mmap` and pay a page fault per 4 KiB on first
//! touch (about 0.7 s per ViT-tiny step at batch 128 on this class of machine), so
//! buffers of at least `MIN_POOLED` elements go back to this pool when their tensor is
//! dropped and the next step reuses them. The pool holds at most what one step had
//! alive at once per size; `trim_pool` releases it.

use std::collections::HashMap;
use std::sync::Mutex;

const MIN_POOLED: usize = 1 << 14;

static POOL: Mutex<Option<HashMap<usize, Vec<Vec<f32>>>>> = Mutex::new(None);

fn take(len: usize) -> Option<Vec<f32>> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_mut()?.get_mut(&len)?.pop()
}

fn give(v: Vec<f32>) {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .get_or_insert_with(HashMap::new)
        .entry(v.len())
        .or_default()
        .push(v);
}

/// Releases every pooled buffer back to the allocator.
pub fn trim_pool() {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    *guard = None;
}

/// Bytes currently held by the pool.
pub fn pool_bytes() -> usize {
    let guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .map_or(0, |m| m.iter().map(|(len, v)| len * v.len() * 4).sum())
}

/// An f32 buffer that returns to the pool when dropped.
#[derive(Debug, Default)]
pub struct Buf(Vec<f32>);

impl Buf {
    pub fn zeroed(len: usize) -> Buf {
        match take_pooled(len) {
            Some(mut v) => {
                crate::backend::cpu::fill(&mut v, 0.0);
                Buf(v)
            }
            None => Buf(vec![0.0; len]),
        }
    }

    pub fn uninit(len: usize) -> Buf {
        Buf(take_pooled(len).unwrap_or_else(|| vec![0.0; len]))
    }

    pub fn from_vec(v: Vec<f32>) -> Buf {
        Buf(v)
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

fn take_pooled(len: usize) -> Option<Vec<f32>> {
    if len >= MIN_POOLED {
        take(len)
    } else {
        None
    }
}

impl Clone for Buf {
    fn clone(&self) -> Buf {
        let mut b = Buf::uninit(self.0.len());
        b.0.copy_from_slice(&self.0);
        b
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.0.len() >= MIN_POOLED && self.0.len() == self.0.capacity() {
            give(std::mem::take(&mut self.0));
        }
    }
}
