//! cuBLASLt for the GEMMs of linear layers with a bias: `C = op(A) op(B) + bias` in one
//! pass (the bias epilogue adds the f32 bias to the f32 accumulator before C is rounded
//! to its type), instead of filling C with the bias and accumulating onto it (a write
//! and a read of every output element less).
//!
//! One plan per GEMM shape and dtypes — descriptors, layouts and the heuristic's
//! algorithm — made at its first use and kept. A shape cuBLASLt cannot do with a bias
//! has no plan, and the backend then fills and accumulates as before.

use super::Gemm;
use crate::tensor::DType;
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Workspace cuBLASLt may use (NVIDIA's recommendation for Hopper).
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

type Key = ((usize, usize, usize), bool, bool, DType, DType);

fn key(g: &Gemm) -> Key {
    (g.mnk, g.ta, g.tb, g.inputs, g.output)
}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

/// Descriptors of one GEMM (destroyed on drop) and the algorithm chosen for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle is live or null, and destroyed once.
        unsafe {
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
        }
    }
}

/// Sets descriptor attribute `attr` to `value`.
///
/// # Safety
/// `desc` is live and `T` is the attribute's type.
unsafe fn set<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), lt::CublasError> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
}

impl Plan {
    /// The row-major `g` as cuBLASLt's column-major `Cᵀ = op(B)ᵀ op(A)ᵀ` (as the GemmEx
    /// call does), with the bias epilogue: the bias runs along Cᵀ's rows, i.e. C's columns.
    fn new(handle: sys::cublasLtHandle_t, g: &Gemm) -> Result<Plan, lt::CublasError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let (m, n, k) = g.mnk;
        let mut plan = Plan {
            desc: lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )?,
            layouts: [std::ptr::null_mut(); 3],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
        let op = |t: bool| t as i32;
        // SAFETY: the descriptor is live; each attribute gets a value of its type
        // (cublasOperation_t and the enums are 32-bit).
        unsafe {
            set(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.tb))?;
            set(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.ta))?;
            set(
                plan.desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            set(
                plan.desc,
                A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &sys::cudaDataType::CUDA_R_32F,
            )?;
        }
        let input = data_type(g.inputs);
        let (a, b) = (
            if g.tb { (k, n, k) } else { (n, k, n) },
            if g.ta { (m, k, m) } else { (k, m, k) },
        );
        for (slot, (ty, (rows, cols, ld))) in
            plan.layouts
                .iter_mut()
                .zip([(input, a), (input, b), (data_type(g.output), (n, m, n))])
        {
            *slot = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)?;
        }
        let pref = lt::create_matmul_pref()?;
        let [la, lb, lc] = plan.layouts;
        // SAFETY: every handle is live; the workspace limit is a u64.
        let found = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(WORKSPACE_BYTES as u64) as *const u64 as *const c_void,
                8,
            )
            .and_then(|_| lt::get_matmul_algo_heuristic(handle, plan.desc, la, lb, lc, lc, pref))
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        plan.algo = found?.algo;
        Ok(plan)
    }
}

/// A cuBLASLt handle, its workspace and the plans made so far.
pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    /// `None`: cuBLASLt cannot do this GEMM with a bias.
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

impl Lt {
    /// A handle using `workspace` (`WORKSPACE_BYTES` of device memory); `None` when the
    /// library is missing or refuses.
    pub(super) fn new(workspace: u64) -> Option<Lt> {
        // SAFETY: only tries to load the shared library.
        if !unsafe { sys::is_culib_present() } {
            return None;
        }
        Some(Lt {
            handle: lt::create_handle().ok()?,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `g` (with its bias) can run here; plans it the first time.
    pub(super) fn supports(&self, g: &Gemm) -> bool {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans
            .entry(key(g))
            .or_insert_with(|| Plan::new(self.handle, g).ok())
            .is_some()
    }

    /// Enqueues `g` (bias included) on `stream`.
    ///
    /// # Safety
    /// The operands and the bias are live device buffers of the sizes `g` describes, on
    /// the context bound to this thread, and `stream` belongs to it.
    pub(super) unsafe fn matmul(
        &self,
        g: &Gemm,
        stream: *mut c_void,
    ) -> Result<(), lt::CublasError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans
            .entry(key(g))
            .or_insert_with(|| Plan::new(self.handle, g).ok())
        {
            Some(p) => p,
            None => {
                return Err(lt::CublasError(
                    sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
                ))
            }
        };
        // the descriptor is shared by every GEMM of this shape: its bias is set per call,
        // under the lock, and cuBLASLt reads it while enqueueing
        set(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &g.bias,
        )?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [la, lb, lc] = plan.layouts;
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            g.b as *const c_void,
            la,
            g.a as *const c_void,
            lb,
            g.c as *const c_void,
            lc,
            g.c as *mut c_void,
            lc,
            &plan.algo,
            self.workspace as *mut c_void,
            WORKSPACE_BYTES,
            stream as _,
        )
    }
}
