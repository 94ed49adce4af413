//! `Tensor`: a shape, a dtype and device-tagged storage.
//!
//! Storage is an enum with one variant per device (candle's `Storage` idea): every
//! device-specific decision is a `match` on it, so a new device is a new variant, not
//! `cfg`s scattered over models and optimizers. Compute on the CPU is f32; bf16 and f16
//! exist for storage and transfer (checkpoints, mixed precision) through `half`.

pub mod convert;
mod device;
mod pool;

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

pub(crate) use device::install_memory;
pub use device::{DevBuf, Device, DeviceMemory, GpuId};
pub use pool::{pool_bytes, trim_pool, Bf16Buf, Buf};
use std::sync::Arc;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name used in safetensors headers and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
        }
    }

    /// The dtype a safetensors header names (`F32`, `BF16`, `F16`).
    pub fn from_name(name: &str) -> Option<DType> {
        [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .find(|d| d.name() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dimensions of a row-major tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// Size of the last dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }
    /// Number of rows when viewed as a matrix `[numel / last, last]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last().max(1)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape::new(d)
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Host memory of one tensor, by dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(pool::Buf),
    BF16(pool::Bf16Buf),
    /// bf16 values held widened in f32, each element exactly a bf16: how the CPU holds
    /// mixed precision's activations, so that no op (the bf16 GEMMs included, which
    /// read the upper 16 bits) converts to read them. The same values as `BF16`, twice
    /// the bytes.
    BF16Wide(pool::Buf),
    F16(Vec<f16>),
}

/// Memory of one tensor, tagged by device. The single dispatch point for devices.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    /// Elements in device memory (f32 or bf16), shared copy-on-write between clones.
    Cuda(Arc<DevBuf>, DType),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Shape,
    storage: Storage,
}

fn on_device(op: &'static str, b: &DevBuf) -> Error {
    Error::Device(format!(
        "{op}: the tensor is on {}; copy it to the cpu with to_device(Device::Cpu)",
        Device::Cuda(b.id)
    ))
}

/// Asked for bf16 elements of a tensor that holds them widened in f32.
fn widened_error(op: &'static str) -> Error {
    Error::DType {
        op,
        expected: "BF16 held as bf16",
        actual: "BF16 held widened in f32",
    }
}

impl Tensor {
    /// A zero-filled f32 tensor.
    ///
    /// # Panics
    /// When a device is out of memory (see [`Tensor::try_zeros`]).
    pub fn zeros(shape: impl Into<Shape>, device: Device) -> Tensor {
        Tensor::try_zeros(shape, device).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A zero-filled f32 tensor, or an error when the device is out of memory.
    pub fn try_zeros(shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        match device {
            Device::Cpu => Ok(Tensor {
                storage: Storage::Cpu(CpuStorage::F32(pool::Buf::zeroed(shape.numel()))),
                shape,
            }),
            Device::Cuda(id) => {
                let mut t = Tensor::try_uninit(shape, device)?;
                device::memory(id).fill(&mut t, 0.0)?;
                Ok(t)
            }
        }
    }

    /// An f32 tensor whose contents are unspecified (but initialised): for outputs that
    /// a kernel overwrites completely. Reuses pooled buffers, so no page faults in the
    /// training loop.
    ///
    /// # Panics
    /// When a device is out of memory (see [`Tensor::try_uninit`]).
    pub fn uninit(shape: impl Into<Shape>, device: Device) -> Tensor {
        Tensor::try_uninit(shape, device).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Tensor::uninit`], or an error when the device is out of memory.
    pub fn try_uninit(shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        Ok(match device {
            Device::Cpu => Tensor {
                storage: Storage::Cpu(CpuStorage::F32(pool::Buf::uninit(shape.numel()))),
                shape,
            },
            Device::Cuda(id) => Tensor::cuda_uninit(id, shape, DType::F32)?,
        })
    }

    /// As [`Tensor::try_uninit`] with any dtype (bf16 on the CPU held widened in f32,
    /// [`CpuStorage::BF16Wide`]; f16 there starts zeroed).
    pub fn try_uninit_as(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        match (device, dtype) {
            (_, DType::F32) => Tensor::try_uninit(shape, device),
            (Device::Cuda(id), _) => Tensor::cuda_uninit(id, shape, dtype),
            // held widened, as the CPU backend writes and reads bf16 activations
            (Device::Cpu, DType::BF16) => Ok(Tensor {
                storage: Storage::Cpu(CpuStorage::BF16Wide(pool::Buf::uninit(shape.numel()))),
                shape,
            }),
            (Device::Cpu, DType::F16) => Ok(Tensor {
                storage: Storage::Cpu(CpuStorage::F16(vec![f16::ZERO; shape.numel()])),
                shape,
            }),
        }
    }

    fn cuda_uninit(id: GpuId, shape: Shape, dtype: DType) -> Result<Tensor> {
        let buf = DevBuf::new(id, shape.numel() * dtype.size_in_bytes())?;
        Ok(Tensor {
            storage: Storage::Cuda(Arc::new(buf), dtype),
            shape,
        })
    }

    /// An f32 tensor with every element `value`.
    ///
    /// # Panics
    /// When a device fails (see [`Tensor::try_full`]).
    pub fn full(shape: impl Into<Shape>, value: f32, device: Device) -> Tensor {
        Tensor::try_full(shape, value, device).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Tensor::full`], or an error when the device is out of memory or fails.
    pub fn try_full(shape: impl Into<Shape>, value: f32, device: Device) -> Result<Tensor> {
        let mut t = Tensor::try_uninit(shape, device)?;
        t.fill(value)?;
        Ok(t)
    }

    /// An f32 CPU tensor from data; the length must match the shape.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} elements for shape {shape}", shape.numel()),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor {
            shape,
            storage: Storage::Cpu(CpuStorage::F32(pool::Buf::from_vec(data))),
        })
    }

    /// An f32 tensor over `buf` (e.g. a view of a mapped file).
    pub fn from_buf(buf: Buf, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if buf.as_slice().len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_buf",
                format!("{} elements for shape {shape}", shape.numel()),
                format!("{} elements", buf.as_slice().len()),
            ));
        }
        Ok(Tensor {
            shape,
            storage: Storage::Cpu(CpuStorage::F32(buf)),
        })
    }

    /// Whether the elements are a view of a mapped file (not copied yet).
    pub fn is_mapped(&self) -> bool {
        matches!(&self.storage, Storage::Cpu(CpuStorage::F32(b)) if b.is_mapped())
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(b, _) => Device::Cuda(b.id),
        }
    }
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(_)) => DType::F32,
            Storage::Cpu(CpuStorage::BF16(_) | CpuStorage::BF16Wide(_)) => DType::BF16,
            Storage::Cpu(CpuStorage::F16(_)) => DType::F16,
            Storage::Cuda(_, dtype) => *dtype,
        }
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        self.shape = shape;
        Ok(self)
    }

    /// The f32 elements of a CPU tensor.
    pub fn f32s(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(b)) => Ok(b.as_slice()),
            Storage::Cuda(b, _) => Err(on_device("f32s", b)),
            _ => Err(self.dtype_error("f32s")),
        }
    }

    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let actual = self.dtype().name();
        match &mut self.storage {
            Storage::Cpu(CpuStorage::F32(b)) => Ok(b.as_mut_slice()),
            Storage::Cuda(b, _) => Err(on_device("f32s_mut", b)),
            _ => Err(Error::DType {
                op: "f32s_mut",
                expected: "F32",
                actual,
            }),
        }
    }

    /// The bf16 elements of a CPU tensor held as bf16 (not [`CpuStorage::BF16Wide`]).
    pub fn bf16s(&self) -> Result<&[bf16]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::BF16(b)) => Ok(b),
            Storage::Cpu(CpuStorage::BF16Wide(_)) => Err(widened_error("bf16s")),
            Storage::Cuda(b, _) => Err(on_device("bf16s", b)),
            _ => Err(Error::DType {
                op: "bf16s",
                expected: "BF16",
                actual: self.dtype().name(),
            }),
        }
    }

    /// A CPU bf16 tensor's elements where they are held widened in f32
    /// ([`CpuStorage::BF16Wide`]); `None` for any other storage.
    pub fn bf16_wide(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::BF16Wide(b)) => Some(b.as_slice()),
            _ => None,
        }
    }

    /// A CPU bf16 tensor's elements as f32 for writing, held widened from now on
    /// ([`CpuStorage::BF16Wide`]): their values when `reads` (or when already held so),
    /// unspecified otherwise. The writer must leave every element a bf16 value (round
    /// what it writes: [`convert::round_in_place`]) — that is what this storage holds.
    pub fn bf16_wide_mut(&mut self, reads: bool) -> Result<&mut [f32]> {
        if let Storage::Cpu(CpuStorage::BF16(h)) = &self.storage {
            let mut b = pool::Buf::uninit(h.len());
            if reads {
                convert::widen(h, b.as_mut_slice());
            }
            self.storage = Storage::Cpu(CpuStorage::BF16Wide(b));
        }
        let actual = self.dtype().name();
        match &mut self.storage {
            Storage::Cpu(CpuStorage::BF16Wide(b)) => Ok(b.as_mut_slice()),
            Storage::Cuda(b, _) => Err(on_device("bf16_wide_mut", b)),
            _ => Err(Error::DType {
                op: "bf16_wide_mut",
                expected: "BF16",
                actual,
            }),
        }
    }

    /// `self`'s values rounded to bf16 (nearest even) as a CPU bf16 tensor held widened
    /// in f32 ([`CpuStorage::BF16Wide`]); one already held so is shared, not copied.
    pub fn to_bf16_wide(&self) -> Result<Tensor> {
        let wide = match &self.storage {
            Storage::Cpu(CpuStorage::BF16Wide(b)) => b.share(),
            Storage::Cpu(CpuStorage::BF16(h)) => {
                let mut b = pool::Buf::uninit(h.len());
                convert::widen(h, b.as_mut_slice());
                b
            }
            Storage::Cpu(CpuStorage::F32(x)) => {
                let mut b = pool::Buf::uninit(x.as_slice().len());
                convert::round(x.as_slice(), b.as_mut_slice());
                b
            }
            Storage::Cpu(CpuStorage::F16(_)) => {
                let mut b = pool::Buf::from_vec(self.to_vec_f32());
                convert::round_in_place(b.as_mut_slice());
                b
            }
            Storage::Cuda(b, _) => return Err(on_device("to_bf16_wide", b)),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(CpuStorage::BF16Wide(wide)),
        })
    }

    fn dtype_error(&self, op: &'static str) -> Error {
        Error::DType {
            op,
            expected: "F32",
            actual: self.dtype().name(),
        }
    }

    /// A copy of the elements as f32, whatever the storage dtype or device.
    ///
    /// # Panics
    /// If copying from a device fails (use [`Tensor::to_device`] to handle that).
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Cuda(..) => match self.to_device(Device::Cpu) {
                Ok(t) => t.to_vec_f32(),
                Err(e) => panic!("{e}"),
            },
            Storage::Cpu(CpuStorage::F32(b) | CpuStorage::BF16Wide(b)) => b.as_slice().to_vec(),
            Storage::Cpu(CpuStorage::BF16(v)) => {
                let mut out = vec![0.0; v.len()];
                convert::widen(v, &mut out);
                out
            }
            Storage::Cpu(CpuStorage::F16(v)) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Converts to another dtype (round-to-nearest-even for the 16-bit types). On a
    /// CUDA device f32 ↔ bf16 stays there (a kernel); f16 comes back to the host.
    ///
    /// # Panics
    /// If the device fails (use [`Tensor::try_to_dtype`] to handle that).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        self.try_to_dtype(dtype).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Tensor::to_dtype`], with device errors returned.
    pub fn try_to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if let (Storage::Cuda(b, _), DType::F32 | DType::BF16) = (&self.storage, dtype) {
            let mut out = Tensor::cuda_uninit(b.id, self.shape.clone(), dtype)?;
            b.memory().cast(self, &mut out)?;
            return Ok(out);
        }
        let cpu = match (&self.storage, dtype) {
            (Storage::Cpu(CpuStorage::F32(b)), DType::BF16) => {
                let mut out = pool::Bf16Buf::uninit(b.as_slice().len());
                convert::narrow(b.as_slice(), &mut out);
                CpuStorage::BF16(out)
            }
            (Storage::Cpu(CpuStorage::BF16(h)), DType::F32) => {
                let mut out = pool::Buf::uninit(h.len());
                convert::widen(h, out.as_mut_slice());
                CpuStorage::F32(out)
            }
            (Storage::Cpu(CpuStorage::BF16Wide(b)), DType::F32) => CpuStorage::F32(b.clone()),
            _ => {
                let v = self.to_vec_f32();
                match dtype {
                    DType::F32 => CpuStorage::F32(pool::Buf::from_vec(v)),
                    DType::BF16 => {
                        let mut out = pool::Bf16Buf::uninit(v.len());
                        convert::narrow(&v, &mut out);
                        CpuStorage::BF16(out)
                    }
                    DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
                }
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(cpu),
        })
    }

    /// Another handle to the same data without copying it (f32 on the CPU; other
    /// storage is copied). Writes through either handle copy first (copy-on-write),
    /// so the share keeps the values it was taken with.
    pub fn share(&self) -> Tensor {
        let storage = match &self.storage {
            Storage::Cpu(CpuStorage::F32(b)) => Storage::Cpu(CpuStorage::F32(b.share())),
            Storage::Cpu(CpuStorage::BF16Wide(b)) => Storage::Cpu(CpuStorage::BF16Wide(b.share())),
            other => other.clone(),
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }

    /// The raw little-endian bytes of the elements (for file formats).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_le_bytes(&mut out);
        out
    }

    /// Replaces the contents of `out` with the raw little-endian bytes of the elements,
    /// reusing its allocation (a memcpy for f32 on little-endian hosts).
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        out.clear();
        match &self.storage {
            Storage::Cuda(..) => self
                .to_device(Device::Cpu)
                .map_or_else(|e| panic!("{e}"), |t| t.write_le_bytes(out)),
            Storage::Cpu(CpuStorage::F32(b)) if cfg!(target_endian = "little") => {
                out.extend_from_slice(bytemuck::cast_slice(b.as_slice()))
            }
            Storage::Cpu(CpuStorage::F32(b)) => {
                out.extend(b.as_slice().iter().flat_map(|x| x.to_le_bytes()))
            }
            Storage::Cpu(CpuStorage::BF16(v)) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Storage::Cpu(CpuStorage::BF16Wide(b)) => out.extend(
                // exact: every element is a bf16
                b.as_slice()
                    .iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes()),
            ),
            Storage::Cpu(CpuStorage::F16(v)) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        }
    }

    /// Builds a tensor from little-endian bytes of the given dtype.
    pub fn from_le_bytes(bytes: &[u8], dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let want = shape.numel() * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::shape(
                "Tensor::from_le_bytes",
                format!("{want} bytes for {dtype} {shape}"),
                format!("{} bytes", bytes.len()),
            ));
        }
        let cpu = match dtype {
            DType::F32 => CpuStorage::F32(pool::Buf::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )),
            DType::BF16 => CpuStorage::BF16(pool::Bf16Buf::from_vec(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )),
            DType::F16 => CpuStorage::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        };
        Ok(Tensor {
            shape,
            storage: Storage::Cpu(cpu),
        })
    }

    /// Sets every element (f32 tensors; on the CPU others are converted in place to f32
    /// first). Fails only on a device error, or a CUDA tensor that is not f32.
    pub fn fill(&mut self, value: f32) -> Result<()> {
        if let Device::Cuda(id) = self.device() {
            return device::memory(id).fill(self, value);
        }
        if self.dtype() != DType::F32 {
            *self = self.to_dtype(DType::F32);
        }
        pool::fill(self.f32s_mut()?, value);
        Ok(())
    }

    /// A copy on `device` (the same tensor when it is there already), in the same
    /// dtype (f16 becomes f32 on a CUDA device).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = match &self.storage {
            Storage::Cuda(b, dtype) => {
                let mut bytes = vec![0u8; self.numel() * dtype.size_in_bytes()];
                b.memory().download(b.ptr, &mut bytes)?;
                Tensor::from_le_bytes(&bytes, *dtype, self.shape.clone())?
            }
            Storage::Cpu(_) => self.clone(),
        };
        match device {
            Device::Cpu => Ok(host),
            Device::Cuda(id) => {
                let host = match host.dtype() {
                    DType::F16 => host.to_dtype(DType::F32),
                    _ => host,
                };
                let t = Tensor::cuda_uninit(id, self.shape.clone(), host.dtype())?;
                device::memory(id).upload(t.cuda_ptr()?, &host.to_le_bytes())?;
                Ok(t)
            }
        }
    }

    /// The f32 elements, borrowed on the CPU, copied from a device.
    pub fn host_f32s(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        match &self.storage {
            Storage::Cuda(..) => Ok(std::borrow::Cow::Owned(
                self.to_device(Device::Cpu)?.f32s()?.to_vec(),
            )),
            _ => self.f32s().map(std::borrow::Cow::Borrowed),
        }
    }

    /// Overwrites the elements of an f32 tensor, wherever it is, with `data` (of the
    /// same length).
    pub fn copy_from_f32s(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape(
                "Tensor::copy_from_f32s",
                format!("{} elements", self.numel()),
                format!("{} elements", data.len()),
            ));
        }
        match &self.storage {
            Storage::Cuda(b, DType::F32) => {
                let memory = b.memory();
                let ptr = self.cuda_ptr_mut()?;
                memory.upload(ptr, bytemuck::cast_slice(data))
            }
            Storage::Cuda(..) => Err(self.dtype_error("copy_from_f32s")),
            Storage::Cpu(_) => {
                self.f32s_mut()?.copy_from_slice(data);
                Ok(())
            }
        }
    }

    /// The device address of a CUDA tensor's elements.
    pub fn cuda_ptr(&self) -> Result<u64> {
        match &self.storage {
            Storage::Cuda(b, _) => Ok(b.ptr),
            Storage::Cpu(_) => Err(Error::Device(format!(
                "a tensor of shape {} is on the cpu where a CUDA tensor was expected",
                self.shape
            ))),
        }
    }

    /// The device address of a CUDA tensor's elements for writing: a buffer shared
    /// with another tensor is copied first (copy-on-write).
    pub fn cuda_ptr_mut(&mut self) -> Result<u64> {
        let bytes = self.numel() * self.dtype().size_in_bytes();
        match &mut self.storage {
            Storage::Cuda(b, _) => {
                if Arc::strong_count(b) > 1 {
                    let fresh = DevBuf::new(b.id, bytes)?;
                    b.memory().copy(fresh.ptr, b.ptr, bytes)?;
                    *b = Arc::new(fresh);
                }
                Ok(b.ptr)
            }
            Storage::Cpu(_) => self.cuda_ptr(),
        }
    }

    /// Checks this tensor has exactly `dims`, naming `what` in the error.
    pub fn expect_dims(&self, what: &'static str, dims: &[usize]) -> Result<()> {
        if self.dims() != dims {
            return Err(Error::shape(what, Shape::new(dims), &self.shape));
        }
        Ok(())
    }
}
