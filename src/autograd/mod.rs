//! A thin reverse-mode tape over coarse ops.
//!
//! A [`Graph`] is an arena of nodes addressed by index ([`Var`]); inputs always have
//! smaller indices than their consumers, so the backward pass is one reverse sweep.
//! Each op is one fused backend computation with a hand-written backward. Parameter
//! gradients accumulate straight into the [`ParamStore`]; `backward_from(var, grad)`
//! starts the sweep at any node with a given gradient (what a pipeline stage needs
//! when its output gradient arrives from the next stage).
//!
//! The files:
//! - `mod.rs` (this one): the node arena, [`Var`], the graph's parameters, and the
//!   backward sweep ([`Graph::backward_from`]);
//! - `grad.rs`: gradient hand-over between an op's backward and the arena (taking a
//!   slot out, writing a first gradient whole, copy-on-write shares, accumulation);
//! - `precision.rs`: the mixed-precision policy, [`Precision`] and [`Out`];
//! - `params.rs`: the named [`ParamStore`];
//! - `ops/`: the ops, one file per family, each op's forward beside its backward
//!   (`ops/mod.rs` lists them and dispatches a node's backward to its family).

mod grad;
mod ops;
mod params;
mod precision;

pub use ops::Activation;
pub use params::{Param, ParamId, ParamStore};
pub use precision::{Out, Precision};

use crate::backend::{self, Backend};
use crate::error::{Error, Result};
use crate::tensor::{Device, Shape, Tensor};
use ops::Op;

/// A node of a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

struct Node {
    /// `None` for parameters (their value lives in the store) and after the backward
    /// sweep has released it.
    value: Option<Tensor>,
    grad: Option<Tensor>,
    needs_grad: bool,
    op: Op,
}

/// The parameters a graph reads and accumulates gradients into: borrowed for one
/// scoped computation, or owned while an [`Engine`](crate::engine::Engine) holds a
/// graph between its `forward` and `backward` calls.
enum Store<'a> {
    Borrowed(&'a mut ParamStore),
    Owned(ParamStore),
}

impl std::ops::Deref for Store<'_> {
    type Target = ParamStore;
    fn deref(&self) -> &ParamStore {
        match self {
            Store::Borrowed(s) => s,
            Store::Owned(s) => s,
        }
    }
}

impl std::ops::DerefMut for Store<'_> {
    fn deref_mut(&mut self) -> &mut ParamStore {
        match self {
            Store::Borrowed(s) => s,
            Store::Owned(s) => s,
        }
    }
}

/// One forward computation, recorded for its backward pass.
pub struct Graph<'a> {
    store: Store<'a>,
    nodes: Vec<Node>,
    param_vars: Vec<Option<Var>>,
    /// Mixed precision's bf16 copies of the matrix parameters, made together at the
    /// first GEMM that needs one ([`Graph::gemm_weight`]).
    half_params: Vec<Option<Tensor>>,
    backend: &'static dyn Backend,
    device: Device,
    precision: Precision,
}

impl<'a> Graph<'a> {
    pub fn new(store: &'a mut ParamStore) -> Self {
        Graph::with_store(Store::Borrowed(store))
    }

    fn with_store(store: Store<'a>) -> Self {
        let n = store.len();
        let device = store
            .iter()
            .next()
            .map_or(Device::Cpu, |p| p.value.device());
        Graph {
            store,
            nodes: Vec::new(),
            param_vars: vec![None; n],
            half_params: vec![None; n],
            backend: backend::for_device(device),
            device,
            precision: Precision::F32,
        }
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }

