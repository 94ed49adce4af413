//! [`Backend`] on a CUDA device: each op is a kernel sequence with fixed launch
//! geometry, the same on a GPU and on the emulated device.

use super::{Arg, Gemm, Gpu, Launch};
use crate::backend::check::{
    check_attn, check_attn_backward, check_augment, check_cross_entropy, check_cross_entropy_soft,
    check_dropout, check_embed, check_embed_backward, check_layernorm, check_layernorm_backward,
    check_logits, check_matmul, check_matmul_bias, check_patchify, check_rows, check_same,
    check_select_rows, same_len,
};
use crate::backend::spec::site_key;
use crate::backend::{
    AdamStep, AttnDims, AugmentBatch, Backend, DropoutKey, DropoutMode, OptimTensors, SgdStep,
    Update,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// How activations may be stored (the `_f32` and `_bf16` forms of a kernel).
const ACTIVATIONS: [DType; 2] = [DType::F32, DType::BF16];

/// The `_f32` or `_bf16` form of a kernel, by the dtype of the activations it stores
/// (every tensor in `acts` the same).
fn variant(op: &str, forms: [&'static str; 2], acts: &[&Tensor]) -> Result<&'static str> {
    let dtype = acts.first().map_or(DType::F32, |t| t.dtype());
    if let Some(t) = acts.iter().find(|t| t.dtype() != dtype) {
        return Err(Error::Device(format!(
            "{op}: {dtype} and {} activations together: cast one first",
            t.dtype()
        )));
    }
    Ok(if dtype == DType::BF16 {
        forms[1]
    } else {
        forms[0]
    })
}

/// Dynamic shared memory of attention's forward or backward kernel: the layout in
/// kernels/attention.cu's header (Q, and dO in the backward, [q][hd rounded up to 4];
/// K and V [t][hd + 1], each rounded up to 4 floats; the score matrix, and dS in the
/// backward, [q][t rounded up to 4]).
fn attention_shared_bytes(dims: AttnDims, backward: bool) -> usize {
    let r4 = |n: usize| n.div_ceil(4) * 4;
    let (t, q, hd) = (dims.tokens, dims.queries, dims.dim / dims.heads);
    let per_query = if backward { 2 } else { 1 };
    let floats = per_query * q * (r4(hd) + r4(t)) + 2 * r4(t * (hd + 1));
    4 * floats
}

/// Dynamic shared memory of the tensor-core attention kernels: the layout in
/// kernels/attention_tc.cu's header (rows padded to 16; bf16 Q, dO, K, V with leading
/// dimension hd + 8; f32 S, dP with Tk + 4, also holding the f32 outputs with hd + 4;
/// bf16 P, dS with Tk + 8; each region rounded up to 128 bytes).
fn attention_tc_shared_bytes(dims: AttnDims, backward: bool) -> usize {
    let r16 = |n: usize| n.div_ceil(16) * 16;
    let a = |bytes: usize| bytes.div_ceil(128) * 128;
    let (tq, tk, hd) = (r16(dims.queries), r16(dims.tokens), dims.dim / dims.heads);
    let (ldh, lds, ldp, ldo) = (hd + 8, tk + 4, tk + 8, hd + 4);
    let (per_query, out_rows, dp) = if backward {
        (2, tk, a(4 * tq * lds))
    } else {
        (1, tq, 0)
    };
    per_query * (a(2 * tq * ldh) + a(2 * tq * ldp))
        + 2 * a(2 * tk * ldh)
        + a(4 * (tq * lds).max(out_rows * ldo))
        + dp
}

/// Shared memory one block may use on an H100/H200.
const MAX_SHARED: usize = 227 << 10;

/// Whether attention over `qkv` runs on tensor cores (kernels/attention_tc.cu): bf16,
/// heads a multiple of 16 wide, and the backward's staging fits a block (the forward
/// and backward decide alike). `FERROVIT_ATTENTION=simt` keeps the SIMT kernels (to
/// compare them; both round P and dS alike).
fn attention_on_tensor_cores(qkv: &Tensor, dims: AttnDims) -> bool {
    static SIMT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let simt = *SIMT.get_or_init(|| std::env::var("FERROVIT_ATTENTION").is_ok_and(|v| v == "simt"));
    !simt
        && qkv.dtype() == DType::BF16
        && (dims.dim / dims.heads).is_multiple_of(16)
        && attention_tc_shared_bytes(dims, true) <= MAX_SHARED
}

/// Threads per block of the 1-D (grid-stride) kernels.
const THREADS: u32 = 256;
/// Rows of threads in a column-sum block (kernels/columns.cuh: `FV_COLUMN_ROWS`).
const COLUMN_ROWS: usize = 8;
/// Warps per block of the one-warp-per-row kernels.
const ROW_WARPS: usize = 4;
/// Threads per block of the attention kernels (kernels/attention.cu: 8 warps).
const ATTENTION_THREADS: u32 = 256;
/// Elements per block of the multi-tensor kernels (optimizer, global norm).
const MULTI_CHUNK: usize = 8192;

pub struct CudaBackend {
    gpu: Arc<dyn Gpu>,
    device: Device,
    /// Small read-only inputs (sample indices, labels, optimizer tables) by content,
    /// newest first: every dropout site of a step shares one upload of the sample
    /// indices, and every step one copy of the optimizer's table.
    uploads: Mutex<Vec<(Vec<u8>, Tensor)>>,
    /// The column sums' per-column-group counters (kernels/columns.cuh), zero between
    /// launches; grown when a launch needs more.
    counters: Mutex<Option<Tensor>>,
}

/// Inputs up to this size are kept in the upload cache, this many of them.
const CACHED_BYTES: usize = 64 << 10;
const CACHED: usize = 16;

fn int(v: usize, what: &str) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| Error::Config(format!("{what} = {v} is too large for a CUDA kernel")))
}

fn long(v: usize) -> Arg {
    Arg::I64(v as i64)
}

/// The grid of a one-launch column sum of `rows` x `cols` (kernels/columns.cuh) and its
/// rows per chunk: about √rows chunks of about √rows rows, so that a thread adds about as
/// many values of its chunk as the last block's threads add partials; at least 64 rows
/// (8 values a thread, and fewer blocks where rows are few, as the emulated device
/// prefers), so the partials are at most a 64th of the input, or one row.
fn column_grid(rows: usize, cols: usize) -> Result<([u32; 3], Arg)> {
    let chunk = rows
        .isqrt()
        .max(8 * COLUMN_ROWS)
        .next_multiple_of(COLUMN_ROWS);
    let dim = |v: usize, what: &str| {
        u32::try_from(v)
            .map_err(|_| Error::Config(format!("{what} = {v} is too large for a CUDA grid")))
    };
    let grid = [
        dim(cols.div_ceil(32), "column groups")?,
        dim(rows.div_ceil(chunk), "row chunks")?,
        1,
    ];
    Ok((grid, int(chunk, "rows per chunk")?))
}

impl CudaBackend {
    pub(crate) fn new(gpu: Arc<dyn Gpu>, device: Device) -> Self {
        CudaBackend {
            gpu,
            device,
            uploads: Mutex::new(Vec::new()),
            counters: Mutex::new(None),
        }
    }

    pub fn gpu(&self) -> &dyn Gpu {
        &*self.gpu
    }

    /// The address of an f32 tensor on this device (the kernels' element type).
    fn ptr(&self, t: &Tensor) -> Result<Arg> {
        self.on_device(t, &[DType::F32])?;
        Ok(Arg::Ptr(t.cuda_ptr()?))
    }

    fn ptr_mut(&self, t: &mut Tensor) -> Result<Arg> {
        self.on_device(t, &[DType::F32])?;
        Ok(Arg::Ptr(t.cuda_ptr_mut()?))
    }

    /// An activation: f32, or bf16 under mixed precision.
    fn act(&self, t: &Tensor) -> Result<Arg> {
        self.on_device(t, &ACTIVATIONS)?;
        Ok(Arg::Ptr(t.cuda_ptr()?))
    }

    fn act_mut(&self, t: &mut Tensor) -> Result<Arg> {
        self.on_device(t, &ACTIVATIONS)?;
        Ok(Arg::Ptr(t.cuda_ptr_mut()?))
    }

    fn on_device(&self, t: &Tensor, dtypes: &[DType]) -> Result<()> {
        if !dtypes.contains(&t.dtype()) {
            return Err(Error::Device(format!(
                "a {} tensor of shape {} where {} was expected",
                t.dtype(),
                t.shape(),
                dtypes
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        if t.device() != self.device {
            return Err(Error::Device(format!(
                "a tensor of shape {} is on {}, the op runs on {}",
                t.shape(),
                t.device(),
                self.device
            )));
        }
        Ok(())
    }

    fn launch(
        &self,
        kernel: &'static str,
        grid: [u32; 3],
        block: [u32; 3],
        shared: usize,
        args: &[Arg],
    ) -> Result<()> {
        let launch = Launch {
            kernel,
            grid,
            block,
            shared: shared as u32,
        };
        self.gpu.launch(&launch, args)
    }

    /// A grid-stride kernel over `n` elements.
    fn elementwise(&self, kernel: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(THREADS as usize).min(1024) as u32;
        self.launch(kernel, [blocks, 1, 1], [THREADS, 1, 1], 0, args)
    }

    /// A one-warp-per-row kernel over `rows` rows.
    fn per_row(&self, kernel: &'static str, rows: usize, args: &[Arg]) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let blocks = rows.div_ceil(ROW_WARPS) as u32;
        self.launch(
            kernel,
            [blocks, 1, 1],
            [32 * ROW_WARPS as u32, 1, 1],
            0,
            args,
        )
    }

    fn scratch(&self, n: usize) -> Result<Tensor> {
        Tensor::try_uninit([n.max(1)], self.device)
    }

    /// The checked GEMM `c (+)= op(a) · op(b)` (no bias): f32 or bf16 operands (both
    /// the same), an f32 or bf16 result; f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm_of(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ta: bool,
        b: &Tensor,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<Gemm> {
        check_matmul(c, a, b, (m, n, k))?;
        let both = [DType::F32, DType::BF16];
        self.on_device(a, &both)?;
        self.on_device(b, &both)?;
        self.on_device(c, &both)?;
        Ok(Gemm {
            c: c.cuda_ptr_mut()?,
            a: a.cuda_ptr()?,
            ta,
            b: b.cuda_ptr()?,
            tb,
            mnk: (m, n, k),
            accumulate,
            inputs: a.dtype(),
            output: c.dtype(),
            bias: 0,
        })
    }

    /// `out[j] += sum_r x[r * ld + j]` for `j < cols`, deterministically in one launch;
    /// `kernel` is `column_sums_f32` or `_bf16` (x's dtype).
    fn column_sums(
        &self,
        kernel: &'static str,
        x: Arg,
        (rows, cols, ld): (usize, usize, usize),
        out: Arg,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (grid, chunk) = column_grid(rows, cols)?;
        let mut partial = self.scratch(grid[1] as usize * cols)?;
        let p = self.ptr_mut(&mut partial)?;
        self.with_counters(grid[0] as usize, |counters| {
            let (rows, cols) = (int(rows, "rows")?, int(cols, "columns")?);
            let args = [x, p, out, counters, rows, cols, long(ld), chunk];
            self.launch(kernel, grid, [32, COLUMN_ROWS as u32, 1], 0, &args)
        })
    }

    /// Runs `launch` with the address of `groups` zeroed column-group counters
    /// (kernels/columns.cuh; the kernels leave them zero). One buffer serves every
    /// launch, as all are ordered on one stream; the lock keeps it alive meanwhile.
    fn with_counters(&self, groups: usize, launch: impl FnOnce(Arg) -> Result<()>) -> Result<()> {
        let mut counters = self
            .counters
            .lock()
            .map_err(|_| Error::Device("column-sum counters poisoned by a panic".into()))?;
        let buffer = match counters.take() {
            Some(t) if t.numel() >= groups => t,
            _ => Tensor::try_zeros([groups.max(1024)], self.device)?,
        };
        let r = buffer.cuda_ptr().map(Arg::Ptr).and_then(launch);
        *counters = Some(buffer);
        r
    }

    /// `data` in device memory (read-only for kernels): its address and the buffer that
    /// owns it. Small inputs seen recently are not copied again.
    fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<(Arg, Tensor)> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut cache = self
            .uploads
            .lock()
            .map_err(|_| Error::Device("upload cache poisoned by a panic".into()))?;
        if let Some(i) = cache.iter().position(|(c, _)| c == bytes) {
            let hit = cache.remove(i);
            let t = hit.1.clone();
            cache.insert(0, hit);
            return Ok((Arg::Ptr(t.cuda_ptr()?), t));
        }
        let mut t = self.scratch(bytes.len().div_ceil(4))?;
        let p = t.cuda_ptr_mut()?;
        self.gpu.upload(p, bytes)?;
        if bytes.len() <= CACHED_BYTES {
            cache.insert(0, (bytes.to_vec(), t.clone()));
            cache.truncate(CACHED);
        }
        Ok((Arg::Ptr(p), t))
    }

    /// The chunk lists of a multi-tensor kernel: for each block, which tensor (index
    /// into the table) and which element it starts at.
    fn chunks(&self, lens: &[usize]) -> Result<(Arg, Arg, usize, Vec<Tensor>)> {
        let (mut which, mut start) = (Vec::new(), Vec::new());
        for (i, &n) in lens.iter().enumerate() {
            for s in (0..n).step_by(MULTI_CHUNK) {
                which.push(i as i32);
                start.push(s as i64);
            }
        }
        let (w, wb) = self.upload(&which)?;
        let (s, sb) = self.upload(&start)?;
        Ok((w, s, which.len(), vec![wb, sb]))
    }

    /// `out = x` converted to `out`'s dtype (f32 ↔ bf16, round to nearest even).
    pub fn cast(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let n = x.numel();
        same_len("cast", n, out.numel())?;
        let both = [DType::F32, DType::BF16];
        self.on_device(x, &both)?;
        self.on_device(out, &both)?;
        let kernel = match (x.dtype(), out.dtype()) {
            (DType::F32, DType::BF16) => "cast_f32_bf16",
            (DType::BF16, DType::F32) => "cast_bf16_f32",
            _ => {
                let bytes = n * x.dtype().size_in_bytes();
                return self.gpu.copy(out.cuda_ptr_mut()?, x.cuda_ptr()?, bytes);
            }
        };
        let args = [
            Arg::Ptr(x.cuda_ptr()?),
            Arg::Ptr(out.cuda_ptr_mut()?),
            long(n),
        ];
        self.elementwise(kernel, n, &args)
    }

    /// Sets every element of `t` to `value`.
    pub fn fill(&self, t: &mut Tensor, value: f32) -> Result<()> {
        let n = t.numel();
        let x = self.ptr_mut(t)?;
        self.elementwise("fill_f32", n, &[x, Arg::F32(value), long(n)])
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matmul(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ta: bool,
        b: &Tensor,
        tb: bool,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        self.gpu
            .gemm(&self.gemm_of(c, a, ta, b, tb, mnk, accumulate)?)
    }

    fn matmul_bias(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        check_matmul_bias(bias, (m, n, k))?;
        let fused = Gemm {
            bias: self.ptr(bias)?.bits(),
            ..self.gemm_of(c, a, false, b, true, (m, n, k), false)?
        };
        if self.gpu.fuses_bias(&fused) {
            return self.gpu.gemm(&fused);
        }
        self.fill_rows(c, bias)?;
        self.matmul(c, a, false, b, true, (m, n, k), true)
    }

    fn fill_rows(&self, out: &mut Tensor, bias: &Tensor) -> Result<()> {
        let (n, (_, d)) = (out.numel(), check_rows("fill_rows", out, bias)?);
        let kernel = variant("fill_rows", ["fill_rows_f32", "fill_rows_bf16"], &[out])?;
        let args = [
            self.act_mut(out)?,
            self.ptr(bias)?,
            long(n),
            int(d, "width")?,
        ];
        self.elementwise(kernel, n, &args)
    }

    fn bias_grad(&self, dy: &Tensor, db: &mut Tensor) -> Result<()> {
        let (rows, d) = check_rows("bias_grad", dy, db)?;
        let out = self.ptr_mut(db)?;
        let kernel = variant("bias_grad", ["column_sums_f32", "column_sums_bf16"], &[dy])?;
        self.column_sums(kernel, self.act(dy)?, (rows, d, d), out)
    }

    fn bias_gelu(&self, pre: &mut Tensor, bias: &Tensor, out: &mut Tensor) -> Result<()> {
        let n = check_same("bias_gelu", pre, &[out])?;
        let (_, d) = check_rows("bias_gelu", pre, bias)?;
        let kernel = variant(
            "bias_gelu",
            ["bias_gelu_f32", "bias_gelu_bf16"],
            &[pre, out],
        )?;
        let args = [
            self.act_mut(pre)?,
            self.ptr(bias)?,
            self.act_mut(out)?,
            long(n),
            int(d, "width")?,
        ];
        self.elementwise(kernel, n, &args)
    }

    fn gelu_backward(&self, dy: &Tensor, pre: &Tensor, dpre: &mut Tensor) -> Result<()> {
        let n = check_same("gelu_backward", dy, &[pre, dpre])?;
        let kernel = variant(
            "gelu_backward",
            ["gelu_backward_f32", "gelu_backward_bf16"],
            &[dy, pre, dpre],
        )?;
        let args = [self.act(dy)?, self.act(pre)?, self.act_mut(dpre)?, long(n)];
        self.elementwise(kernel, n, &args)
    }

    fn layernorm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()> {
        let d = gamma.numel();
        let rows = check_layernorm(x, (gamma, beta), y, (mean, rstd))?;
        let kernel = variant(
            "layernorm",
            ["layernorm_forward_f32", "layernorm_forward_bf16"],
            &[y],
        )?;
        let args = [
            self.ptr(x)?,
            self.ptr(gamma)?,
            self.ptr(beta)?,
            self.act_mut(y)?,
            self.ptr_mut(mean)?,
            self.ptr_mut(rstd)?,
            int(rows, "rows")?,
            int(d, "width")?,
            Arg::F32(eps),
        ];
        self.per_row(kernel, rows, &args)
    }

    fn layernorm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Result<()> {
        let d = gamma.numel();
        let rows = check_layernorm_backward((dy, x, gamma), (mean, rstd), (dx, dgamma, dbeta))?;
        if rows == 0 {
            return Ok(());
        }
        let [dx_kernel, param_kernel] = match dy.dtype() {
            DType::BF16 => ["layernorm_backward_dx_bf16", "layernorm_param_grad_bf16"],
            _ => ["layernorm_backward_dx_f32", "layernorm_param_grad_f32"],
        };
        let (dy, x, g, mu, rs) = (
            self.act(dy)?,
            self.ptr(x)?,
            self.ptr(gamma)?,
            self.ptr(mean)?,
            self.ptr(rstd)?,
        );
        let (rows_a, d_a) = (int(rows, "rows")?, int(d, "width")?);
        self.per_row(
            dx_kernel,
            rows,
            &[dy, x, g, mu, rs, self.ptr_mut(dx)?, rows_a, d_a],
        )?;
        let (grid, chunk) = column_grid(rows, d)?;
        let mut partial = self.scratch(2 * grid[1] as usize * d)?;
        let p = self.ptr_mut(&mut partial)?;
        let (dg, db) = (self.ptr_mut(dgamma)?, self.ptr_mut(dbeta)?);
        self.with_counters(grid[0] as usize, |counters| {
            let args = [dy, x, mu, rs, p, dg, db, counters, rows_a, d_a, chunk];
            self.launch(param_kernel, grid, [32, COLUMN_ROWS as u32, 1], 0, &args)
        })
    }

    fn patchify(&self, images: &Tensor, patch: usize, out: &mut Tensor) -> Result<()> {
        let (b, c, h, w) = check_patchify(images, patch, out)?;
        let kernel = variant(
            "patchify",
            ["patchify_f32", "patchify_bf16"],
            &[images, out],
        )?;
        let args = [
            self.act(images)?,
            self.act_mut(out)?,
            int(b, "batch")?,
            int(c, "channels")?,
            int(h, "height")?,
            int(w, "width")?,
            int(patch, "patch")?,
        ];
        self.elementwise(kernel, images.numel(), &args)
    }

    fn embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, out: &mut Tensor) -> Result<()> {
        let d = cls.numel();
        let (b, t) = check_embed(patches.numel(), d, pos.numel(), out.numel())?;
        let args = [
            self.ptr(patches)?,
            self.ptr(cls)?,
            self.ptr(pos)?,
            self.ptr_mut(out)?,
            int(b, "batch")?,
            int(t, "tokens")?,
            int(d, "dim")?,
        ];
        self.elementwise("embed_f32", b * t * d, &args)
    }

    fn embed_backward(
        &self,
        dout: &Tensor,
        dpatches: &mut Tensor,
        dcls: &mut Tensor,
        dpos: &mut Tensor,
    ) -> Result<()> {
        let d = dcls.numel();
        let (b, t) = check_embed_backward(dout.numel(), d, dpos.numel(), dpatches.numel())?;
        let g = self.ptr(dout)?;
        let args = [
            g,
            self.ptr_mut(dpatches)?,
            int(b, "batch")?,
            int(t, "tokens")?,
            int(d, "dim")?,
        ];
        self.elementwise("embed_backward_patches_f32", b * (t - 1) * d, &args)?;
        self.column_sums("column_sums_f32", g, (b, t * d, t * d), self.ptr_mut(dpos)?)?;
        self.column_sums("column_sums_f32", g, (b, d, t * d), self.ptr_mut(dcls)?)
    }

    fn attention_saved_len(&self, d: AttnDims) -> usize {
        d.batch * d.heads * d.queries
    }

    fn attention(
        &self,
        qkv: &Tensor,
        dims: AttnDims,
        lse: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        check_attn(dims, self.attention_saved_len(dims), qkv, lse, out)?;
        let kernel = variant(
            "attention",
            ["attention_forward_f32", "attention_forward_bf16"],
            &[qkv, out],
        )?;
        let (kernel, shared) = if attention_on_tensor_cores(qkv, dims) {
            (
                "attention_forward_tc_bf16",
                attention_tc_shared_bytes(dims, false),
            )
        } else {
            (kernel, attention_shared_bytes(dims, false))
        };
        let args = [self.act(qkv)?, self.act_mut(out)?, self.ptr_mut(lse)?];
        self.launch(
            kernel,
            [(dims.batch * dims.heads) as u32, 1, 1],
            [ATTENTION_THREADS, 1, 1],
            shared,
            &[&args[..], &attn_args(dims)?].concat(),
        )
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        lse: &Tensor,
        dims: AttnDims,
        dqkv: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_attn(dims, self.attention_saved_len(dims), qkv, lse, dout)?;
        check_attn_backward(dims, qkv, dqkv, accumulate)?;
        let tensor_cores = attention_on_tensor_cores(qkv, dims);
        let bf16_form = match (accumulate, tensor_cores) {
            (true, false) => "attention_backward_bf16",
            (false, false) => "attention_backward_write_bf16",
            (true, true) => "attention_backward_tc_bf16",
            (false, true) => "attention_backward_write_tc_bf16",
        };
        let forms = match accumulate {
            true => ["attention_backward_f32", bf16_form],
            false => ["attention_backward_write_f32", bf16_form],
        };
        let shared = match tensor_cores {
            true => attention_tc_shared_bytes(dims, true),
            false => attention_shared_bytes(dims, true),
        };
        // dout as qkv; dqkv f32 when accumulated into, as qkv when written
        let kernel = variant("attention_backward", forms, &[qkv, dout])?;
        if accumulate {
            self.on_device(dqkv, &[DType::F32])?;
        } else {
            variant("attention_backward", forms, &[qkv, dqkv])?;
        }
        let args = [
            self.act(dout)?,
            self.act(qkv)?,
            self.ptr(lse)?,
            self.act_mut(dqkv)?,
        ];
        self.launch(
            kernel,
            [(dims.batch * dims.heads) as u32, 1, 1],
            [ATTENTION_THREADS, 1, 1],
            shared,
            &[&args[..], &attn_args(dims)?].concat(),
        )
    }

    fn add(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        let n = check_same("add", a, &[b, out])?;
        // b may be a bf16 branch (mixed precision), a and out are the f32 residual stream
        let args = [self.ptr(a)?, self.act(b)?, self.ptr_mut(out)?, long(n)];
        let kernel = variant("add", ["add_f32", "add_f32_bf16"], &[b])?;
        self.elementwise(kernel, n, &args)
    }

    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        let n = check_same("add_assign", dst, &[src])?;
        let args = [self.ptr_mut(dst)?, self.ptr(src)?, long(n)];
        self.elementwise("add_assign_f32", n, &args)
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        let n = x.numel();
        let args = [self.ptr_mut(x)?, Arg::F32(s), long(n)];
        self.elementwise("scale_f32", n, &args)
    }

    fn sum_squares(&self, x: &Tensor) -> Result<f64> {
        let n = x.numel();
        if n == 0 {
            return Ok(0.0);
        }
        let blocks = n.div_ceil(THREADS as usize).min(1024);
        // f64 partials: two f32 slots each
        let mut partial = self.scratch(2 * blocks)?;
        let p = self.ptr_mut(&mut partial)?;
        self.launch(
            "sum_squares_f32",
            [blocks as u32, 1, 1],
            [THREADS, 1, 1],
            0,
            &[self.ptr(x)?, long(n), p],
        )?;
        let mut host = vec![0.0f64; blocks];
        self.gpu
            .download(addr(p), bytemuck::cast_slice_mut(&mut host))?;
        Ok(host.iter().sum())
    }

    fn dropout(
        &self,
        x: &Tensor,
        p: f32,
        key: DropoutKey,
        samples: &[u64],
        mode: DropoutMode,
        out: &mut Tensor,
    ) -> Result<()> {
        let n = x.numel();
        let residual = match mode {
            DropoutMode::AddTo(r) => Some(r),
            _ => None,
        };
        check_dropout(x, p, samples, residual, out)?;
        let (samples_dev, _keep) = self.upload(samples)?;
        let (residual, mode) = match mode {
            DropoutMode::Write => (Arg::Ptr(0), 0),
            DropoutMode::Accumulate => (Arg::Ptr(0), 1),
            DropoutMode::AddTo(r) => (self.ptr(r)?, 2),
        };
        let threshold = (p as f64 * 65536.0).round() as u32;
        // f32 or bf16 each: the MLP's bf16 activations; a bf16 branch added to the f32
        // residual stream, and its gradient written back in bf16
        self.on_device(x, &ACTIVATIONS)?;
        self.on_device(out, &ACTIVATIONS)?;
        let kernel = match (x.dtype(), out.dtype()) {
            (DType::BF16, DType::BF16) => "dropout_bf16",
            (DType::BF16, _) => "dropout_bf16_f32",
            (_, DType::BF16) => "dropout_f32_bf16",
            _ => "dropout_f32",
        };
        let args = [
            self.act(x)?,
            residual,
            self.act_mut(out)?,
            samples_dev,
            Arg::U64(site_key(key)),
            long(n / samples.len()),
            long(n),
            Arg::U32(threshold),
            Arg::F32(1.0 / (1.0 - p)),
            Arg::I32(mode),
            Arg::I32(key.per_sample.into()),
        ];
        self.elementwise(kernel, n, &args)
    }

    fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &[usize],
        eps: f32,
        dlogits: &mut Tensor,
    ) -> Result<f32> {
        let (b, classes) = check_cross_entropy(logits, labels, dlogits)?;
        let ys: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
        let (labels, _keep) = self.upload(&ys)?;
        let mut rows = self.scratch(b)?;
        let r = self.ptr_mut(&mut rows)?;
        let args = [
            self.ptr(logits)?,
            labels,
            self.ptr_mut(dlogits)?,
            r,
            int(b, "batch")?,
            int(classes, "classes")?,
            Arg::F32(eps),
        ];
        self.per_row("cross_entropy_f32", b, &args)?;
        let per_row = rows.to_device(Device::Cpu)?;
        Ok((per_row.f32s()?.iter().map(|&v| v as f64).sum::<f64>() / b as f64) as f32)
    }

    fn cross_entropy_soft(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<f32> {
        let (b, classes) = check_cross_entropy_soft(logits, targets, dlogits)?;
        let mut rows = self.scratch(b)?;
        let r = self.ptr_mut(&mut rows)?;
        let args = [
            self.ptr(logits)?,
            self.ptr(targets)?,
            self.ptr_mut(dlogits)?,
            r,
            int(b, "batch")?,
            int(classes, "classes")?,
        ];
        self.per_row("cross_entropy_soft_f32", b, &args)?;
        let per_row = rows.to_device(Device::Cpu)?;
        Ok((per_row.f32s()?.iter().map(|&v| v as f64).sum::<f64>() / b as f64) as f32)
    }

    fn select_rows(&self, x: &Tensor, stride_rows: usize, out: &mut Tensor) -> Result<()> {
        let (n, d) = check_select_rows("select_rows", out, stride_rows, x)?;
        let args = [
            self.ptr(x)?,
            self.ptr_mut(out)?,
            long(n),
            int(d, "width")?,
            int(stride_rows, "stride")?,
        ];
        self.elementwise("select_rows_f32", n, &args)
    }

    fn select_rows_backward(
        &self,
        dout: &Tensor,
        stride_rows: usize,
        dx: &mut Tensor,
    ) -> Result<()> {
        let (n, d) = check_select_rows("select_rows_backward", dout, stride_rows, dx)?;
        let args = [
            self.ptr(dout)?,
            self.ptr_mut(dx)?,
            long(n),
            int(d, "width")?,
            int(stride_rows, "stride")?,
        ];
        self.elementwise("select_rows_backward_f32", n, &args)
    }

    fn adam(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        s: AdamStep,
    ) -> Result<()> {
        let n = check_same("adam", p, &[g, m, v])?;
        let args = [
            self.ptr_mut(p)?,
            self.ptr(g)?,
            self.ptr_mut(m)?,
            self.ptr_mut(v)?,
            long(n),
            Arg::F32(s.lr),
            Arg::F32(s.beta1),
            Arg::F32(s.beta2),
            Arg::F32(s.eps),
            Arg::F32(s.weight_decay),
            Arg::I32(s.decoupled as i32),
            Arg::F32(s.step_size),
            Arg::F32(s.bias_correction2_sqrt),
        ];
        self.elementwise("adam_f32", n, &args)
    }

    fn sgd(&self, p: &mut Tensor, g: &Tensor, buf: &mut Tensor, s: SgdStep) -> Result<()> {
        let n = check_same("sgd", p, &[g])?;
        let b = if s.momentum != 0.0 {
            check_same("sgd", p, &[buf])?;
            self.ptr_mut(buf)?
        } else {
            Arg::Ptr(0)
        };
        let args = [
            self.ptr_mut(p)?,
            self.ptr(g)?,
            b,
            long(n),
            Arg::F32(s.lr),
            Arg::F32(s.momentum),
            Arg::F32(s.dampening),
            Arg::F32(s.weight_decay),
            Arg::I32(s.nesterov as i32),
            Arg::I32(s.first as i32),
        ];
        self.elementwise("sgd_f32", n, &args)
    }

    fn optimizer_step(&self, tensors: &mut [OptimTensors], update: Update) -> Result<()> {
        let mut table: Vec<u64> = Vec::new();
        let mut lens = Vec::new();
        for t in tensors.iter_mut() {
            let n = t.p.numel();
            same_len("optimizer_step", n, t.g.numel())?;
            let (p, g) = (addr(self.ptr_mut(t.p)?), addr(self.ptr(t.g)?));
            let mut state = Vec::new();
            for s in t.state.iter_mut() {
                same_len("optimizer_step", n, s.numel())?;
                state.push(addr(self.ptr_mut(s)?));
            }
            let wd = match update {
                Update::Adam(s) => s.weight_decay,
                Update::Sgd(s) => s.weight_decay,
            };
            match (update, &state[..]) {
                (Update::Adam(_), &[m, v]) => table.extend([p, g, m, v]),
                (Update::Sgd(_), &[buf]) => table.extend([p, g, buf]),
                (Update::Sgd(_), []) => table.extend([p, g, 0]),
                _ => {
                    return Err(Error::Config(
                        "optimizer state does not fit the update".into(),
                    ))
                }
            }
            table.extend([n as u64, wd.to_bits() as u64]);
            lens.push(n);
        }
        let (tab, _t) = self.upload(&table)?;
        let (which, start, blocks, _c) = self.chunks(&lens)?;
        if blocks == 0 {
            return Ok(());
        }
        let head = [tab, which, start, int(MULTI_CHUNK, "chunk")?];
        let (kernel, tail) = match update {
            Update::Adam(s) => (
                "adam_multi_f32",
                vec![
                    Arg::F32(s.lr),
                    Arg::F32(s.beta1),
                    Arg::F32(s.beta2),
                    Arg::F32(s.eps),
                    Arg::I32(s.decoupled as i32),
                    Arg::F32(s.step_size),
                    Arg::F32(s.bias_correction2_sqrt),
                ],
            ),
            Update::Sgd(s) => (
                "sgd_multi_f32",
                vec![
                    Arg::F32(s.lr),
                    Arg::F32(s.momentum),
                    Arg::F32(s.dampening),
                    Arg::I32(s.nesterov as i32),
                    Arg::I32(s.first as i32),
                ],
            ),
        };
        self.launch(
            kernel,
            [blocks as u32, 1, 1],
            [THREADS, 1, 1],
            0,
            &[&head[..], &tail].concat(),
        )
    }

    fn augment(&self, batch: &AugmentBatch, dtype: DType) -> Result<Tensor> {
        let n = check_augment(batch)?;
        let geometry: Vec<i32> = batch
            .geometry
            .iter()
            .flat_map(|g| [g.dy, g.dx, g.flip as i32])
            .collect();
        let (pixels, _p) = self.upload(batch.pixels)?;
        let (geometry, _g) = self.upload(&geometry)?;
        // without mixing the kernel never reads the partners (null)
        let (partner, _q) = match &batch.mix {
            Some(m) => {
                let partner: Vec<i32> = m.partner.iter().map(|&p| p as i32).collect();
                let (arg, guard) = self.upload(&partner)?;
                (arg, Some(guard))
            }
            None => (Arg::Ptr(0), None),
        };
        let side = batch.side;
        let mut out = Tensor::try_uninit_as([batch.outputs(), 3, side, side], dtype, self.device)?;
        let kernel = variant("augment", ["augment_u8_f32", "augment_u8_bf16"], &[&out])?;
        let (m, s) = (batch.norm.mean, batch.norm.std);
        let (mode, (lam, rest), [y0, y1, x0, x1]) = match batch.mix.map(|m| m.mix) {
            None => (0, (1.0, 0.0), [0; 4]),
            Some(mix) => match mix.cutmix {
                None => (1, mix.factors(), [0; 4]),
                Some(b) => (2, mix.factors(), [b.y0, b.y1, b.x0, b.x1]),
            },
        };
        // sides and box bounds are at most MAX_AUGMENT_SIDE (check_augment)
        let small = |v: usize| Arg::I32(v as i32);
        let args = [
            pixels,
            geometry,
            partner,
            self.act_mut(&mut out)?,
            long(n),
            small(side),
            Arg::F32(m[0]),
            Arg::F32(m[1]),
            Arg::F32(m[2]),
            Arg::F32(s[0]),
            Arg::F32(s[1]),
            Arg::F32(s[2]),
            Arg::I32(mode),
            Arg::F32(lam),
            Arg::F32(rest),
            small(y0),
            small(y1),
            small(x0),
            small(x1),
        ];
        self.elementwise(kernel, n, &args)?;
        Ok(out)
    }

    fn gemm_operands(&self, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(ts.len());
        let (mut table, mut lens) = (Vec::new(), Vec::new());
        for t in ts {
            if t.dtype() != DType::F32 {
                out.push(self.gemm_operand(t)?);
                continue;
            }
            let mut half = Tensor::try_uninit_as(t.shape().clone(), DType::BF16, self.device)?;
            let dst = addr(self.act_mut(&mut half)?);
            table.extend([addr(self.ptr(t)?), dst, t.numel() as u64]);
            lens.push(t.numel());
            out.push(half);
        }
        if lens.iter().sum::<usize>() == 0 {
            return Ok(out);
        }
        let (tab, _t) = self.upload(&table)?;
        let (which, start, blocks, _c) = self.chunks(&lens)?;
        let args = [tab, which, start, int(MULTI_CHUNK, "chunk")?];
        let grid = [blocks as u32, 1, 1];
        self.launch("cast_multi_f32_bf16", grid, [THREADS, 1, 1], 0, &args)?;
        Ok(out)
    }

    fn fill_all(&self, ts: &mut [&mut Tensor], value: f32) -> Result<()> {
        let mut table = Vec::with_capacity(2 * ts.len());
        for t in ts.iter_mut() {
            table.extend([addr(self.ptr_mut(t)?), t.numel() as u64]);
        }
        let lens: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let (tab, _t) = self.upload(&table)?;
        let (which, start, blocks, _c) = self.chunks(&lens)?;
        if blocks == 0 {
            return Ok(());
        }
        let args = [
            tab,
            which,
            start,
            int(MULTI_CHUNK, "chunk")?,
            Arg::F32(value),
        ];
        self.launch(
            "fill_multi_f32",
            [blocks as u32, 1, 1],
            [THREADS, 1, 1],
            0,
            &args,
        )
    }

    fn sum_squares_all(&self, xs: &[&Tensor]) -> Result<f64> {
        let mut table = Vec::new();
        for x in xs {
            table.extend([addr(self.ptr(x)?), x.numel() as u64]);
        }
        let lens: Vec<usize> = xs.iter().map(|x| x.numel()).collect();
        let (tab, _t) = self.upload(&table)?;
        let (which, start, blocks, _c) = self.chunks(&lens)?;
        if blocks == 0 {
            return Ok(0.0);
        }
        let mut partial = self.scratch(2 * blocks)?;
        let p = self.ptr_mut(&mut partial)?;
        let args = [tab, which, start, int(MULTI_CHUNK, "chunk")?, p];
        self.launch(
            "sum_squares_multi_f32",
            [blocks as u32, 1, 1],
            [THREADS, 1, 1],
            0,
            &args,
        )?;
        let mut host = vec![0.0f64; blocks];
        self.gpu
            .download(addr(p), bytemuck::cast_slice_mut(&mut host))?;
        Ok(host.iter().sum())
    }

    fn argmax_rows(&self, logits: &Tensor) -> Result<Vec<usize>> {
        let (b, c) = check_logits(logits)?;

        let mut out = self.scratch(b)?;
        let o = self.ptr_mut(&mut out)?;
        self.per_row(
            "argmax_rows_f32",
            b,
            &[self.ptr(logits)?, o, int(b, "batch")?, int(c, "classes")?],
        )?;
        let mut host = vec![0i32; b];
        self.gpu
            .download(addr(o), bytemuck::cast_slice_mut(&mut host))?;
        Ok(host.into_iter().map(|i| i as usize).collect())
    }
}

fn addr(a: Arg) -> u64 {
    match a {
        Arg::Ptr(p) => p,
        _ => unreachable!("ptr gives pointers"),
    }
}

fn attn_args(d: AttnDims) -> Result<[Arg; 6]> {
    Ok([
        int(d.batch, "batch")?,
        int(d.tokens, "tokens")?,
        int(d.queries, "queries")?,
        int(d.dim, "dim")?,
        int(d.heads, "heads")?,
        Arg::F32(1.0 / ((d.dim / d.heads) as f32).sqrt()),
    ])
}
