//! The NCCL group: collectives on GPUs through NVIDIA's NCCL (via `cudarc`, loaded
//! at run time: the crate builds and runs without CUDA installed, and this group then
//! reports that it is unavailable).
//!
//! Rank 0 creates the NCCL unique id and shares it through the TCP rendezvous store
//! (`nccl/unique-id`); every rank joins with it on its GPU (`LOCAL_RANK`, or the one
//! given). Collectives run on the GPU with NCCL's own algorithms (ring/tree, NVLink,
//! InfiniBand; configured by NCCL's environment variables: `NCCL_DEBUG=INFO` shows
//! what it found, `NCCL_SOCKET_IFNAME` picks the network interface, `NCCL_IB_DISABLE`
//! …). Point-to-point messages go through the TCP mesh the group was built on: they
//! must not wait for the receiver, which a lone NCCL send does.
//!
//! The group takes host slices (copying them to the GPU and back) until the CUDA
//! backend hands it device buffers. Every call waits at most the group's timeout: a
//! collective that does not finish in time aborts the communicator and fails, and
//! every later call fails too.

use super::{ProcessGroup, ReduceOp, TcpGroup};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ID_KEY: &str = "nccl/unique-id";

fn comm_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL: {what}: {e:?}"))
}

/// An NCCL communicator that may move between threads.
struct SendComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it
// are not concurrent; every use goes through `NcclGroup::comm`'s mutex.
unsafe impl Send for SendComm {}

/// Ranks on GPUs, collectives through NCCL.
pub struct NcclGroup {
    tcp: TcpGroup,
    stream: Arc<CudaStream>,
    /// `None` once aborted after a timeout.
    comm: Mutex<Option<SendComm>>,
    timeout: Duration,
}

impl NcclGroup {
    /// Whether the CUDA driver and the NCCL library can be loaded here.
    pub fn available() -> bool {
        // SAFETY: only tries to open the shared libraries.
        unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
    }

    /// Joins the ranks of `tcp` (already connected) in an NCCL communicator on GPU
    /// `device`; every blocking call then waits at most `tcp`'s timeout.
    pub fn new(tcp: TcpGroup, device: usize) -> Result<NcclGroup> {
        if !Self::available() {
            return Err(Error::Comm(
                "NCCL group: the CUDA driver (libcuda) or NCCL (libnccl) cannot be loaded on this machine; \
                 install NCCL (e.g. `pip install nvidia-nccl-cu13`) and put its lib directory on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let timeout = tcp.timeout();
        let ctx = CudaContext::new(device).map_err(|e| comm_err(&format!("GPU {device}"), e))?;
        let stream = ctx.default_stream();
        let id = if tcp.rank() == 0 {
            let id = Id::new().map_err(|e| comm_err("unique id", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            tcp.store().set(ID_KEY, &bytes)?;
            id
        } else {
            let bytes = tcp.store().get(ID_KEY)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(Error::Comm(format!(
                    "NCCL: the unique id from the store has {} bytes, not 128",
                    bytes.len()
                )));
            }
            for (d, b) in internal.iter_mut().zip(bytes) {
                *d = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream.clone(), tcp.rank(), tcp.world(), id)
            .map_err(|e| comm_err("joining the communicator", e))?;
        Ok(NcclGroup {
            tcp,
            stream,
            comm: Mutex::new(Some(SendComm(comm))),
            timeout,
        })
    }

    /// Copies `data` to the GPU, runs `op` there, waits (at most the timeout) and
    /// copies the result (`out_len` elements) back.
    fn on_gpu(
        &self,
        what: &str,
        data: &[f32],
        out_len: usize,
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<Vec<f32>> {
        let mut guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = &guard
            .as_ref()
            .ok_or_else(|| {
                Error::Comm(format!(
                    "NCCL {what}: the communicator was aborted after an earlier timeout"
                ))
            })?
            .0;
        if data.is_empty() {
            return Ok(Vec::new()); // every rank has nothing (lengths agree)
        }
        let s = &self.stream;
        let src = s.clone_htod(data).map_err(|e| comm_err(what, e))?;
        let mut dst = s
            .alloc_zeros::<f32>(out_len)
            .map_err(|e| comm_err(what, e))?;
        op(comm, &src, &mut dst).map_err(|e| comm_err(what, e))?;
        let done = s.record_event(None).map_err(|e| comm_err(what, e))?;
        let deadline = Instant::now() + self.timeout;
        while !done.is_complete() {
            if Instant::now() >= deadline {
                guard.take(); // dropping the communicator aborts it
                return Err(Error::Comm(format!(
                    "rank {}: NCCL {what} timed out after {:?} (communicator aborted)",
                    self.tcp.rank(),
                    self.timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut out = vec![0.0f32; out_len];
        s.memcpy_dtoh(&dst, &mut out)
            .map_err(|e| comm_err(what, e))?;
        Ok(out)
    }
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world(&self) -> usize {
        self.tcp.world()
    }

    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()> {
        self.tcp.send(data, to, tag)
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.tcp.recv(from, tag)
    }

    fn all_reduce(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = data.len();
        let out = self.on_gpu("all_reduce", data, n, |c, s, d| {
            c.all_reduce(s, d, &nccl_op(op)).map(|_| ())
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let n = data.len();
        let out = self.on_gpu("broadcast", data, n, |c, s, d| {
            c.broadcast(Some(s), d, root as i32).map(|_| ())
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>> {
        let n = data.len() * self.world();
        self.on_gpu("all_gather", data, n, |c, s, d| {
            c.all_gather(s, d).map(|_| ())
        })
    }

    fn reduce_scatter(&self, data: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let n = super::scatter_len(data.len(), self.world())?;
        self.on_gpu("reduce_scatter", data, n, |c, s, d| {
            c.reduce_scatter(s, d, &nccl_op(op)).map(|_| ())
        })
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [0.0], ReduceOp::Sum)
    }
}
