//! Devices as the tensor layer sees them: where memory lives, and the memory side of a
//! device that is not the host (allocate, copy, fill, cast, wait).
//!
//! Opening a device needs its backend, which sits above this layer, so the backend
//! hands this layer one narrow interface, [`DeviceMemory`], through [`install_memory`]
//! when it opens its first device; tensors call nothing else of it.

use super::Tensor;
use crate::error::{Error, Result};
use std::fmt;
use std::sync::OnceLock;

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device opened with [`Device::cuda`] or [`Device::cuda_emulated`].
    Cuda(GpuId),
}

/// Names a CUDA device opened in this process (see [`Device::cuda`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuId(u16);

impl GpuId {
    /// The id of the `index`-th device opened (made only by the backend that opens it).
    pub(crate) fn new(index: u16) -> GpuId {
        GpuId(index)
    }

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// The memory side of an opened device: what tensors need from it. All work is
/// ordered on one stream; downloads wait for it.
pub trait DeviceMemory: Send + Sync {
    /// The name the device was opened under (`cuda:0`, `cuda-emu`).
    fn label(&self) -> &str;
    /// What the device is, in words (the GPU's name).
    fn describe(&self) -> String;
    /// Whether it is a real GPU (not an emulated device).
    fn is_gpu(&self) -> bool;
    fn alloc(&self, bytes: usize) -> Result<u64>;
    fn free(&self, ptr: u64);
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Sets every element of the f32 tensor `t`, which is on this device.
    fn fill(&self, t: &mut Tensor, value: f32) -> Result<()>;
    /// `out = x` converted to `out`'s dtype (f32 ↔ bf16, round to nearest even).
    fn cast(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
}

type Lookup = fn(GpuId) -> &'static dyn DeviceMemory;

static MEMORY: OnceLock<Lookup> = OnceLock::new();

/// Tells tensors where the memory of each opened device is (called by the backend
/// that opens devices, before it hands out its first [`GpuId`]; later calls are
/// ignored: there is one such backend).
pub(crate) fn install_memory(lookup: Lookup) {
    let _ = MEMORY.get_or_init(|| lookup);
}

/// The memory side of device `id`.
pub(crate) fn memory(id: GpuId) -> &'static dyn DeviceMemory {
    // A GpuId is only made by the backend after it installed the lookup.
    let lookup = MEMORY
        .get()
        .expect("a device was opened without its memory");
    lookup(id)
}

impl Device {
    /// Waits until everything queued on the device has finished (a no-op on the CPU).
    pub fn synchronize(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(id) => memory(id).synchronize(),
        }
    }

    /// What the device is, in words (the GPU's name; "cpu").
    pub fn describe(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(id) => format!("{id}: {}", memory(id).describe()),
        }
    }

    /// Whether the device is a real GPU (not the CPU, not the emulated device).
    pub fn is_gpu(self) -> bool {
        match self {
            Device::Cpu => false,
            Device::Cuda(id) => memory(id).is_gpu(),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(id) => id.fmt(f),
        }
    }
}

impl fmt::Display for GpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(memory(*self).label())
    }
}

/// Device memory owned by a tensor; freed on drop.
pub struct DevBuf {
    memory: &'static dyn DeviceMemory,
    pub id: GpuId,
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// `bytes` of device memory with unspecified contents (NaN on the emulated device).
    pub fn new(id: GpuId, bytes: usize) -> Result<DevBuf> {
        let memory = memory(id);
        let ptr = memory.alloc(bytes.max(4)).map_err(|e| {
            Error::Device(format!(
                "{e} on {id} (out of device memory? try a smaller --batch-size or model)"
            ))
        })?;
        Ok(DevBuf {
            memory,
            id,
            ptr,
            bytes,
        })
    }

    /// The memory side of the device this buffer is on.
    pub(crate) fn memory(&self) -> &'static dyn DeviceMemory {
        self.memory
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.memory.free(self.ptr);
    }
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}