    /// A graph that owns the parameters until [`Graph::into_store`] gives them back.
    pub fn owning(store: ParamStore) -> Graph<'static> {
        Graph::with_store(Store::Owned(store))
    }

    /// The parameters of a graph made by [`Graph::owning`] (`None` for a borrowing one).
    pub fn into_store(self) -> Option<ParamStore> {
        match self.store {
            Store::Owned(s) => Some(s),
            Store::Borrowed(_) => None,
        }
    }

    fn push(&mut self, value: Tensor, needs_grad: bool, op: Op) -> Var {
        self.nodes.push(Node {
            value: Some(value),
            grad: None,
            needs_grad,
            op,
        });
        Var(self.nodes.len() - 1)
    }

    /// A constant input (no gradient).
    pub fn input(&mut self, value: Tensor) -> Var {
        self.push(value, false, Op::Input)
    }

    /// An input whose gradient is wanted (read it with [`Graph::grad`] after backward).
    pub fn input_with_grad(&mut self, value: Tensor) -> Var {
        self.push(value, true, Op::Input)
    }

    /// The node for a parameter (one node per parameter per graph).
    pub fn param(&mut self, id: ParamId) -> Var {
        if let Some(v) = self.param_vars[id.0] {
            return v;
        }
        self.nodes.push(Node {
            value: None,
            grad: None,
            needs_grad: true,
            op: Op::Param(id),
        });
        let v = Var(self.nodes.len() - 1);
        self.param_vars[id.0] = Some(v);
        v
    }

    /// The value of a node.
    ///
    /// # Panics
    /// If the backward sweep already released it (values are freed as the sweep
    /// passes them, to bound memory).
    pub fn value(&self, v: Var) -> &Tensor {
        let node = &self.nodes[v.0];
        match (&node.op, &node.value) {
            (Op::Param(id), _) => &self.store.get(*id).value,
            (_, Some(t)) => t,
            (_, None) => panic!("value of node {} was released by backward", v.0),
        }
    }

    /// The gradient of an input node after [`Graph::backward`] (parameter gradients are
    /// in the store).
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        match self.nodes[v.0].op {
            Op::Param(id) => Some(&self.store.get(id).grad),
            _ => self.nodes[v.0].grad.as_ref(),
        }
    }

    fn needs(&self, v: Var) -> bool {
        self.nodes[v.0].needs_grad
    }

    /// An output buffer (an error, not a panic, when the device is out of memory).
    fn out(&self, dims: &[usize]) -> Result<Tensor> {
        Tensor::try_uninit(Shape::new(dims), self.device)
    }

    /// Backpropagates from a one-element node (a loss) with gradient 1.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        let shape = self.value(loss).shape().clone();
        if shape.numel() != 1 {
            return Err(Error::shape("backward", "a one-element loss", shape));
        }
        let one = Tensor::try_full(shape, 1.0, self.device)?;
        self.backward_from(loss, one)
    }

    /// Backpropagates `grad` (the gradient of some objective w.r.t. `var`) through
    /// everything `var` depends on. Parameter gradients accumulate into the store;
    /// intermediate values are released as the sweep passes them.
    pub fn backward_from(&mut self, var: Var, grad: Tensor) -> Result<()> {
        let want = self.value(var).shape().clone();
        if grad.shape() != &want {
            return Err(Error::shape("backward_from", want, grad.shape()));
        }
        self.accumulate(var, &grad)?;
        for i in (0..=var.0).rev() {
            let Some(g) = self.nodes[i].grad.take() else {
                continue;
            };
            self.backward_node(i, &g)?;
            let node = &mut self.nodes[i];
            if matches!(node.op, Op::Input) {
                node.grad = Some(g); // callers read input gradients
            } else if !matches!(node.op, Op::Param(_)) {
                // The root keeps its value (callers read the loss after backward).
                if i != var.0 {
                    node.value = None;
                }
                node.op = Op::Input; // drops saved tensors
            }
        }
        Ok(())
    }

    fn backward_node(&mut self, i: usize, g: &Tensor) -> Result<()> {
        // Move the op out so its saved tensors can be read while grads are written.
        let op = std::mem::replace(&mut self.nodes[i].op, Op::Input);
        let r = self.backward_op(&op, g);
        self.nodes[i].op = op;
        r
    }
}
