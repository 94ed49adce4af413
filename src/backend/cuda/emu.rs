//! The emulated device: kernels/*.cu compiled as C++ for the host (build.rs, with
//! kernels/emu.h) and run here, so the whole CUDA path is tested on machines without
//! a GPU.
//!
//! Each block's threads are coroutines (`corosensei`, one small stack each, switched
//! in user space) on one OS thread; blocks run in parallel across rayon's threads.
//! `__syncthreads` and warp shuffles call back into [`fv_emu_barrier`], which suspends
//! the thread. Warps run one at a time, each until it reaches `__syncthreads` or ends
//! (its lanes released together from each warp barrier), and the order of warps and
//! lanes flips after every barrier — so a missing `__syncthreads` or `__syncwarp`
//! reads data not written yet (poisoned: NaN) and shows up as a wrong result. A
//! barrier that can never complete (divergent shuffles, lanes that exited) is an
//! error naming the kernel, never a hang.
//!
//! Device memory is host memory with a guard zone after every allocation: copies and
//! kernel pointer arguments must lie inside a live allocation, fresh allocations are
//! poisoned with NaN, and a kernel that writes past the end of a buffer it was given
//! fails its launch. GEMMs (cuBLAS on a GPU) are the CPU backend's GEMM.

use super::signature::check_args;
use super::{Arg, Gemm, Gpu, Launch};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use rayon::prelude::*;
use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

/// One kernel of the emulation table (layout of `FvEmuEntry` in emu_invoke.h).
#[repr(C)]
pub(crate) struct EmuEntry {
    name: *const std::ffi::c_char,
    call: unsafe extern "C" fn(*mut *mut c_void),
}

include!(concat!(env!("OUT_DIR"), "/emu_modules.rs"));

/// `dim3` of emu.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

/// `FvEmuThread` of emu.h.
#[repr(C)]
struct EmuThread {
    thread: Dim3,
    block: Dim3,
    block_dim: Dim3,
    grid_dim: Dim3,
    linear: u32,
    warp_slots: *mut u64,
    shuffles: *mut u32,
    dynamic_shared: *mut u8,
}

extern "C" {
    fn fv_emu_set_current(t: *const EmuThread);
}

type Entry = unsafe extern "C" fn(*mut *mut c_void);

fn kernels() -> &'static HashMap<&'static str, Entry> {
    static TABLE: OnceLock<HashMap<&'static str, Entry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for (_, entries) in EMU_SOURCES {
            let mut count: c_int = 0;
            // SAFETY: build.rs generated these functions: they return a static array
            // of `count` entries whose names are static C strings.
            unsafe {
                let first = entries(&mut count);
                for i in 0..count as usize {
                    let e = &*first.add(i);
                    if let Ok(name) = CStr::from_ptr(e.name).to_str() {
                        table.insert(name, e.call);
                    }
                }
            }
        }
        table
    })
}

const STACK_BYTES: usize = 128 << 10;
const GUARD_BYTES: usize = 256;
const GUARD: u8 = 0xa5;
/// Shared memory a block may use on an H100/H200 (227 KiB), enforced here too.
const MAX_SHARED: u32 = 227 << 10;

thread_local! {
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
    static YIELDER: Cell<*const Yielder<(), c_int>> = const { Cell::new(std::ptr::null()) };
}

/// Called by emulated kernels at a barrier (`scope` 0: block, 1: warp): suspends the
/// calling thread until the scheduler releases it.
#[no_mangle]
pub extern "C" fn fv_emu_barrier(scope: c_int) {
    let y = YIELDER.get();
    // SAFETY: only kernel code running inside one of `run_block`'s coroutines calls
    // this, and the coroutine stored its own yielder (alive on its stack) before
    // running the kernel; another coroutine may have replaced it meanwhile, so it is
    // restored after resuming.
    unsafe { (*y).suspend(scope) };
    YIELDER.set(y);
}

/// The scope a kernel passes to [`fv_emu_barrier`] to report a fault (emu.h); it is
/// never resumed.
const FAULT: c_int = 2;

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    Run,
    Wait(c_int),
    Done,
}

struct Params(Vec<*mut c_void>);
// SAFETY: the argument slots are only read (by value) while the launch runs.
unsafe impl Sync for Params {}

