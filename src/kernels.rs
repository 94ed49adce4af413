//! The CUDA kernels of `kernels/*.cu`, compiled by build.rs with nvcc into PTX
//! (compute_90) and sm_90 cubin and embedded here; empty in a CPU-only build (no nvcc
//! at build time). The CUDA backend (issue 6) loads them once per device. [`SIGNATURES`]
//! (always built: build.rs reads every kernel's parameters) is what each launch is
//! checked against.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The PTX and cubin of kernel source `name` (its file stem), if built.
pub fn module(name: &str) -> Option<(&'static str, &'static [u8])> {
    MODULES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, ptx, cubin)| (*ptx, *cubin))
}

/// How a launch passes a kernel parameter (one `Arg` variant of the CUDA backend each):
/// what [`SIGNATURES`] records and every launch is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A pointer, to any type.
    Ptr,
    /// `int`.
    I32,
    /// `unsigned`.
    U32,
    /// `long`, `long long` (64-bit).
    I64,
    /// `unsigned long long`.
    U64,
    /// `float`.
    F32,
}

/// One parameter of a kernel, as kernels/*.cu declares it.
#[derive(Debug)]
pub struct Param {
    pub name: &'static str,
    /// Its C type (without `__restrict__`), for error messages.
    pub c_type: &'static str,
    pub kind: ParamKind,
}

/// A kernel's parameter list and the source (file stem) that defines it.
#[derive(Debug)]
pub struct Signature {
    pub kernel: &'static str,
    pub source: &'static str,
    pub params: &'static [Param],
}

include!(concat!(env!("OUT_DIR"), "/kernel_signatures.rs"));

/// The signature of kernel `name`, if kernels/*.cu defines it.
pub fn signature(name: &str) -> Option<&'static Signature> {
    SIGNATURES
        .binary_search_by(|s| s.kernel.cmp(name))
        .ok()
        .map(|i| &SIGNATURES[i])
}
