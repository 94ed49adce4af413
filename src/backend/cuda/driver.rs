//! [`Gpu`] on a real NVIDIA GPU through cudarc (dynamically loaded: a machine without
//! CUDA builds and runs the CPU backend, and `--device cuda` fails with a clear error).
//! Kernels come from the cubin build.rs embedded (PTX, JIT-compiled by the driver,
//! when the GPU is not sm_90); GEMMs are cuBLAS GemmEx (f32 or bf16 operands, f32
//! accumulation). Everything runs on one stream. Uploads pass through a pinned staging
//! ring and return without waiting for the device (the host prepares the next work while
//! the GPU runs); downloads wait for it.

use super::signature::check_args;
use super::staging::Ring;
use super::{Arg, Gemm, Gpu, Launch};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as cu, sys, CudaContext, CudaStream};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

pub struct DriverGpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The device's stream-ordered memory pool, which every tensor is allocated from.
    pool: sys::CUmemoryPool,
    modules: Vec<sys::CUmodule>,
    functions: Mutex<HashMap<&'static str, (sys::CUfunction, u32)>>,
    /// Locked around each call: ranks of a parallel run may share one GPU.
    blas: Mutex<blas_sys::cublasHandle_t>,
    /// cuBLASLt for GEMMs with a bias (`None` without the library).
    lt: Option<super::lt::Lt>,
    name: String,
    /// FERROVIT_PROFILE=1: events around every launch and GEMM, read at each synchronize.
    profile: Option<Mutex<Profile>>,
    /// Pinned host memory uploads are copied through (allocated at the first upload;
    /// `Err` when pinning failed: uploads then copy from pageable memory and wait).
    staging: Mutex<Option<std::result::Result<Staging, ()>>>,
}

/// Bytes of pinned staging memory (larger uploads go through it in pieces).
const STAGING_BYTES: usize = 64 << 20;

struct Staging {
    host: *mut u8,
    ring: Ring<Event>,
}

/// A CUDA event recorded after a staged copy; destroyed when its region is retired.
struct Event(sys::CUevent);

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: a live event, destroyed once; destroying one still pending is allowed.
        unsafe {
            let _ = cu::event::destroy(self.0);
        }
    }
}

#[derive(Default)]
struct Profile {
    /// Recorded, not yet read: (what ran, start event, end event).
    pending: Vec<(String, sys::CUevent, sys::CUevent)>,
    /// Per name: calls and milliseconds.
    totals: HashMap<String, (u64, f64)>,
}

// SAFETY: the raw module, function and cuBLAS handles are only used with the context
// bound to the calling thread; cuBLAS calls are serialised by the handle's mutex (a
// handle may be shared between threads that do not call it concurrently), and the
// backend's callers hold the tensors they pass exclusively.
unsafe impl Send for DriverGpu {}
unsafe impl Sync for DriverGpu {}

fn driver_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("CUDA: {what}: {e:?}"))
}

