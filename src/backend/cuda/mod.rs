//! The CUDA backend: the hand-written kernels of kernels/*.cu, launched through one
//! narrow layer, [`Gpu`], with two implementations — [`driver::DriverGpu`] (cudarc on a
//! real GPU, PTX/cubin embedded by build.rs, cuBLAS for GEMMs) and [`emu::EmuGpu`] (the
//! same kernel sources compiled for the host, the CPU GEMM). Everything above the
//! layer — buffers, launch geometry, the kernel sequence — is shared, so the tests run
//! the whole GPU training path on a machine without a GPU.

pub mod driver;
pub mod emu;
mod lt;
mod ops;
mod signature;
mod staging;

use crate::error::{Error, Result};
use crate::kernels::ParamKind;
use crate::tensor::{DType, Device, DeviceMemory, GpuId, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use ops::CudaBackend;

/// One kernel argument, passed by value as cuLaunchKernel expects.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Arg {
    /// The argument's bytes in the low end of an 8-byte slot (little-endian).
    pub fn bits(&self) -> u64 {
        match *self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::U32(v) => v as u64,
            Arg::U64(v) => v,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }

    /// The kind of kernel parameter this argument can be passed for.
    pub fn kind(&self) -> ParamKind {
        match self {
            Arg::Ptr(_) => ParamKind::Ptr,
            Arg::I32(_) => ParamKind::I32,
            Arg::I64(_) => ParamKind::I64,
            Arg::U32(_) => ParamKind::U32,
            Arg::U64(_) => ParamKind::U64,
            Arg::F32(_) => ParamKind::F32,
        }
    }
}

/// A kernel launch: which kernel, its geometry and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
}

/// `c (+)= op(a) · op(b)`, row-major f32, `(m, n, k)` as in [`crate::backend::Backend::matmul`].
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub c: u64,
    pub a: u64,
    pub ta: bool,
    pub b: u64,
    pub tb: bool,
    pub mnk: (usize, usize, usize),
    pub accumulate: bool,
    /// The dtype of `a` and `b` (f32 or bf16); products accumulate in f32.
    pub inputs: DType,
    /// The dtype of `c`.
    pub output: DType,
    /// An f32 bias of `n` elements added to every row of `c` before it is stored (0:
    /// none; only with `!accumulate`, where [`Gpu::fuses_bias`] says so).
    pub bias: u64,
}

impl Gemm {
    /// How a profile names this GEMM: `GEMM bf16->f32 512x768x256`, `GEMM+bias …` when it
    /// adds its bias itself.
    pub fn label(&self) -> String {
        let (m, n, k) = self.mnk;
        let bias = if self.bias != 0 { "+bias" } else { "" };
        format!("GEMM{bias} {}->{} {m}x{n}x{k}", self.inputs, self.output)
    }
}

/// Whether FERROVIT_PROFILE=1 asks devices to profile every launch and GEMM.
pub(crate) fn profiling() -> bool {
    std::env::var("FERROVIT_PROFILE").is_ok_and(|v| v == "1")
}

/// Per-name totals of a profile, slowest first: (name, calls, milliseconds).
pub(crate) fn profile_rows(totals: &HashMap<String, (u64, f64)>) -> Vec<(String, u64, f64)> {
    let mut rows: Vec<_> = totals
        .iter()
        .map(|(k, &(n, ms))| (k.clone(), n, ms))
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    rows
}

