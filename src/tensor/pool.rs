//! A size-keyed pool of large f32 buffers.
//!
//! A training step allocates the same activation and gradient buffers every time.
//! Fresh large allocations come from `mmap` and pay a page fault per 4 KiB on first
//! touch (about 0.7 s per ViT-tiny step at batch 128 on this class of machine), so
//! buffers of at least `MIN_POOLED` elements go back to this pool when their tensor is
//! dropped and the next step reuses them. The pool holds at most what one step had
//! alive at once per size; `trim_pool` releases it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
/// A pooled f32 buffer, shared copy-on-write: [`Buf::share`] hands out another
/// reference in O(1) (a checkpoint snapshot), and the first write through a shared
/// buffer copies it, so a reader holding a share never sees later writes.
#[derive(Debug, Default)]
pub struct Buf(Arc<Vec<f32>>);

impl Buf {
    pub fn zeroed(len: usize) -> Buf {
        match take_pooled(len) {
            Some(mut v) => {
                crate::backend::cpu::fill(&mut v, 0.0);
                Buf(Arc::new(v))
            }
            None => Buf(Arc::new(vec![0.0; len])),
        }
    }

    pub fn uninit(len: usize) -> Buf {
        Buf(Arc::new(take_pooled(len).unwrap_or_else(|| vec![0.0; len])))
    }

    pub fn from_vec(v: Vec<f32>) -> Buf {
        Buf(Arc::new(v))
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// Mutable access; copies the data first if the buffer is shared.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.0).as_mut_slice()
    }

    /// Another reference to the same data (no copy).
    pub fn share(&self) -> Buf {
        Buf(Arc::clone(&self.0))
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
    /// A deep copy (into a pooled buffer).
    fn clone(&self) -> Buf {
        let mut b = Buf::uninit(self.0.len());
        b.as_mut_slice().copy_from_slice(&self.0);
        b
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // the last reference returns the memory to the pool
        if let Some(v) = Arc::get_mut(&mut self.0) {
            if v.len() >= MIN_POOLED && v.len() == v.capacity() {
                give(std::mem::take(v));
            }
        }
    }
}
