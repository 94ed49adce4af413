//! One backend conformance suite, run against the emulated CUDA device (always) and a
//! real GPU (when there is one; FERROVIT_REQUIRE_GPU=1 makes its absence a failure, as
//! scripts/gpu-check.sh does). Every op runs on the same random inputs on the CPU
//! backend (the reference) and on the device; afterwards every tensor — inputs
//! included — must match. Outputs that an op overwrites start as NaN on both sides
//! (an element a kernel forgets stays NaN), outputs it accumulates into start random
//! (a kernel that overwrites instead of adding differs). Sizes are deliberately not
//! multiples of warp or block sizes.
//!
//! Every check is a named case (`matmul`, `layernorm_forward`, …).
//! `FERROVIT_CONFORMANCE=name,name…` runs only the cases whose names contain one of the
//! words (inputs are drawn as in a full run, so a case sees the same data either way);
//! a filter that matches no case fails. Every failure is reported at the end, together.

use ferrovit::backend::{
    for_device, AdamStep, AttnDims, Backend, DropoutKey, DropoutMode, OptimTensors, SgdStep, Update,
};
use ferrovit::data::mixup::{Mix, MixBox};
use ferrovit::data::{Geometry, Normalize, RawImages, RawMix};
use ferrovit::rng::Rng;
use ferrovit::{DType, Device, Result, Tensor};
use std::cell::{Cell, RefCell};

type Op<'a> = &'a dyn Fn(&dyn Backend, &mut [Tensor]) -> Result<f64>;

struct Suite {
    device: Device,
    rng: RefCell<Rng>,
    checked: Cell<usize>,
    /// `FERROVIT_CONFORMANCE`'s words (empty: every case) and the cases they skipped.
    only: Vec<String>,
    skipped: Cell<usize>,
    /// Every mismatch, reported together at the end (one GPU run shows them all).
    failed: RefCell<Vec<String>>,
}

impl Suite {
    fn new(device: Device) -> Suite {
        Suite {
            device,
            rng: RefCell::new(Rng::new(7)),
            checked: Cell::new(0),
            only: std::env::var("FERROVIT_CONFORMANCE")
                .unwrap_or_default()
                .split(',')
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect(),
            skipped: Cell::new(0),
            failed: RefCell::new(Vec::new()),
        }
    }

    fn rand(&self, dims: &[usize]) -> Tensor {
        self.uniform(dims, -2.0, 2.0)
    }

    fn uniform(&self, dims: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(self.rng.borrow_mut().vec(n, |r| r.uniform(lo, hi)), dims).unwrap()
    }

    fn nan(&self, dims: &[usize]) -> Tensor {
        Tensor::full(dims, f32::NAN, Device::Cpu)
    }

    /// Runs `op` on the CPU and on the device over copies of `tensors`, then compares
    /// the scalar it returns and every tensor.
    /// Whether case `name` runs under `FERROVIT_CONFORMANCE` (counting it if not).
    fn wants(&self, name: &str) -> bool {
        let run = self.only.is_empty() || self.only.iter().any(|w| name.contains(w.as_str()));
        if !run {
            self.skipped.set(self.skipped.get() + 1);
        }
        run
    }