impl DriverGpu {
    pub fn open(ordinal: usize) -> Result<DriverGpu> {
        if !crate::kernels::BUILT {
            return Err(Error::Device(
                "this ferrovit was built without CUDA kernels (no nvcc at build time): run \
                 scripts/install-cuda.sh and rebuild, or use --device cpu"
                    .into(),
            ));
        }
        // SAFETY: only probes for the library; loading it is cudarc's business.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver found (libcuda.so could not be loaded): --device cuda needs an \
                 NVIDIA GPU with its driver; use --device cpu"
                    .into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "the CUDA driver is here but cuBLAS (libcublas.so.13) could not be loaded: \
                 install the CUDA 13 runtime libraries or add their folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| driver_error("counting devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "no CUDA device {ordinal}: this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("creating a context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))?;
        let stream = ctx.default_stream();
        // Tensors come from the device's stream-ordered pool (cuMemAllocAsync). By default
        // the pool hands every unused byte back to the driver at each synchronisation (a
        // training step has one: the loss is read back), so the next step would map all
        // its activation memory afresh. Keep it instead, as PyTorch's caching allocator
        // does; an allocation that finds the device full trims the pool and tries again.
        // SAFETY: the device belongs to the bound context; the value is a u64, as the
        // release threshold attribute requires.
        let pool = unsafe {
            let pool = cu::device::get_default_mem_pool(ctx.cu_device())
                .map_err(|e| driver_error("getting the device's memory pool", e))?;
            let mut keep = u64::MAX;
            cu::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut c_void,
            )
            .map_err(|e| driver_error("keeping freed memory in the pool", e))?;
            pool
        };
        let mut modules = Vec::new();
        for (name, ptx, cubin) in crate::kernels::MODULES {
            // SAFETY: the context is bound; the images are valid cubin / NUL-terminated PTX.
            let module = unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) }
                .or_else(|_| {
                    let src = CString::new(*ptx).map_err(|e| driver_error(name, e))?;
                    unsafe { cu::module::load_data(src.as_ptr() as *const c_void) }
                        .map_err(|e| driver_error(&format!("loading kernels/{name}.cu"), e))
                })?;
            modules.push(module);
        }
        let blas =
            blas::create_handle().map_err(|e| driver_error("creating a cuBLAS handle", e))?;
        // SAFETY: both handles are live.
        unsafe { blas::set_stream(blas, stream.cu_stream() as _) }
            .map_err(|e| driver_error("binding cuBLAS to the stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        // SAFETY: the context is bound; the workspace lives as long as the device.
        let lt = unsafe { cu::malloc_sync(super::lt::WORKSPACE_BYTES) }
            .ok()
            .and_then(super::lt::Lt::new);
        Ok(DriverGpu {
            ctx,
            stream,
            pool,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            lt,
            name: format!("{name} (cuda:{ordinal})"),
            profile: super::profiling().then(Mutex::default),
            staging: Mutex::new(None),
        })
    }

    /// Runs `enqueue` (one launch or GEMM on the stream) between two recorded events
    /// when profiling.
    fn timed(
        &self,
        what: impl FnOnce() -> String,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let Some(profile) = &self.profile else {
            return enqueue();
        };
        let event = || {
            cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| driver_error("creating an event", e))
        };
        let (start, end) = (event()?, event()?);
        let stream = self.stream.cu_stream();
        // SAFETY: live events recorded on our live stream.
        unsafe { cu::event::record(start, stream) }.map_err(|e| driver_error("recording", e))?;
        enqueue()?;
        unsafe { cu::event::record(end, stream) }.map_err(|e| driver_error("recording", e))?;
        profile
            .lock()
            .map_err(|_| Error::Device("CUDA profile poisoned".into()))?
            .pending
            .push((what(), start, end));
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))
    }

    /// The kernel's function handle, looked up once; raises its dynamic shared memory
    /// limit when a launch needs more than the default 48 KiB.
    fn function(&self, name: &'static str, shared: u32) -> Result<sys::CUfunction> {
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| Error::Device("CUDA function table poisoned".into()))?;
        let entry = match functions.get(name) {
            Some(&e) => e,
            None => {
                let c = CString::new(name).map_err(|e| driver_error(name, e))?;
                let f = self
                    .modules
                    .iter()
                    // SAFETY: every module is loaded and live.
                    .find_map(|&m| unsafe { cu::module::get_function(m, c.clone()) }.ok())
                    .ok_or_else(|| {
                        Error::Device(format!(
                            "CUDA: no kernel named {name} in the embedded modules"
                        ))
                    })?;
                functions.insert(name, (f, 48 << 10));
                (f, 48 << 10)
            }
        };
        if shared > entry.1 {
            // SAFETY: `f` is a live function handle.
            unsafe {
                cu::function::set_function_attribute(
                    entry.0,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
            }
            .map_err(|e| {
                driver_error(
                    &format!("kernel {name} needs {shared} bytes of shared memory"),
                    e,
                )
            })?;
            functions.insert(name, (entry.0, shared));
        }
        Ok(entry.0)
    }
}

