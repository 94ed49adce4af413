//! Size-keyed pools of large f32 and bf16 buffers.
//!
//! A training step allocates the same activation and gradient buffers every time.
//! Fresh large allocations come from `mmap` and pay a page fault per 4 KiB on first
//! touch (about 0.7 s per ViT-tiny step at batch 128 on this class of machine), so
//! buffers of at least `MIN_POOLED` elements go back to their pool when their tensor
//! is dropped and the next step reuses them. A pool holds at most what one step had
//! alive at once per size; `trim_pool` releases them.

use half::bf16;
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

type Pool<T> = Mutex<Option<HashMap<usize, Vec<Vec<T>>>>>;

/// An element type with a pool of its own.
trait Pooled: Sized + 'static {
    fn pool() -> &'static Pool<Self>;
}

static F32_POOL: Pool<f32> = Mutex::new(None);
static BF16_POOL: Pool<bf16> = Mutex::new(None);

impl Pooled for f32 {
    fn pool() -> &'static Pool<f32> {
        &F32_POOL
    }
}

impl Pooled for bf16 {
    fn pool() -> &'static Pool<bf16> {
        &BF16_POOL
    }
}

/// A pooled buffer of `len` elements, if one is free (small ones are never pooled).
fn take<T: Pooled>(len: usize) -> Option<Vec<T>> {
    if len < MIN_POOLED {
        return None;
    }
    let mut guard = T::pool().lock().unwrap_or_else(|e| e.into_inner());
    guard.as_mut()?.get_mut(&len)?.pop()
}

/// Returns a buffer to its pool (if it is large and exactly sized).
fn give<T: Pooled>(v: Vec<T>) {
    if v.len() < MIN_POOLED || v.len() != v.capacity() {
        return;
    }
    let mut guard = T::pool().lock().unwrap_or_else(|e| e.into_inner());
    guard
        .get_or_insert_with(HashMap::new)
        .entry(v.len())
        .or_default()
        .push(v);
}

/// Releases every pooled buffer back to the allocator.
pub fn trim_pool() {
    *F32_POOL.lock().unwrap_or_else(|e| e.into_inner()) = None;
    *BF16_POOL.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Bytes currently held by the pools.
pub fn pool_bytes() -> usize {
    fn bytes<T: Pooled>() -> usize {
        let guard = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        let per = std::mem::size_of::<T>();
        guard
            .as_ref()
            .map_or(0, |m| m.iter().map(|(len, v)| len * v.len() * per).sum())
    }
    bytes::<f32>() + bytes::<bf16>()
}

/// A pooled bf16 buffer (mixed precision's activations on the CPU).
#[derive(Debug, Default)]
pub struct Bf16Buf(Vec<bf16>);

impl Bf16Buf {
    /// `len` elements of unspecified (but initialised) values.
    pub fn uninit(len: usize) -> Bf16Buf {
        Bf16Buf(take(len).unwrap_or_else(|| vec![bf16::ZERO; len]))
    }

    pub fn from_vec(v: Vec<bf16>) -> Bf16Buf {
        Bf16Buf(v)
    }
}

impl std::ops::Deref for Bf16Buf {
    type Target = [bf16];
    fn deref(&self) -> &[bf16] {
        &self.0
    }
}

impl std::ops::DerefMut for Bf16Buf {
    fn deref_mut(&mut self) -> &mut [bf16] {
        &mut self.0
    }
}

impl Clone for Bf16Buf {
    /// A deep copy (into a pooled buffer).
    fn clone(&self) -> Bf16Buf {
        let mut b = Bf16Buf::uninit(self.len());
        b.copy_from_slice(self);
        b
    }
}

impl Drop for Bf16Buf {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
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
        match take(len) {
            Some(mut v) => {
                fill(&mut v, 0.0);
                Buf::from_vec(v)
            }
            None => Buf::from_vec(vec![0.0; len]),
        }
    }

    pub fn uninit(len: usize) -> Buf {
        Buf::from_vec(take(len).unwrap_or_else(|| vec![0.0; len]))
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
            if let Some(v) = Arc::get_mut(a) {
                give(std::mem::take(v));
            }
        }
    }
}