/// The guard zone behind a block's dynamic shared memory: 256 bytes of f32 NaNs whose
/// payload no kernel computes.
const SHARED_GUARD_WORDS: usize = 16;
const SHARED_GUARD: u128 = 0x7fc0_00a5_7fc0_00a5_7fc0_00a5_7fc0_00a5;

/// Runs one block to completion.
fn run_block(entry: Entry, params: &Params, l: &Launch, block: u32, name: &str) -> Result<()> {
    let [bx, by, bz] = l.block;
    let n = (bx * by * bz) as usize;
    let [gx, gy, _] = l.grid;
    let block_idx = Dim3 {
        x: block % gx,
        y: block / gx % gy,
        z: block / (gx * gy),
    };
    let mut slots = vec![0u64; n.div_ceil(32) * 64];
    let mut shuffles = vec![0u32; n];
    // 16-byte aligned, poisoned: reading shared memory nobody wrote gives NaN; a guard
    // zone (NaNs of another payload) behind it catches writes past the launch's size
    // 128-byte aligned, as a GPU's dynamic shared memory (tensor-core operands need 32)
    let words = (l.shared as usize).div_ceil(16);
    let mut shared = vec![u128::MAX; words + SHARED_GUARD_WORDS + 8];
    let pad = shared.as_ptr().align_offset(128);
    let shared = &mut shared[pad..pad + words + SHARED_GUARD_WORDS];
    shared[words..].fill(SHARED_GUARD);
    let counters = shuffles.as_mut_ptr();
    let threads: Vec<EmuThread> = (0..n as u32)
        .map(|i| EmuThread {
            thread: Dim3 {
                x: i % bx,
                y: i / bx % by,
                z: i / (bx * by),
            },
            block: block_idx,
            block_dim: Dim3 {
                x: bx,
                y: by,
                z: bz,
            },
            grid_dim: Dim3 {
                x: l.grid[0],
                y: l.grid[1],
                z: l.grid[2],
            },
            linear: i,
            warp_slots: slots.as_mut_ptr(),
            // SAFETY: `i < n`, the length of `shuffles`.
            shuffles: unsafe { counters.add(i as usize) },
            dynamic_shared: shared.as_mut_ptr().cast(),
        })
        .collect();
    let args = params.0.as_ptr() as usize;
    let mut coros: Vec<Coroutine<(), c_int, (), DefaultStack>> = STACKS.with(|pool| {
        let mut pool = pool.borrow_mut();
        (0..n)
            .map(|_| {
                let stack = match pool.pop() {
                    Some(s) => s,
                    None => DefaultStack::new(STACK_BYTES).map_err(|e| {
                        Error::Device(format!(
                            "emulated device: cannot allocate a thread stack: {e}"
                        ))
                    })?,
                };
                Ok(Coroutine::with_stack(
                    stack,
                    move |y: &Yielder<(), c_int>, ()| {
                        YIELDER.set(y as *const _);
                        // SAFETY: `args` points at one slot per kernel parameter, each
                        // holding a value of that parameter's kind, as the generated
                        // trampoline expects: `launch` checked them (`check_args`).
                        unsafe { entry(args as *mut *mut c_void) }
                    },
                ))
            })
            .collect::<Result<_>>()
    })?;
    let mut state = vec![State::Run; n];
    let warps = n.div_ceil(32);
    let mut reverse = false;
    let outcome = loop {
        // Warps run one at a time, each as far as it can before a block barrier: the
        // most adversarial order for data shared between warps without __syncthreads.
        let backwards = reverse;
        for w in 0..warps {
            let w = if backwards { warps - 1 - w } else { w };
            let lanes = w * 32..((w + 1) * 32).min(n);
            loop {
                for k in 0..lanes.len() {
                    let i = if reverse {
                        lanes.end - 1 - k
                    } else {
                        lanes.start + k
                    };
                    if state[i] != State::Run {
                        continue;
                    }
                    // SAFETY: `threads[i]` outlives the resume; the kernel reads it
                    // through fv_emu_cur while this thread runs.
                    unsafe { fv_emu_set_current(&threads[i]) };
                    state[i] = match coros[i].resume(()) {
                        CoroutineResult::Yield(scope) => State::Wait(scope),
                        CoroutineResult::Return(()) => State::Done,
                    };
                }
                let warp = &mut state[lanes.clone()];
                if !warp.iter().all(|s| *s == State::Wait(1)) {
                    break;
                }
                warp.iter_mut().for_each(|s| *s = State::Run);
                reverse = !reverse;
            }
        }
        if state.iter().all(|s| *s == State::Done) {
            break Ok(());
        }
        if state.contains(&State::Wait(FAULT)) {
            break Err(Error::Device(format!(
                "kernel {name} (block {block}): a tensor-core (wmma) operand is not 32-byte \
                 aligned or its leading dimension is not a multiple of 16 bytes (a GPU faults)"
            )));
        }
        if !state
            .iter()
            .all(|s| matches!(s, State::Wait(0) | State::Done))
        {
            break Err(deadlock(name, block, &state));
        }
        state
            .iter_mut()
            .filter(|s| **s == State::Wait(0))
            .for_each(|s| *s = State::Run);
        reverse = !reverse;
    };
    STACKS.with(|pool| {
        let mut pool = pool.borrow_mut();
        for mut c in coros {
            if !c.done() {
                // SAFETY: a deadlocked kernel's frames own nothing that needs dropping
                // (C++ kernels, no destructors); its stack is simply reused.
                unsafe { c.force_reset() };
            }
            pool.push(c.into_stack());
        }
    });
    if outcome.is_ok() && shared[words..].iter().any(|&w| w != SHARED_GUARD) {
        return Err(Error::Device(format!(
            "kernel {name} (block {block}) wrote past its {} bytes of dynamic shared memory",
            l.shared
        )));
    }
    drop((slots, shuffles));
    outcome
}