impl Gpu for DriverGpu {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        let stream = self.stream.cu_stream();
        // SAFETY: stream-ordered allocation on our live stream.
        let first = unsafe { cu::malloc_async(stream, bytes) };
        match first {
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // The pool keeps what was freed (see `open`); memory freed on the stream
                // but still pooled may be what is missing: wait for the stream, give the
                // pool's unused memory back, try once more.
                self.stream
                    .synchronize()
                    .map_err(|e| driver_error("synchronizing", e))?;
                // SAFETY: our device's live pool; the stream is idle; then as above.
                unsafe { cu::mem_pool::trim_to(self.pool, 0) }
                    .map_err(|e| driver_error("trimming the memory pool", e))?;
                unsafe { cu::malloc_async(stream, bytes) }
            }
            r => r,
        }
        .map_err(|e| driver_error(&format!("allocating {bytes} bytes"), e))
    }

    fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc`; freeing is ordered after its last use.
            let _ = unsafe { cu::free_async(ptr, self.stream.cu_stream()) };
        }
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| Error::Device("CUDA staging buffer poisoned".into()))?;
        // SAFETY: pinning host memory; freed never (it lives as long as the device).
        let staging = staging.get_or_insert_with(|| {
            unsafe { cu::malloc_host(STAGING_BYTES, 0) }
                .map(|host| Staging {
                    host: host.cast(),
                    ring: Ring::new(STAGING_BYTES),
                })
                .map_err(|_| ())
        });
        let Ok(staging) = staging else {
            // SAFETY: `dst` holds at least `src.len()` bytes (the backend sizes buffers);
            // the host slice outlives the copy because we wait for the stream.
            unsafe { cu::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
                .map_err(|e| driver_error("copying to the device", e))?;
            return self.synchronize();
        };
        let stream = self.stream.cu_stream();
        for (i, chunk) in src.chunks(STAGING_BYTES).enumerate() {
            let n = chunk.len();
            let event = Event(
                cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(|e| driver_error("creating an event", e))?,
            );
            let start = staging.ring.reserve(n, |e| {
                // SAFETY: a live event, recorded after an earlier staged copy.
                unsafe { cu::event::synchronize(e.0) }
                    .map_err(|e| driver_error("waiting for a staged copy", e))
            })?;
            // SAFETY: `start + n <= STAGING_BYTES` and no copy still reads that region
            // (the ring waited for it); `dst` holds at least `src.len()` bytes.
            let pinned = unsafe {
                let p = staging.host.add(start);
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, n);
                std::slice::from_raw_parts(p, n)
            };
            let offset = (i * STAGING_BYTES) as u64;
            unsafe { cu::memcpy_htod_async(dst + offset, pinned, stream) }
                .map_err(|e| driver_error("copying to the device", e))?;
            // SAFETY: a live event on our live stream.
            if let Err(e) = unsafe { cu::event::record(event.0, stream) } {
                // nothing marks the region busy: let the copy finish before reporting
                let _ = self.stream.synchronize();
                return Err(driver_error("recording an event", e));
            }
            staging.ring.issued(start, n, event);
        }
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as for upload.
        unsafe { cu::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_error("copying from the device", e))?;
        self.synchronize()
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges are live device buffers of at least `bytes`.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_error("copying on the device", e))
    }

    fn launch(&self, l: &Launch, args: &[Arg]) -> Result<()> {
        check_args(l.kernel, args)?;
        self.bind()?;
        let f = self.function(l.kernel, l.shared)?;
        let mut slots: Vec<u64> = args.iter().map(Arg::bits).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: one slot per kernel parameter, each of that parameter's kind (so of its
        // width) and holding the value in its low bytes: `check_args` above refused any
        // other launch, against the signatures build.rs read from kernels/*.cu.
        self.timed(
            || l.kernel.to_string(),
            || {
                unsafe {
                    cu::launch_kernel(
                        f,
                        (l.grid[0], l.grid[1], l.grid[2]),
                        (l.block[0], l.block[1], l.block[2]),
                        l.shared,
                        self.stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(|e| driver_error(&format!("launching {}", l.kernel), e))
            },
        )
    }

    fn fuses_bias(&self, g: &Gemm) -> bool {
        !g.accumulate && self.bind().is_ok() && self.lt.as_ref().is_some_and(|lt| lt.supports(g))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.bind()?;
        if g.bias != 0 {
            let lt = self
                .lt
                .as_ref()
                .filter(|_| !g.accumulate)
                .ok_or_else(|| Error::Device("a GEMM with a bias needs cuBLASLt".into()))?;
            // SAFETY: the backend checked every operand's size (and the bias's) against
            // (m, n, k) and dtype; the context is bound and the stream is ours.
            return self.timed(
                || g.label(),
                || unsafe {
                    lt.matmul(g, self.stream.cu_stream() as *mut c_void)
                        .map_err(|e| driver_error("cuBLASLt matmul", e))
                },
            );
        }
        let (m, n, k) = g.mnk;
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| Error::Config(format!("GEMM size {v} too large")))
        };
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ.
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let cuda_type = |d: DType| match d {
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            _ => blas_sys::cudaDataType::CUDA_R_32F,
        };
        // SAFETY: the backend checked every operand's size against (m, n, k) and dtype.
        let handle = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        self.timed(
            || g.label(),
            || unsafe {
                blas::gemm_ex(
                    *handle,
                    op(g.tb),
                    op(g.ta),
                    dim(n)?,
                    dim(m)?,
                    dim(k)?,
                    &alpha as *const f32 as *const c_void,
                    g.b as *const c_void,
                    cuda_type(g.inputs),
                    dim(if g.tb { k } else { n })?,
                    g.a as *const c_void,
                    cuda_type(g.inputs),
                    dim(if g.ta { m } else { k })?,
                    &beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    cuda_type(g.output),
                    dim(n)?,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .map_err(|e| driver_error("cuBLAS GemmEx", e))
            },
        )
    }

    fn stream(&self) -> Option<Arc<CudaStream>> {
        Some(self.stream.clone())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronizing", e))?;
        if let Some(profile) = &self.profile {
            let mut p = profile
                .lock()
                .map_err(|_| Error::Device("CUDA profile poisoned".into()))?;
            for (what, start, end) in std::mem::take(&mut p.pending) {
                // SAFETY: both events were recorded and the stream has drained.
                let ms = unsafe { cu::event::elapsed(start, end) }
                    .map_err(|e| driver_error("reading an event", e))?;
                unsafe {
                    let _ = cu::event::destroy(start);
                    let _ = cu::event::destroy(end);
                }
                let t = p.totals.entry(what).or_default();
                t.0 += 1;
                t.1 += ms as f64;
            }
        }
        Ok(())
    }

    fn profile(&self) -> Option<Vec<(String, u64, f64)>> {
        let p = self.profile.as_ref()?.lock().ok()?;
        Some(super::profile_rows(&p.totals))
    }
}