    fn check(&self, name: &str, tol: f32, tensors: Vec<Tensor>, op: Op) {
        if !self.wants(name) {
            return;
        }
        let run = std::panic::AssertUnwindSafe(|| self.compare(name, tol, tensors, op));
        match std::panic::catch_unwind(run) {
            Ok(()) => self.checked.set(self.checked.get() + 1),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failed.borrow_mut().push(format!("{name}: {msg}"));
            }
        }
    }

    fn compare(&self, name: &str, tol: f32, tensors: Vec<Tensor>, op: Op) {
        let mut cpu = tensors.clone();
        let mut dev: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.to_device(self.device).unwrap())
            .collect();
        let want =
            op(for_device(Device::Cpu), &mut cpu).unwrap_or_else(|e| panic!("{name} on cpu: {e}"));
        let got = op(for_device(self.device), &mut dev)
            .unwrap_or_else(|e| panic!("{name} on {}: {e}", self.device));
        assert!(
            (want - got).abs() <= tol as f64 * (1.0 + want.abs()),
            "{name}: returned {got}, the CPU {want}"
        );
        for (i, (c, d)) in cpu.iter().zip(&dev).enumerate() {
            let (c, d) = (
                c.to_vec_f32(),
                d.to_device(Device::Cpu).unwrap().to_vec_f32(),
            );
            for (k, (a, b)) in c.iter().zip(&d).enumerate() {
                let ok = (a - b).abs() <= tol * (1.0 + a.abs()) || (a.is_nan() && b.is_nan());
                assert!(
                    ok,
                    "{name} on {}: tensor {i} element {k}: {b}, the CPU {a}",
                    self.device
                );
            }
        }
    }

    fn casts_round_as_the_host_does(&self, v: &Tensor) {
        let host16 = v.to_dtype(DType::BF16).to_le_bytes();
        let dev16 = v.to_device(self.device).unwrap().to_dtype(DType::BF16);
        assert_eq!(dev16.dtype(), DType::BF16);
        assert_eq!(
            dev16.to_device(Device::Cpu).unwrap().to_le_bytes(),
            host16,
            "f32 -> bf16 on {}",
            self.device
        );
        let back = dev16.to_dtype(DType::F32).to_device(Device::Cpu).unwrap();
        assert_eq!(back.to_vec_f32(), v.to_dtype(DType::BF16).to_vec_f32());
        let err = for_device(self.device)
            .add_assign(&mut dev16.clone(), &dev16)
            .unwrap_err();
        assert!(err.to_string().contains("BF16 tensor"), "{err}");
        // mixed precision's copies of the weights, many tensors at once (one launch on a
        // GPU): one over a chunk (8192 elements), one already bf16, an empty one
        let ts = [
            v.clone(),
            self.rand(&[3, 5000]),
            v.to_dtype(DType::BF16),
            Tensor::zeros([0], Device::Cpu),
            self.rand(&[7]),
        ];
        let dev: Vec<Tensor> = ts
            .iter()
            .map(|t| t.to_device(self.device).unwrap())
            .collect();
        let halves = for_device(self.device)
            .gemm_operands(&dev.iter().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(halves.len(), ts.len());
        for (i, (t, h)) in ts.iter().zip(&halves).enumerate() {
            assert_eq!(h.dtype(), DType::BF16, "gemm_operands {i}");
            assert_eq!(
                h.to_device(Device::Cpu).unwrap().to_vec_f32(),
                t.to_dtype(DType::BF16).to_vec_f32(),
                "gemm_operands {i} on {}",
                self.device
            );
        }
        self.checked.set(self.checked.get() + 1);
    }

    fn run(&self) {
        let (n, d) = (37, 45); // rows and width, neither a multiple of 32
        let x = self.rand(&[n, d]);

        for (ta, tb, acc) in [
            (false, true, false),
            (false, false, true),
            (true, false, true),
        ] {
            let (m, nn, k) = (13, 29, 22);
            let a = if ta {
                self.rand(&[k, m])
            } else {
                self.rand(&[m, k])
            };
            let b = if tb {
                self.rand(&[nn, k])
            } else {
                self.rand(&[k, nn])
            };
            let c = if acc {
                self.rand(&[m, nn])
            } else {
                self.nan(&[m, nn])
            };
            self.check("matmul", 1e-5, vec![c, a, b], &|be, t| {
                let [c, a, b] = t else { unreachable!() };
                be.matmul(c, a, ta, b, tb, (m, nn, k), acc).map(|_| 0.0)
            });
        }
        // bf16 operands (f32 accumulation), f32 or bf16 results; the CPU computes on the
        // same bf16-rounded inputs in f32, so only the output rounding differs
        for out in [DType::F32, DType::BF16] {
            let (m, nn, k) = (17, 33, 40);
            let a = self
                .rand(&[m, k])
                .to_dtype(DType::BF16)
                .to_dtype(DType::F32);
            let b = self
                .rand(&[nn, k])
                .to_dtype(DType::BF16)
                .to_dtype(DType::F32);
            let c = self.rand(&[m, nn]).to_dtype(out).to_dtype(DType::F32);
            let device = self.device;
            let tol = if out == DType::BF16 { 8e-3 } else { 1e-5 };
            self.check("matmul bf16", tol, vec![c, a, b], &|be, t| {
                let [c, a, b] = t else { unreachable!() };
                if c.device() == Device::Cpu {
                    return be
                        .matmul(c, a, false, b, true, (m, nn, k), true)
                        .map(|_| 0.0);
                }
                let (a16, b16) = (a.try_to_dtype(DType::BF16)?, b.try_to_dtype(DType::BF16)?);
                let mut c_out = c.try_to_dtype(out)?;
                be.matmul(&mut c_out, &a16, false, &b16, true, (m, nn, k), true)?;
                *c = c_out.try_to_dtype(DType::F32)?;
                assert_eq!(c.device(), device, "casts stay on the device");
                Ok(0.0)
            });
        }
        // a linear layer's GEMM with its bias added before the result is stored (the
        // device's cuBLASLt epilogue; or a fill and an accumulating GEMM), over a
        // NaN-poisoned output: f32, bf16 operands into f32 (a projection under mixed
        // precision) and bf16 into bf16 (qkv), odd sizes
        for (operands, out) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::F32),
            (DType::BF16, DType::BF16),
        ] {
            let (m, nn, k) = (19, 37, 24);
            let tol = if out == DType::BF16 { 8e-3 } else { 1e-5 };
            self.check(
                &format!("matmul_bias {operands}->{out}"),
                tol,
                vec![
                    self.nan(&[m, nn]).to_dtype(out),
                    self.rand(&[m, k]).to_dtype(operands),
                    self.rand(&[nn, k]).to_dtype(operands),
                    self.rand(&[nn]),
                ],
                &|be, t| {
                    let [c, a, b, bias] = t else { unreachable!() };
                    be.matmul_bias(c, a, b, bias, (m, nn, k)).map(|_| 0.0)
                },
            );
        }
        // casts round to nearest even, as the host does (1001: four-wide and tail)
        let v = self.rand(&[1001]);
        if self.wants("cast") {
            self.casts_round_as_the_host_does(&v);
        }

        // the output gradient in f32, or in bf16 (a bf16 activation's, mixed precision);
        // 581 rows: ten chunks of rows, added up by the last block of each column group
        // (one after the other, so each launch finds the counters the last one left)
        for (dtype, rows) in [
            (DType::F32, n),
            (DType::BF16, n),
            (DType::F32, 581),
            (DType::BF16, 581),
        ] {
            self.check(
                &format!("bias_grad {dtype}, {rows} rows"),
                1e-5,
                vec![self.rand(&[rows, d]).to_dtype(dtype), self.rand(&[d])],
                &|be, t| {
                    let [dy, db] = t else { unreachable!() };
                    be.bias_grad(dy, db).map(|_| 0.0)
                },
            );
        }
        // Width 45: the kernels' scalar paths; 44: their 4-wide ones. Activations stored
        // in f32, and in bf16 as under mixed precision (computed in f32, rounded when
        // stored: within a bf16 ulp of the CPU's rounding of its own f32 result).
        let (gamma, beta) = (self.rand(&[d]), self.rand(&[d]));
        for (w, dtype) in [
            (d, DType::F32),
            (44, DType::F32),
            (d, DType::BF16),
            (44, DType::BF16),
        ] {
            let act = |t: Tensor| t.to_dtype(dtype);
            let tol = |f32_tol: f32| if dtype == DType::BF16 { 1e-2 } else { f32_tol };
            self.check(
                &format!("bias_gelu {dtype}"),
                tol(1e-5),
                vec![
                    act(self.rand(&[n, w])),
                    self.rand(&[w]),
                    act(self.nan(&[n, w])),
                ],
                &|be, t| {
                    let [p, b, o] = t else { unreachable!() };
                    be.bias_gelu(p, b, o).map(|_| 0.0)
                },
            );
            self.check(
                &format!("fill_rows {dtype}"),
                0.0,
                vec![act(self.nan(&[n, w])), self.rand(&[w])],
                &|be, t| {
                    let [o, b] = t else { unreachable!() };
                    be.fill_rows(o, b).map(|_| 0.0)
                },
            );
            // the gradients stored as the activation is
            self.check(
                &format!("gelu_backward {dtype}"),
                tol(1e-5),
                vec![
                    act(self.rand(&[n, w])),
                    act(self.rand(&[n, w])),
                    act(self.nan(&[n, w])),
                ],
                &|be, t| {
                    let [g, p, o] = t else { unreachable!() };
                    be.gelu_backward(g, p, o).map(|_| 0.0)
                },
            );
            if w == d {
                self.check(
                    &format!("layernorm {dtype}"),
                    tol(1e-5),
                    vec![
                        x.clone(),
                        gamma.clone(),
                        beta.clone(),
                        act(self.nan(&[n, d])),
                        self.nan(&[n]),
                        self.nan(&[n]),
                    ],
                    &|be, t| {
                        let [x, g, b, y, m, r] = t else {
                            unreachable!()
                        };
                        be.layernorm(x, g, b, 1e-6, y, m, r).map(|_| 0.0)
                    },
                );
            }
        }
        // 150 and 581 rows: the parameter gradients' column sums over three and ten chunks
        // of rows
        for rows in [n, 150, 581] {
            let x = if rows == n {
                x.clone()
            } else {
                self.rand(&[rows, d])
            };
            let (mut mean, mut rstd) = (
                Tensor::zeros([rows], Device::Cpu),
                Tensor::zeros([rows], Device::Cpu),
            );
            let mut y = Tensor::zeros([rows, d], Device::Cpu);
            let cpu = for_device(Device::Cpu);
            cpu.layernorm(
                &x,
                &gamma,
                &self.rand(&[d]),
                1e-6,
                &mut y,
                &mut mean,
                &mut rstd,
            )
            .unwrap();
            // dy in f32, or in bf16 (the gradient of a bf16 output); the rest f32
            for dtype in [DType::F32, DType::BF16] {
                self.check(
                    &format!("layernorm_backward {dtype}, {rows} rows"),
                    1e-4,
                    vec![
                        self.rand(&[rows, d]).to_dtype(dtype),
                        x.clone(),
                        gamma.clone(),
                        mean.clone(),
                        rstd.clone(),
                        self.rand(&[rows, d]),
                        self.rand(&[d]),
                        self.rand(&[d]),
                    ],
                    &|be, t| {
                        let [dy, x, g, m, r, dx, dg, db] = t else {
                            unreachable!()
                        };
                        be.layernorm_backward(dy, x, g, m, r, dx, dg, db)
                            .map(|_| 0.0)
                    },
                );
            }
        }
        let images = self.rand(&[3, 3, 12, 20]);
        for dtype in [DType::F32, DType::BF16] {
            self.check(
                &format!("patchify {dtype}"),
                0.0,
                vec![
                    images.to_dtype(dtype),
                    self.nan(&[3, 15, 48]).to_dtype(dtype),
                ],
                &|be, t| {
                    let [i, o] = t else { unreachable!() };
                    be.patchify(i, 4, o).map(|_| 0.0)
                },
            );
        }
        let (b, tok, e) = (3, 17, 21);
        self.check(
            "embed",
            1e-6,
            vec![
                self.rand(&[b, tok - 1, e]),
                self.rand(&[e]),
                self.rand(&[tok, e]),
                self.nan(&[b, tok, e]),
            ],
            &|be, t| {
                let [p, c, pos, o] = t else { unreachable!() };
                be.embed(p, c, pos, o).map(|_| 0.0)
            },
        );
        self.check(
            "embed_backward",
            1e-5,
            vec![
                self.rand(&[b, tok, e]),
                self.rand(&[b, tok - 1, e]),
                self.rand(&[e]),
                self.rand(&[tok, e]),
            ],
            &|be, t| {
                let [g, dp, dc, de] = t else { unreachable!() };
                be.embed_backward(g, dp, dc, de).map(|_| 0.0)
            },
        );
        for (batch, tokens, queries, dim, heads) in [
            (2, 17, 17, 24, 2),
            (3, 65, 1, 64, 4), // the cls-only last block (16-wide heads: tensor cores in bf16)
            (1, 5, 5, 12, 3),
            (1, 7, 7, 15, 3),      // heads 5 wide: neither dimension a multiple of 4
            (2, 65, 65, 128, 2),   // ViT's 65 tokens, 64-wide heads (tensor cores in bf16)
            (1, 100, 100, 160, 2), // more than one round of keys and of head columns
        ] {
            let dims = AttnDims {
                batch,
                tokens,
                queries,
                dim,
                heads,
            };
            let qkv = self.rand(&[batch, tokens, 3 * dim]);
            let dout = self.rand(&[batch, queries, dim]);
            // each backend saves what it needs for the backward pass in its own form
            let attend = |be: &dyn Backend, qkv: &Tensor, out: &mut Tensor| -> Result<Tensor> {
                let mut saved = Tensor::uninit([be.attention_saved_len(dims)], qkv.device());
                be.attention(qkv, dims, &mut saved, out)?;
                Ok(saved)
            };
            for dtype in [DType::F32, DType::BF16] {
                // bf16: qkv, the output and its gradient stored in bf16 (mixed precision),
                // within a bf16 ulp; qkv's gradient f32 when accumulated into, bf16 when
                // written; P and dS rounded to bf16 for their products (tensor cores where
                // heads are a multiple of 16 wide, else the SIMT kernels)
                let bf16 = dtype == DType::BF16;
                let qkv = qkv.to_dtype(dtype);
                let dout = dout.to_dtype(dtype);
                let out = self.nan(&[batch, queries, dim]).to_dtype(dtype);
                self.check(
                    &format!("attention {dtype}"),
                    if bf16 { 1e-2 } else { 1e-5 },
                    vec![qkv.clone(), out.clone()],
                    &|be, t| {
                        let [qkv, out] = t else { unreachable!() };
                        attend(be, qkv, out).map(|_| 0.0)
                    },
                );
                // accumulating into a random gradient, or (all tokens querying) writing
                // over a NaN-poisoned one: every element must be written
                for accumulate in [true, false] {
                    if !accumulate && queries != tokens {
                        // rows past the queries would stay unwritten: refused
                        let be = for_device(self.device);
                        let on = |t: &Tensor| t.to_device(self.device).unwrap();
                        let (qkv, dout, mut out, mut dqkv) =
                            (on(&qkv), on(&dout), on(&out), on(&qkv));
                        let saved = attend(be, &qkv, &mut out).unwrap();
                        let err = be
                            .attention_backward(&dout, &qkv, &saved, dims, &mut dqkv, false)
                            .unwrap_err();
                        assert!(err.to_string().contains("overwrites"), "{err}");
                        continue;
                    }
                    let dqkv = if accumulate {
                        self.rand(&[batch, tokens, 3 * dim])
                    } else {
                        self.nan(&[batch, tokens, 3 * dim]).to_dtype(dtype)
                    };
                    self.check(
                        &format!("attention_backward {dtype} accumulate={accumulate}"),
                        if bf16 { 1e-2 } else { 1e-4 },
                        vec![qkv.clone(), dout.clone(), out.clone(), dqkv],
                        &|be, t| {
                            let [qkv, dout, out, dqkv] = t else {
                                unreachable!()
                            };
                            let saved = attend(be, qkv, out)?;
                            be.attention_backward(dout, qkv, &saved, dims, dqkv, accumulate)
                                .map(|_| 0.0)
                        },
                    );
                }
            }
        }
        // b in bf16 too: a mixed-precision branch added to the residual stream
        for dtype in [DType::F32, DType::BF16] {
            self.check(
                &format!("add {dtype}"),
                0.0,
                vec![
                    x.clone(),
                    self.rand(&[n, d]).to_dtype(dtype),
                    self.nan(&[n, d]),
                ],
                &|be, t| {
                    let [a, b, o] = t else { unreachable!() };
                    be.add(a, b, o).map(|_| 0.0)
                },
            );
        }
        self.check(
            "add_assign",
            0.0,
            vec![self.rand(&[n, d]), x.clone()],
            &|be, t| {
                let [a, b] = t else { unreachable!() };
                be.add_assign(a, b).map(|_| 0.0)
            },
        );
        self.check("scale", 0.0, vec![x.clone()], &|be, t| {
            be.scale(&mut t[0], 0.37).map(|_| 0.0)
        });
        self.check("sum_squares", 1e-9, vec![self.rand(&[70001])], &|be, t| {
            be.sum_squares(&t[0])
        });
        let samples = [5u64, 900, 3, 77, 1];
        // 133 per sample: the scalar path; 132: one hash per 4-wide access. x and out in
        // bf16 too: the MLP's hidden layer under mixed precision (no residual there), a
        // bf16 branch added to the f32 residual stream, its f32 gradient written in bf16,
        // a bf16 gradient accumulated into an f32 one.
        let (f32, bf16) = (DType::F32, DType::BF16);
        let modes = [
            (0, f32, f32),
            (1, f32, f32),
            (2, f32, f32),
            (0, bf16, bf16),
            (1, bf16, bf16),
            (2, bf16, f32),
            (0, f32, bf16),
            (1, bf16, f32),
        ];
        // per_sample: stochastic depth's one bit per sample
        let cases = modes.into_iter().flat_map(|m| [(m, 133), (m, 132)]);
        for (((mode, xt, ot), per), whole) in cases.flat_map(|c| [(c, false), (c, true)]) {
            let residual = self.rand(&[5, per]);
            let out = if mode == 1 {
                self.rand(&[5, per])
            } else {
                self.nan(&[5, per])
            };
            self.check(
                &format!("dropout {xt} -> {ot}, mode {mode}, per_sample {whole}"),
                0.0,
                vec![
                    self.rand(&[5, per]).to_dtype(xt),
                    residual,
                    out.to_dtype(ot),
                ],
                &|be, t| {
                    let [x, r, o] = t else { unreachable!() };
                    let key = DropoutKey {
                        seed: 11,
                        site: 3,
                        per_sample: whole,
                    };
                    let mode = match mode {
                        0 => DropoutMode::Write,
                        1 => DropoutMode::Accumulate,
                        _ => DropoutMode::AddTo(r),
                    };
                    be.dropout(x, 0.3, key, &samples, mode, o).map(|_| 0.0)
                },
            );
        }
        for classes in [3, 10, 1000] {
            let labels: Vec<usize> = (0..11).map(|i| (i * 7) % classes).collect();
            self.check(
                "cross_entropy",
                1e-5,
                vec![self.rand(&[11, classes]), self.nan(&[11, classes])],
                &|be, t| {
                    let [z, dz] = t else { unreachable!() };
                    be.cross_entropy(z, &labels, 0.1, dz).map(f64::from)
                },
            );
            // soft targets (Mixup/CutMix), rows not summing to 1 too
            self.check(
                "cross_entropy_soft",
                1e-5,
                vec![
                    self.rand(&[11, classes]),
                    self.uniform(&[11, classes], 0.0, 0.3),
                    self.nan(&[11, classes]),
                ],
                &|be, t| {
                    let [z, y, dz] = t else { unreachable!() };
                    be.cross_entropy_soft(z, y, dz).map(f64::from)
                },
            );
        }
        self.check(
            "select_rows",
            0.0,
            vec![self.rand(&[4, 7, 9]), self.nan(&[4, 9])],
            &|be, t| {
                let [x, o] = t else { unreachable!() };
                be.select_rows(x, 7, o).map(|_| 0.0)
            },
        );
        self.check(
            "select_rows_backward",
            0.0,
            vec![self.rand(&[4, 9]), self.rand(&[4, 7, 9])],
            &|be, t| {
                let [g, dx] = t else { unreachable!() };
                be.select_rows_backward(g, 7, dx).map(|_| 0.0)
            },
        );
        for decoupled in [true, false] {
            let (p, g, m) = (self.rand(&[1001]), self.rand(&[1001]), self.rand(&[1001]));
            let v = self.uniform(&[1001], 0.0, 1.0);
            self.check("adam", 1e-6, vec![p, g, m, v], &|be, t| {
                let [p, g, m, v] = t else { unreachable!() };
                let step = AdamStep {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.05,
                    decoupled,
                    step_size: 1e-2 / (1.0 - 0.9f32.powi(3)),
                    bias_correction2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
                };
                be.adam(p, g, m, v, step).map(|_| 0.0)
            });
        }
        for (momentum, nesterov, first) in
            [(0.0, false, false), (0.9, true, true), (0.9, false, false)]
        {
            self.check(
                "sgd",
                1e-6,
                vec![self.rand(&[999]), self.rand(&[999]), self.rand(&[999])],
                &|be, t| {
                    let [p, g, b] = t else { unreachable!() };
                    let step = SgdStep {
                        lr: 0.1,
                        momentum,
                        dampening: 0.1,
                        weight_decay: 1e-4,
                        nesterov,
                        first,
                    };
                    be.sgd(p, g, b, step).map(|_| 0.0)
                },
            );
        }
        // one launch over many tensors: sizes below, at and across the chunk size
        let sizes = [1usize, 45, 8192, 20001];
        let adam = Update::Adam(AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            decoupled: true,
            step_size: 0.05,
            bias_correction2_sqrt: 0.3,
        });
        let sgd = |momentum| {
            Update::Sgd(SgdStep {
                lr: 0.1,
                momentum,
                dampening: 0.0,
                weight_decay: 1e-3,
                nesterov: false,
                first: false,
            })
        };
        for (update, states) in [(adam, 2), (sgd(0.9), 1), (sgd(0.0), 0)] {
            let tensors: Vec<Tensor> = sizes
                .iter()
                .flat_map(|&n| {
                    let mut t = vec![self.rand(&[n]), self.rand(&[n])];
                    t.extend((0..states).map(|_| self.uniform(&[n], 0.0, 1.0)));
                    t
                })
                .collect();
            self.check("optimizer_step", 1e-6, tensors, &|be, t| {
                let mut all: Vec<OptimTensors> = t
                    .chunks_exact_mut(2 + states)
                    .map(|c| {
                        let (pg, state) = c.split_at_mut(2);
                        let [p, g] = pg else { unreachable!() };
                        OptimTensors { p, g, state }
                    })
                    .collect();
                be.optimizer_step(&mut all, update).map(|_| 0.0)
            });
        }
        let grads: Vec<Tensor> = sizes.iter().map(|&n| self.rand(&[n])).collect();
        self.check("sum_squares_all", 1e-9, grads, &|be, t| {
            be.sum_squares_all(&t.iter().collect::<Vec<_>>())
        });
        let grads: Vec<Tensor> = sizes.iter().map(|&n| self.rand(&[n])).collect();
        self.check("fill_all", 0.0, grads, &|be, t| {
            // random inputs: an element the kernel misses differs from the CPU's zero
            be.fill_all(&mut t.iter_mut().collect::<Vec<_>>(), 0.0)?;
            Ok(0.0)
        });
        let mut logits = self.rand(&[9, 37]).to_vec_f32();
        logits[37 + 5] = 9.0; // a tie: the first wins
        logits[37 + 20] = 9.0;
        logits[2 * 37] = f32::NAN; // a NaN first element wins
        logits[3 * 37 + 3] = f32::NAN; // a NaN elsewhere never does
        let logits = Tensor::from_vec(logits, [9, 37]).unwrap();
        self.check("argmax_rows", 0.0, vec![logits], &|be, t| {
            let rows = be.argmax_rows(&t[0])?;
            assert_eq!(rows[1], 5);
            Ok(rows
                .iter()
                .enumerate()
                .map(|(i, &k)| ((i + 1) * k) as f64)
                .sum())
        });
        let geometry = (0..5)
            .map(|i| Geometry {
                dy: i - 2,
                dx: 4 - 2 * i,
                flip: i % 2 == 1,
            })
            .chain([
                Geometry {
                    dy: -4,
                    dx: 4,
                    flip: true,
                },
                Geometry::default(),
            ])
            .collect::<Vec<_>>();
        // CIFAR-10's 32 × 32 and the default normalisation; 48 × 48 (geometry scaled by
        // the padding's 6 at 48) with another normalisation
        let custom = Normalize {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.125, 2.0],
        };
        let wide: Vec<Geometry> = geometry
            .iter()
            .map(|g| Geometry {
                dy: g.dy * 3 / 2,
                dx: g.dx * 3 / 2,
                flip: g.flip,
            })
            .collect();
        for (side, geometry, norm) in [(32, geometry, Normalize::default()), (48, wide, custom)] {
            let pixels = (0..geometry.len() * 3 * side * side)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let plain = RawImages {
                pixels,
                geometry,
                side,
                norm,
                mix: None,
            };
            // Mixup with the images reversed; CutMix with the last image's partners
            // appended (a dp share's)
            let mixup = RawImages {
                mix: Some(RawMix {
                    mix: Mix {
                        lam: 0.3,
                        cutmix: None,
                    },
                    partner: (0..plain.geometry.len() as u32).rev().collect(),
                }),
                ..plain.clone()
            };
            let b = side / 4;
            let cutmix = plain.rows(0..3).mixed_with(
                Mix {
                    lam: 0.6,
                    cutmix: Some(MixBox {
                        y0: b,
                        y1: 3 * b,
                        x0: 0,
                        x1: 2 * b + 1,
                    }),
                },
                plain.rows(4..7),
            );
            for (dtype, (kind, raw)) in [DType::F32, DType::BF16].into_iter().flat_map(|d| {
                [("", &plain), (" mixup", &mixup), (" cutmix", &cutmix)].map(|r| (d, r))
            }) {
                self.check(
                    &format!("augment {side} {dtype}{kind}"),
                    0.0,
                    vec![],
                    &|be, _| {
                        let images = be.augment(&raw.batch(), dtype)?.to_device(Device::Cpu)?;
                        assert_eq!(images.dtype(), dtype);
                        assert_eq!(images.dims(), [raw.batch().outputs(), 3, side, side]);
                        let want = raw.to_images()?.to_dtype(dtype);
                        assert_eq!(
                            images.to_vec_f32(),
                            want.to_vec_f32(),
                            "augmented images differ"
                        );
                        Ok(0.0)
                    },
                );
            }
        }
        let failed = self.failed.borrow();
        assert!(
            self.checked.get() + failed.len() > 0,
            "FERROVIT_CONFORMANCE={:?} matches none of the {} cases",
            self.only.join(","),
            self.skipped.get()
        );
        assert!(
            failed.is_empty(),
            "{}: {} op checks match the CPU backend, {} do not:\n{}",
            self.device,
            self.checked.get(),
            failed.len(),
            failed.join("\n")
        );
        eprintln!(
            "{}: {} op checks match the CPU backend ({} skipped by FERROVIT_CONFORMANCE)",
            self.device,
            self.checked.get(),
            self.skipped.get()
        );
    }
}

#[test]
fn emulated_cuda_kernels_match_the_cpu_backend() {
    Suite::new(Device::cuda_emulated()).run();
}

/// Where cuBLASLt cannot add a linear layer's bias, the backend fills the output with it
/// and accumulates the GEMM onto it: the same results (bf16 outputs rounded twice, within
/// the suite's bf16 tolerance).
#[test]
fn emulated_kernels_without_a_bias_epilogue_match_the_cpu_backend() {
    Suite::new(Device::cuda_emulated_without_bias_epilogue()).run();
}

#[test]
fn cuda_kernels_match_the_cpu_backend() {
    match Device::cuda(0) {
        Ok(device) => Suite::new(device).run(),
        Err(e) if std::env::var("FERROVIT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("FERROVIT_REQUIRE_GPU=1 but no GPU: {e}")
        }
        Err(e) => eprintln!("skipped: no GPU ({e})"),
    }
}
