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
    /// parallel run asking for `s`: `cuda` is GPU `local` (one GPU per rank), `cuda:N`
    /// is GPU N for every rank, and `cuda-emu` is one emulated device per rank (memory
    /// apart, as on separate GPUs).
    pub fn for_rank(s: &str, local: usize) -> Result<Device> {
        match s {
            "cuda" => Device::cuda(local),
            "cuda-emu" if local > 0 => Ok(cuda::open_emulated(
                &format!("cuda-emu:{local}"),
                EmuGpu::default,
            )),
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
