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
use crate::tensor::{DType, Device};
use std::collections::HashMap;
use std::fmt;
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

/// Names a CUDA device opened in this process (see [`Device::cuda`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuId(u16);

/// An opened device: its implementation and the backend that computes on it.
pub struct CudaDevice {
    pub label: String,
    pub gpu: Arc<dyn Gpu>,
    pub backend: CudaBackend,
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
        return Ok(Device::Cuda(GpuId(i as u16)));
    }
    let gpu = open()?;
    let id = GpuId(devices.len() as u16);
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
    devices[id.0 as usize].1
}

impl Device {
    /// GPU `ordinal` through the CUDA driver; a clear error when there is no driver,
    /// no such GPU, or the kernels were not compiled into this build.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        device(&format!("cuda:{ordinal}"), || {
            Ok(Arc::new(driver::DriverGpu::open(ordinal)?) as Arc<dyn Gpu>)
        })
    }

    /// The emulated CUDA device: the same kernels, run on the CPU (for tests).
    pub fn cuda_emulated() -> Device {
        device("cuda-emu", || {
            Ok(Arc::new(emu::EmuGpu::default()) as Arc<dyn Gpu>)
        })
        .expect("opening the emulated device cannot fail")
    }

    /// An emulated CUDA device whose GEMMs do not add biases (the path taken where
    /// cuBLASLt is missing or refuses a shape; for tests).
    pub fn cuda_emulated_without_bias_epilogue() -> Device {
        device("cuda-emu(no bias epilogue)", || {
            Ok(Arc::new(emu::EmuGpu::without_bias_epilogue()) as Arc<dyn Gpu>)
        })
        .expect("opening the emulated device cannot fail")
    }

    /// An emulated CUDA device with only `bytes` of memory (for tests of running out).
    pub fn cuda_emulated_with_memory(bytes: usize) -> Device {
        device(&format!("cuda-emu({bytes} bytes)"), || {
            Ok(Arc::new(emu::EmuGpu::with_memory(bytes)) as Arc<dyn Gpu>)
        })
        .expect("opening the emulated device cannot fail")
    }

    /// The device of rank `local` (its index among this machine's ranks) of a
    /// parallel run asking for `s`: `cuda` is GPU `local` (one GPU per rank), `cuda:N`
    /// is GPU N for every rank, and `cuda-emu` is one emulated device per rank (memory
    /// apart, as on separate GPUs).
    pub fn for_rank(s: &str, local: usize) -> Result<Device> {
        match s {
            "cuda" => Device::cuda(local),
            "cuda-emu" if local > 0 => Ok(device(&format!("cuda-emu:{local}"), || {
                Ok(Arc::new(emu::EmuGpu::default()) as Arc<dyn Gpu>)
            })?),
            _ => Device::parse(s),
        }
    }

    /// `cpu`, `cuda`, `cuda:N` or `cuda-emu` (opening the device).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            "cuda-emu" => Ok(Device::cuda_emulated()),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(Error::Config(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or cuda-emu)"
                ))),
            },
        }
    }
}

/// Waits until everything queued on `device` has finished (a no-op on the CPU).
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(id) => get(id).gpu.synchronize(),
    }
}

/// What `device` is, in words (the GPU's name; "cpu").
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(id) => format!("{id}: {}", get(id).gpu.describe()),
    }
}

/// Whether `device` is a real GPU (not the CPU, not the emulated device).
pub fn is_gpu(device: Device) -> bool {
    match device {
        Device::Cpu => false,
        Device::Cuda(id) => get(id).gpu.stream().is_some(),
    }
}

impl fmt::Display for GpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&get(*self).label)
    }
}

/// Device memory owned by a tensor; freed on drop.
pub struct DevBuf {
    gpu: Arc<dyn Gpu>,
    pub id: GpuId,
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// `bytes` of device memory with unspecified contents (NaN on the emulated device).
    pub fn new(id: GpuId, bytes: usize) -> Result<DevBuf> {
        let gpu = get(id).gpu.clone();
        let ptr = gpu.alloc(bytes.max(4)).map_err(|e| {
            Error::Device(format!(
                "{e} on {id} (out of device memory? try a smaller --batch-size or model)"
            ))
        })?;
        Ok(DevBuf {
            gpu,
            id,
            ptr,
            bytes,
        })
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.gpu.free(self.ptr);
    }
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}