fn deadlock(name: &str, block: u32, state: &[State]) -> Error {
    let count = |s: State| state.iter().filter(|x| **x == s).count();
    let partial = state
        .chunks(32)
        .position(|w| w.contains(&State::Wait(1)) && w.contains(&State::Done));
    Error::Device(format!(
        "emulated kernel {name}, block {block}: a barrier can never complete ({} threads at \
         __syncthreads, {} at a warp shuffle, {} exited{})",
        count(State::Wait(0)),
        count(State::Wait(1)),
        count(State::Done),
        partial.map_or(String::new(), |w| format!(
            "; warp {w} shuffles after some of its lanes exited"
        )),
    ))
}

struct Allocation {
    layout: Layout,
    len: usize,
}

/// The emulated device.
pub struct EmuGpu {
    allocations: Mutex<BTreeMap<u64, Allocation>>,
    /// Device memory, as on a real GPU (`None`: the host's).
    capacity: Option<usize>,
    /// GEMMs do not add a bias themselves (a GPU without cuBLASLt, or a shape it refuses).
    no_bias_epilogue: bool,
    /// FERROVIT_PROFILE=1: calls and host milliseconds per kernel and GEMM (the launch
    /// sequence is the GPU's; the times are the emulator's).
    profile: Option<Mutex<HashMap<String, (u64, f64)>>>,
}

impl Default for EmuGpu {
    fn default() -> EmuGpu {
        EmuGpu::new(None, false)
    }
}

impl EmuGpu {
    /// A device with `bytes` of memory: allocations beyond it fail as on a full GPU.
    pub fn with_memory(bytes: usize) -> EmuGpu {
        EmuGpu::new(Some(bytes), false)
    }

    /// A device whose GEMMs leave biases to the caller (fill, then accumulate).
    pub fn without_bias_epilogue() -> EmuGpu {
        EmuGpu::new(None, true)
    }

    fn new(capacity: Option<usize>, no_bias_epilogue: bool) -> EmuGpu {
        EmuGpu {
            allocations: Mutex::default(),
            capacity,
            no_bias_epilogue,
            profile: super::profiling().then(Mutex::default),
        }
    }

    /// Runs `f` (one launch or GEMM), adding it to the profile under `what` if profiling.
    fn timed(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(profile) = &self.profile else {
            return f();
        };
        let start = std::time::Instant::now();
        let r = f();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let mut totals = profile.lock().map_err(|_| poisoned())?;
        let t = totals.entry(what()).or_default();
        t.0 += 1;
        t.1 += ms;
        r
    }

