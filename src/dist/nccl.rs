//! The NCCL group: collectives on GPUs through NVIDIA's NCCL (via `cudarc`, loaded
//! at run time: the crate builds and runs without CUDA installed, and this group then
//! reports that it is unavailable).
//!
//! The group is built over another group of the same ranks (a [`super::TcpGroup`], a
//! [`super::SubGroup`] of one, threads): its rank 0 creates the NCCL unique id and
//! broadcasts it through that group; every rank then joins on its GPU. Collectives run
//! with NCCL's own algorithms (ring/tree, NVLink, InfiniBand; configured by NCCL's
//! environment variables: `NCCL_DEBUG=INFO` shows what it found, `NCCL_SOCKET_IFNAME`
//! picks the network interface, `NCCL_IB_DISABLE` …). Point-to-point messages go
//! through the underlying group: they must not wait for the receiver, which a lone
//! NCCL send does.
//!
//! Gradients on the group's GPU are reduced where they are
//! ([`ProcessGroup::all_reduce_tensors`]), on the CUDA backend's stream, so the reduction
//! is ordered after the backward pass that wrote them and before the optimizer that
//! reads them, with no copy. Host slices are copied to the GPU and back. Every call
//! waits at most the group's timeout: a collective that does not finish in time aborts
//! the communicator and fails, and every later call fails too.

use super::{ProcessGroup, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn comm_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL: {what}: {e:?}"))
}

