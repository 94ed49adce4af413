//! The CUDA kernels of `kernels/*.cu`, compiled by build.rs with nvcc into PTX
//! (compute_90) and sm_90 cubin and embedded here; empty in a CPU-only build (no nvcc
//! at build time). The CUDA backend (issue 6) loads them once per device.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The PTX and cubin of kernel source `name` (its file stem), if built.
pub fn module(name: &str) -> Option<(&'static str, &'static [u8])> {
    MODULES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, ptx, cubin)| (*ptx, *cubin))
}