/// What the backend needs from a device: memory, copies, kernel launches, GEMMs. All
/// work is ordered on one stream; downloads wait for it.
pub trait Gpu: Send + Sync {
    fn describe(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<u64>;
    fn free(&self, ptr: u64);
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Runs a kernel; `args` must match its signature in kernels/*.cu (implementations
    /// refuse any other launch, through `signature::check_args`, before touching the device).
    fn launch(&self, launch: &Launch, args: &[Arg]) -> Result<()>;
    fn gemm(&self, gemm: &Gemm) -> Result<()>;
    /// Whether `gemm` can add its bias itself (cuBLASLt's bias epilogue); otherwise the
    /// caller fills `c` with the bias and accumulates onto it.
    fn fuses_bias(&self, gemm: &Gemm) -> bool;
    fn synchronize(&self) -> Result<()>;
    /// The CUDA stream everything runs on (for NCCL, which enqueues its own kernels in
    /// order with ours); `None` on the emulated device.
    fn stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        None
    }
    /// Device time per kernel (name, calls, milliseconds), slowest first, when the
    /// device was opened with FERROVIT_PROFILE=1 (on a GPU CUDA events around every
    /// launch and GEMM; on the emulated device the host time each took); `None`
    /// otherwise.
    fn profile(&self) -> Option<Vec<(String, u64, f64)>> {
        None
    }
}

/// An opened device: its implementation and the backend that computes on it.
pub struct CudaDevice {
    pub label: String,
    pub gpu: Arc<dyn Gpu>,
    pub backend: CudaBackend,
}

/// What tensors need of a device: its memory, through the [`Gpu`], and its fill and
/// cast kernels, through the backend.
impl DeviceMemory for CudaDevice {
    fn label(&self) -> &str {
        &self.label
    }
    fn describe(&self) -> String {
        self.gpu.describe()
    }
    fn is_gpu(&self) -> bool {
        self.gpu.stream().is_some()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.gpu.alloc(bytes)
    }
    fn free(&self, ptr: u64) {
        self.gpu.free(ptr)
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.gpu.upload(dst, src)
    }
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.gpu.download(src, dst)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.gpu.copy(dst, src, bytes)
    }
    fn fill(&self, t: &mut Tensor, value: f32) -> Result<()> {
        self.backend.fill(t, value)
    }
    fn cast(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.backend.cast(x, out)
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }
}

fn registry() -> &'static Mutex<Vec<(String, &'static CudaDevice)>> {
    static DEVICES: OnceLock<Mutex<Vec<(String, &'static CudaDevice)>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(Vec::new()))
}

/// The device registered under `key`, opened by `open` the first time (devices live
/// for the whole process, like a CUDA context).
fn device(key: &str, open: impl FnOnce() -> Result<Arc<dyn Gpu>>) -> Result<Device> {
    let mut devices = registry()
        .lock()
        .map_err(|_| Error::Device("the device table was poisoned by a panic".into()))?;
    if let Some(i) = devices.iter().position(|(k, _)| k == key) {
        return Ok(Device::Cuda(GpuId::new(i as u16)));
    }
    let gpu = open()?;
    crate::tensor::install_memory(|id| get(id));
    let id = GpuId::new(devices.len() as u16);
    let dev: &'static CudaDevice = Box::leak(Box::new(CudaDevice {
        label: key.to_string(),
        backend: CudaBackend::new(gpu.clone(), Device::Cuda(id)),
        gpu,
    }));
    devices.push((key.to_string(), dev));
    Ok(Device::Cuda(id))
}

/// The opened device `id` names.
pub fn get(id: GpuId) -> &'static CudaDevice {
    let devices = registry().lock().unwrap_or_else(|e| e.into_inner());
    // A GpuId is only made by `device`, after registering: the index exists.
    devices[id.index()].1
}

/// GPU `ordinal` through the CUDA driver (see [`Device::cuda`]).
pub(crate) fn open_gpu(ordinal: usize) -> Result<Device> {
    device(&format!("cuda:{ordinal}"), || {
        Ok(Arc::new(driver::DriverGpu::open(ordinal)?) as Arc<dyn Gpu>)
    })
}

/// An emulated device under `key` (one key, one device with its own memory).
pub(crate) fn open_emulated(key: &str, gpu: impl FnOnce() -> emu::EmuGpu) -> Device {
    device(key, || Ok(Arc::new(gpu()) as Arc<dyn Gpu>))
        .expect("opening the emulated device cannot fail")
}

/// The CUDA stream `device` computes on (NCCL enqueues its collectives on it, in
/// order with the kernels); `None` on the CPU and on an emulated device.
pub fn stream(device: Device) -> Option<Arc<cudarc::driver::CudaStream>> {
    match device {
        Device::Cuda(id) => get(id).gpu.stream(),
        Device::Cpu => None,
    }
}

/// The kernel profile of `device` (see [`Gpu::profile`]); `None` on the CPU.
pub fn profile(device: Device) -> Option<Vec<(String, u64, f64)>> {
    match device {
        Device::Cuda(id) => get(id).gpu.profile(),
        Device::Cpu => None,
    }
}
