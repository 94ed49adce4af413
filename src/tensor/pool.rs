//! A size-keyed pool of large f32 buffers.
//!
//! A training step allocates the same activation and gradient buffers every time.
//! Fresh large allocations come from `mmap` and pay a page fault per 4 KiB on first
//! touch (about 0.7 s per ViT-tiny step at batch 128 on this class of machine), so
//! buffers of at least `MIN_POOLED` elements go back to this pool when their tensor is
//! dropped and the next step reuses them. The pool holds at most what one step had
//! alive at once per size; `trim_pool` releases it.

use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const MIN_POOLED: usize = 1 << 14;
/// Elements per parallel task of [`fill`].
const FILL_CHUNK: usize = 1 << 15;

/// Sets every element, in parallel (a pooled buffer is large: zeroing it on one
/// thread would cost more than the page faults the pool saves).
pub(crate) fn fill(x: &mut [f32], v: f32) {
    x.par_chunks_mut(FILL_CHUNK).for_each(|c| c.fill(v));
}

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

/// A pooled f32 buffer, shared copy-on-write: [`Buf::share`] hands out another
/// reference in O(1) (a checkpoint snapshot), and the first write through a shared
/// buffer copies it, so a reader holding a share never sees later writes. A buffer can
/// also be a read-only view of a memory-mapped file ([`Buf::mapped`]: checkpoint
/// weights used in place, from the page cache); writing to it copies it first too.
#[derive(Debug)]
pub struct Buf(Inner);

#[derive(Debug)]
enum Inner {
    Heap(Arc<Vec<f32>>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        /// Byte offset of the first element (4-byte aligned).
        start: usize,
        len: usize,
    },
}

impl Default for Buf {
    fn default() -> Buf {
        Buf::from_vec(Vec::new())
    }
}

impl Buf {
    pub fn zeroed(len: usize) -> Buf {
        match take_pooled(len) {
            Some(mut v) => {
                fill(&mut v, 0.0);
                Buf::from_vec(v)
            }
            None => Buf::from_vec(vec![0.0; len]),
        }
    }

    pub fn uninit(len: usize) -> Buf {
        Buf::from_vec(take_pooled(len).unwrap_or_else(|| vec![0.0; len]))
    }

    pub fn from_vec(v: Vec<f32>) -> Buf {
        Buf(Inner::Heap(Arc::new(v)))
    }

    /// A view of `len` little-endian f32s at byte `start` of `map`; `None` if the
    /// range is out of bounds or unaligned (or the host is big-endian).
    pub fn mapped(map: Arc<memmap2::Mmap>, start: usize, len: usize) -> Option<Buf> {
        let bytes = map.get(start..start.checked_add(len.checked_mul(4)?)?)?;
        let ok =
            cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok();
        ok.then_some(Buf(Inner::Mapped { map, start, len }))
    }

    /// Whether this is a view of a mapped file (not yet copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Inner::Mapped { .. })
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.0 {
            Inner::Heap(v) => v,
            // alignment and bounds were checked in `mapped`
            Inner::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + *len * 4])
            }
        }
    }

    /// Mutable access; copies the data first if the buffer is shared or mapped.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if self.is_mapped() {
            let mut owned = Buf::uninit(self.as_slice().len());
            if let Inner::Heap(v) = &mut owned.0 {
                Arc::make_mut(v).copy_from_slice(self.as_slice());
            }
            *self = owned;
        }
        match &mut self.0 {
            Inner::Heap(v) => Arc::make_mut(v).as_mut_slice(),
            Inner::Mapped { .. } => &mut [], // replaced above
        }
    }

    /// Another reference to the same data (no copy).
    pub fn share(&self) -> Buf {
        Buf(match &self.0 {
            Inner::Heap(v) => Inner::Heap(Arc::clone(v)),
            Inner::Mapped { map, start, len } => Inner::Mapped {
                map: Arc::clone(map),
                start: *start,
                len: *len,
            },
        })
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
        let mut b = Buf::uninit(self.as_slice().len());
        b.as_mut_slice().copy_from_slice(self.as_slice());
        b
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // the last reference returns the memory to the pool
        if let Inner::Heap(a) = &mut self.0 {
            let Some(v) = Arc::get_mut(a) else { return };
            if v.len() >= MIN_POOLED && v.len() == v.capacity() {
                give(std::mem::take(v));
            }
        }
    }
}