    fn run_kernel(&self, l: &Launch, args: &[Arg]) -> Result<()> {
        let entry = *kernels().get(l.kernel).ok_or_else(|| {
            Error::Device(format!(
                "emulated device: no kernel named {} was built",
                l.kernel
            ))
        })?;
        let threads = l.block.iter().product::<u32>();
        if threads == 0 || threads > 1024 || l.grid.contains(&0) || l.shared > MAX_SHARED {
            return Err(Error::Device(format!(
                "kernel {}: invalid launch (grid {:?}, block {:?}, {} bytes of shared memory)",
                l.kernel, l.grid, l.block, l.shared
            )));
        }
        let mut buffers = Vec::new();
        for a in args {
            if let Arg::Ptr(p) = *a {
                if p != 0 {
                    buffers.push(self.containing(
                        p,
                        0,
                        &format!("kernel {} pointer argument", l.kernel),
                    )?);
                }
            }
        }
        let mut slots: Vec<u64> = args.iter().map(Arg::bits).collect();
        let params = Params(
            slots
                .iter_mut()
                .map(|s| s as *mut u64 as *mut c_void)
                .collect(),
        );
        let blocks = l.grid.iter().product::<u32>();
        (0..blocks)
            .into_par_iter()
            .try_for_each(|b| run_block(entry, &params, l, b, l.kernel))?;
        for (start, len) in buffers {
            self.check_guard(start, len, l.kernel)?;
        }
        Ok(())
    }

    fn run_gemm(&self, g: &Gemm) -> Result<()> {
        let (m, n, k) = g.mnk;
        if (g.inputs, g.output) == (DType::F32, DType::F32) {
            let span = |p: u64, len: usize, what: &str| -> Result<*mut f32> {
                self.containing(p, len * 4, what)?;
                Ok(p as usize as *mut f32)
            };
            let (a, b, c) = (
                span(g.a, m * k, "gemm A")?,
                span(g.b, k * n, "gemm B")?,
                span(g.c, m * n, "gemm C")?,
            );
            // SAFETY: each range lies inside a live allocation (checked); C does not
            // alias A or B (the backend never passes an output as an input).
            unsafe {
                let c = std::slice::from_raw_parts_mut(c, m * n);
                crate::backend::gemm::matmul(
                    c,
                    std::slice::from_raw_parts(a, m * k),
                    g.ta,
                    std::slice::from_raw_parts(b, k * n),
                    g.tb,
                    g.mnk,
                    g.accumulate,
                );
                self.add_bias(g, c)?;
            }
            return Ok(());
        }
        // Operands widened to f32 (exact for bf16), the CPU GEMM, the result rounded
        // back to `output`: what cuBLAS computes with f32 accumulation.
        let read = |p: u64, len: usize, dtype: DType, what: &str| -> Result<Vec<f32>> {
            let mut bytes = vec![0u8; len * dtype.size_in_bytes()];
            self.download(p, &mut bytes)
                .map_err(|e| Error::Device(format!("{what}: {e}")))?;
            Ok(Tensor::from_le_bytes(&bytes, dtype, [len])?.to_vec_f32())
        };
        let a = read(g.a, m * k, g.inputs, "gemm A")?;
        let b = read(g.b, k * n, g.inputs, "gemm B")?;
        let mut c = if g.accumulate {
            read(g.c, m * n, g.output, "gemm C")?
        } else {
            self.containing(g.c, m * n * g.output.size_in_bytes(), "gemm C")?;
            vec![0.0; m * n]
        };
        crate::backend::gemm::matmul(&mut c, &a, g.ta, &b, g.tb, g.mnk, g.accumulate);
        self.add_bias(g, &mut c)?;
        let c = Tensor::from_vec(c, [m * n])?.to_dtype(g.output);
        self.upload(g.c, &c.to_le_bytes())
    }

    /// The live allocation `[ptr, ptr + len)` lies in, as (start, length).
    fn containing(&self, ptr: u64, len: usize, what: &str) -> Result<(u64, usize)> {
        let allocs = self.allocations.lock().map_err(|_| poisoned())?;
        match allocs.range(..=ptr).next_back() {
            Some((&start, a)) if ptr + len as u64 <= start + a.len as u64 => Ok((start, a.len)),
            _ => Err(Error::Device(format!(
                "emulated device: {what} of {len} bytes at {ptr:#x} is outside every live allocation"
            ))),
        }
    }

