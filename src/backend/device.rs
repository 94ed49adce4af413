//! Opening devices by name. `Device` itself lives in the tensor layer, which cannot
//! open one: that needs a backend, so its constructors are here, at the backend's
//! front door, the one place that knows every device.

use super::cuda::{self, emu::EmuGpu};
use crate::error::{Error, Result};
use crate::tensor::Device;

impl Device {
    /// GPU `ordinal` through the CUDA driver; a clear error when there is no driver,
    /// no such GPU, or the kernels were not compiled into this build.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        cuda::open_gpu(ordinal)
    }

    /// The emulated CUDA device: the same kernels, run on the CPU (for tests).
    pub fn cuda_emulated() -> Device {
        cuda::open_emulated("cuda-emu", EmuGpu::default)
    }

    /// An emulated CUDA device whose GEMMs do not add biases (the path taken where
    /// cuBLASLt is missing or refuses a shape; for tests).
    pub fn cuda_emulated_without_bias_epilogue() -> Device {
        cuda::open_emulated("cuda-emu(no bias epilogue)", EmuGpu::without_bias_epilogue)
    }

    /// An emulated CUDA device with only `bytes` of memory (for tests of running out).
    pub fn cuda_emulated_with_memory(bytes: usize) -> Device {
        cuda::open_emulated(&format!("cuda-emu({bytes} bytes)"), || {
            EmuGpu::with_memory(bytes)
        })
    }

    /// The device of rank `local` (its index among this machine's ranks) of a
    /// parallel run asking for `spec`: `cuda` is GPU `local` (one GPU per rank),
    /// `cuda:N` is GPU N for every rank, and `cuda-emu` is one emulated device per rank
    /// (memory apart, as on separate GPUs).
    pub fn for_rank(spec: DeviceSpec, local: usize) -> Result<Device> {
        match spec {
            DeviceSpec::Cuda(None) => Device::cuda(local),
            DeviceSpec::CudaEmu if local > 0 => Ok(cuda::open_emulated(
                &format!("cuda-emu:{local}"),
                EmuGpu::default,
            )),
            spec => Device::open(spec),
        }
    }

    /// Opens the device `spec` names.
    pub fn open(spec: DeviceSpec) -> Result<Device> {
        match spec {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::cuda(n.unwrap_or(0)),
            DeviceSpec::CudaEmu => Ok(Device::cuda_emulated()),
        }
    }

    /// `cpu`, `cuda`, `cuda:N` or `cuda-emu` (opening the device).
    pub fn parse(s: &str) -> Result<Device> {
        Device::open(s.parse()?)
    }
}

/// A device by name, before it is opened: `cpu`, `cuda` (GPU 0, or a GPU per rank
/// under a launcher), `cuda:N`, or `cuda-emu`. The one parser of that grammar; it is
/// the form of every `--device` flag and `device` config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    /// `cuda` (`None`) or `cuda:N`.
    Cuda(Option<usize>),
    CudaEmu,
}

impl DeviceSpec {
    /// Whether it names a CUDA device (real or emulated).
    pub fn is_cuda(self) -> bool {
        self != DeviceSpec::Cpu
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            "cuda-emu" => Ok(DeviceSpec::CudaEmu),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(Some(n))),
                _ => Err(Error::Config(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or cuda-emu)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceSpec::CudaEmu => f.write_str("cuda-emu"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<DeviceSpec> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}