/// An NCCL communicator, aborted when dropped.
struct Comm(sys::ncclComm_t);

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it
// are not concurrent; every use goes through `NcclGroup::comm`'s mutex.
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: a live communicator, aborted once (abort also frees it, and does not
        // wait for collectives that will never finish).
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

/// Ranks on GPUs, collectives through NCCL.
pub struct NcclGroup {
    base: Box<dyn ProcessGroup>,
    stream: Arc<CudaStream>,
    /// `None` once aborted after a timeout.
    comm: Mutex<Option<Comm>>,
    timeout: Duration,
}

/// The NCCL library cudarc loads is `libnccl.so`; NVIDIA's wheels ship `libnccl.so.2`.
const LIBRARY_HINT: &str = "install NCCL (e.g. `pip install nvidia-nccl-cu13`) and put a directory holding \
     `libnccl.so` on LD_LIBRARY_PATH (the pip wheel has only `libnccl.so.2`: link it as `libnccl.so`)";

impl NcclGroup {
    /// Whether the CUDA driver and the NCCL library can be loaded here.
    pub fn available() -> bool {
        // SAFETY: only tries to open the shared libraries.
        unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
    }

    /// Joins the ranks of `base` in an NCCL communicator on GPU `gpu` (collectives on
    /// that GPU's default stream); every blocking call then waits at most `timeout`.
    pub fn new(base: Box<dyn ProcessGroup>, gpu: usize, timeout: Duration) -> Result<NcclGroup> {
        Self::check_available()?;
        let ctx = CudaContext::new(gpu).map_err(|e| comm_err(&format!("GPU {gpu}"), e))?;
        Self::join(base, ctx.default_stream(), timeout)
    }

    /// As [`NcclGroup::new`] on the GPU of `device`, with the collectives on the stream
    /// its backend computes on (so device tensors are reduced in order with the
    /// kernels that write and read them). `device` must be a real GPU.
    pub fn on_device(
        base: Box<dyn ProcessGroup>,
        device: Device,
        timeout: Duration,
    ) -> Result<NcclGroup> {
        Self::check_available()?;
        let stream = crate::backend::cuda::stream(device).ok_or_else(|| {
            Error::Comm(format!("NCCL needs a real GPU, not {}", device.describe()))
        })?;
        Self::join(base, stream, timeout)
    }

    /// A clear error when [`NcclGroup::available`] is not.
    pub fn check_available() -> Result<()> {
        if Self::available() {
            return Ok(());
        }
        Err(Error::Comm(format!(
            "NCCL group: the CUDA driver (libcuda) or NCCL (libnccl) cannot be loaded on this machine; {LIBRARY_HINT}"
        )))
    }

    fn join(
        base: Box<dyn ProcessGroup>,
        stream: Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<NcclGroup> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| comm_err("binding the GPU", e))?;
        // The unique id (128 bytes) travels as floats (each byte exactly representable).
        let mut id = vec![0.0f32; 128];
        if base.rank() == 0 {
            let fresh = nccl::get_uniqueid().map_err(|e| comm_err("unique id", e))?;
            for (d, &c) in id.iter_mut().zip(fresh.internal.iter()) {
                *d = f32::from(c as u8);
            }
        }
        base.broadcast(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &b) in internal.iter_mut().zip(&id) {
            *d = b as u8 as std::ffi::c_char;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success (and only read then); the id is
        // the one rank 0 created, and every rank passes its own rank and the same size.
        let comm = unsafe {
            nccl::comm_init_rank(
                comm.as_mut_ptr(),
                base.world() as i32,
                sys::ncclUniqueId { internal },
                base.rank() as i32,
            )
            .map_err(|e| comm_err("joining the communicator", e))?;
            Comm(comm.assume_init())
        };
        Ok(NcclGroup {
            base,
            stream,
            comm: Mutex::new(Some(comm)),
            timeout,
        })
    }

    /// Whether `s` is this group's stream (the default streams of all GPUs share one
    /// handle: the GPU is compared too).
    fn same_stream(&self, s: &CudaStream) -> bool {
        s.cu_stream() == self.stream.cu_stream()
            && s.context().ordinal() == self.stream.context().ordinal()
    }

    /// The communicator, locked, with the GPU bound to this thread.
    fn comm(&self, what: &str) -> Result<MutexGuard<'_, Option<Comm>>> {
        let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(Error::Comm(format!(
                "NCCL {what}: the communicator was aborted after an earlier timeout"
            )));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| comm_err("binding the GPU", e))?;
        Ok(guard)
    }

    /// Waits (at most the timeout) until the stream has run what was enqueued on it;
    /// on a timeout aborts the communicator.
    fn wait(&self, guard: &mut MutexGuard<'_, Option<Comm>>, what: &str) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| comm_err(what, e))?;
        let deadline = Instant::now() + self.timeout;
        while !done.is_complete() {
            if Instant::now() >= deadline {
                guard.take(); // dropping the communicator aborts it
                return Err(Error::Comm(format!(
                    "rank {}: NCCL {what} timed out after {:?} (communicator aborted)",
                    self.base.rank(),
                    self.timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    /// Copies `data` to the GPU, runs `op` there (send buffer, receive buffer of
    /// `out_len` elements, communicator, stream), waits and copies the result back.
    fn on_gpu(
        &self,
        what: &str,
        data: &[f32],
        out_len: usize,
        op: impl FnOnce(
            *const c_void,
            *mut c_void,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<Vec<f32>> {
        let mut guard = self.comm(what)?;
        if data.is_empty() {
            return Ok(Vec::new()); // every rank has nothing (lengths agree)
        }
        let s = &self.stream;
        let src: CudaSlice<f32> = s.clone_htod(data).map_err(|e| comm_err(what, e))?;
        let dst: CudaSlice<f32> = s.alloc_zeros(out_len).map_err(|e| comm_err(what, e))?;
        {
            let (sp, _sync_src) = src.device_ptr(s);
            let (dp, _sync_dst) = dst.device_ptr(s);
            let comm = guard.as_ref().map_or(std::ptr::null_mut(), |c| c.0);
            op(sp as _, dp as _, comm, s.cu_stream() as _).map_err(|e| comm_err(what, e))?;
        }
        self.wait(&mut guard, what)?;
        s.clone_dtoh(&dst).map_err(|e| comm_err(what, e))
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;

/// NCCL operations issued between one group start and end (NCCL fuses them into few
/// kernels).
const OPS_PER_GROUP: usize = 256;

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.base.rank()
    }

    fn world(&self) -> usize {
        self.base.world()
    }

    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()> {
        self.base.send(data, to, tag)
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.base.recv(from, tag)
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = data.len();
        let out = self.on_gpu("all_reduce", data, n, |s, d, c, st| {
            // SAFETY: device buffers of n floats on the communicator's GPU.
            unsafe { nccl::all_reduce(s, d, n, F32, nccl_op(op), c, st) }
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let n = data.len();
        let out = self.on_gpu("broadcast", data, n, |s, d, c, st| {
            // SAFETY: device buffers of n floats on the communicator's GPU.
            unsafe { nccl::broadcast(s, d, n, F32, root as i32, c, st) }
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>> {
        let n = data.len();
        self.on_gpu("all_gather", data, n * self.world(), |s, d, c, st| {
            // SAFETY: n floats in, world × n out, on the communicator's GPU.
            unsafe { nccl::all_gather(s, d, n, F32, c, st) }
        })
    }

    fn reduce_scatter(&self, data: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let n = super::scatter_len(data.len(), self.world())?;
        self.on_gpu("reduce_scatter", data, n, |s, d, c, st| {
            // SAFETY: world × n floats in, n out, on the communicator's GPU.
            unsafe { nccl::reduce_scatter(s, d, n, F32, nccl_op(op), c, st) }
        })
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [0.0], ReduceOp::Sum)
    }

    /// f32 tensors on this group's GPU are reduced in place on the device, in groups of
    /// NCCL calls; anything else passes through host memory.
    fn all_reduce_tensors(
        &self,
        tensors: &mut [&mut Tensor],
        op: ReduceOp,
        bucket: usize,
    ) -> Result<()> {
        let here = |t: &Tensor| {
            t.dtype() == DType::F32
                && crate::backend::cuda::stream(t.device()).is_some_and(|s| self.same_stream(&s))
        };
        if !tensors.iter().all(|t| here(t)) {
            return super::all_reduce_through_host(self, tensors, op, bucket);
        }
        let what = "gradient all_reduce";
        let mut buffers = Vec::with_capacity(tensors.len());
        for t in tensors.iter_mut() {
            buffers.push((t.cuda_ptr_mut()?, t.numel()));
        }
        let mut guard = self.comm(what)?;
        let comm = guard.as_ref().map_or(std::ptr::null_mut(), |c| c.0);
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        for chunk in buffers.chunks(OPS_PER_GROUP) {
            nccl::group_start().map_err(|e| comm_err(what, e))?;
            let mut issued = Ok(());
            for &(ptr, n) in chunk {
                // SAFETY: `ptr` holds n floats on the communicator's GPU, written by
                // kernels on this same stream; reduced in place.
                issued = unsafe {
                    nccl::all_reduce(ptr as _, ptr as _, n, F32, nccl_op(op), comm, stream)
                }
                .map(|_| ());
                if issued.is_err() {
                    break;
                }
            }
            // the group is closed even when a call failed (NCCL requires it)
            let closed = nccl::group_end();
            issued.map_err(|e| comm_err(what, e))?;
            closed.map_err(|e| comm_err(what, e))?;
        }
        self.wait(&mut guard, what)
    }
}