    /// A GEMM's bias (if any) added to every row of its f32 result `c`, as cuBLASLt's
    /// epilogue does before the result is stored.
    fn add_bias(&self, g: &Gemm, c: &mut [f32]) -> Result<()> {
        if g.bias == 0 {
            return Ok(());
        }
        if g.accumulate {
            return Err(Error::Device(
                "emulated device: a GEMM with a bias cannot accumulate".into(),
            ));
        }
        let n = g.mnk.1;
        self.containing(g.bias, n * 4, "gemm bias")?;
        // SAFETY: `n` f32s inside a live allocation (checked); not written meanwhile.
        let bias = unsafe { std::slice::from_raw_parts(g.bias as usize as *const f32, n) };
        for row in c.chunks_mut(n) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
        Ok(())
    }

    fn check_guard(&self, start: u64, len: usize, kernel: &str) -> Result<()> {
        // SAFETY: `start` is a live allocation of `len + GUARD_BYTES` bytes.
        let guard =
            unsafe { std::slice::from_raw_parts((start as usize + len) as *const u8, GUARD_BYTES) };
        if guard.iter().any(|&b| b != GUARD) {
            return Err(Error::Device(format!(
                "emulated kernel {kernel} wrote past the end of a {len}-byte buffer"
            )));
        }
        Ok(())
    }
}

fn poisoned() -> Error {
    Error::Device("emulated device: allocation table poisoned by a panic".into())
}

impl Drop for EmuGpu {
    fn drop(&mut self) {
        if let Ok(allocs) = self.allocations.get_mut() {
            for (&start, a) in allocs.iter() {
                // SAFETY: allocated by `alloc` with this layout and not freed.
                unsafe { std::alloc::dealloc(start as usize as *mut u8, a.layout) };
            }
        }
    }
}

impl Gpu for EmuGpu {
    fn fuses_bias(&self, g: &Gemm) -> bool {
        !g.accumulate && !self.no_bias_epilogue
    }

    fn describe(&self) -> String {
        "emulated CUDA device (kernels run on the CPU)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        if let Some(cap) = self.capacity {
            let used: usize = self
                .allocations
                .lock()
                .map_err(|_| poisoned())?
                .values()
                .map(|a| a.len)
                .sum();
            if used + bytes > cap {
                return Err(Error::Device(format!(
                    "emulated device: out of memory allocating {bytes} bytes ({used} of {cap} in use)"
                )));
            }
        }
        let layout = Layout::from_size_align(bytes + GUARD_BYTES, 256).map_err(|e| {
            Error::Device(format!(
                "emulated device: cannot allocate {bytes} bytes: {e}"
            ))
        })?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::Device(format!(
                "emulated device: out of memory allocating {bytes} bytes"
            )));
        }
        // SAFETY: `p` is valid for the whole layout.
        unsafe {
            std::ptr::write_bytes(p, 0xff, bytes);
            std::ptr::write_bytes(p.add(bytes), GUARD, GUARD_BYTES);
        }
        let ptr = p as usize as u64;
        self.allocations
            .lock()
            .map_err(|_| poisoned())?
            .insert(ptr, Allocation { layout, len: bytes });
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        if let Ok(mut allocs) = self.allocations.lock() {
            if let Some(a) = allocs.remove(&ptr) {
                // SAFETY: allocated by `alloc` with this layout.
                unsafe { std::alloc::dealloc(ptr as usize as *mut u8, a.layout) };
            }
        }
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.containing(dst, src.len(), "upload")?;
        // SAFETY: the destination range lies inside a live allocation (checked).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.containing(src, dst.len(), "download")?;
        // SAFETY: the source range lies inside a live allocation (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.containing(dst, bytes, "copy destination")?;
        self.containing(src, bytes, "copy source")?;
        // SAFETY: both ranges lie inside live allocations (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, bytes) };
        Ok(())
    }

    fn launch(&self, l: &Launch, args: &[Arg]) -> Result<()> {
        check_args(l.kernel, args)?;
        self.timed(|| l.kernel.to_string(), || self.run_kernel(l, args))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.timed(|| g.label(), || self.run_gemm(g))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn profile(&self) -> Option<Vec<(String, u64, f64)>> {
        let totals = self.profile.as_ref()?.lock().ok()?;
        Some(super::profile_rows(&totals))
    }
}
