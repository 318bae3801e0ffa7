//! The coordinate-descent soft top-k: the differentiable routing operator of CoLT5.
//!
//! For every row s ∈ Rⁿ (the last axis) and a target count k, it returns y ∈ [0, 1]ⁿ with
//! Σ_j y_j ≈ k, the entropy-regularised relaxation of a top-k mask:
//!
//! ```text
//! max_y ⟨s, y⟩ + eps·H(y)   subject to   Σ_j y_j = k,  0 ≤ y_j ≤ 1.
//! ```
//!
//! The reference (`coor_descent.py`) runs dual coordinate ascent on a scalar `a` and a
//! vector `b`. Because `b` is always `−relu(s + a)`, the whole state is one scalar per row
//! and the output is `y_j = exp(min(s_j + a, 0)/eps)`. This module works in that form:
//!
//! - [`Solver::Iterations`] reproduces the reference exactly (same iterations, same eps
//!   schedule, same output) and differentiates it with an exact reverse sweep that keeps
//!   only the `n_iters` thresholds of each row between forward and backward — not the
//!   per-iteration score tensors that autograd through the loop would store.
//! - [`Solver::Converged`] solves the fixed-point equation `Σ_j exp(min(s_j + a, 0)/eps) = k`
//!   to the working precision and differentiates it through the implicit-function theorem.
//!
//! # How close the iterations get to k
//!
//! At the router's defaults (20 iterations, eps 0.03 decaying from 4 by 0.7 per iteration)
//! the iterative solver ends near, not at, the constraint: the `coor_descent_demo` example
//! and `colt5 demo` print Σy next to k for both solvers. The converged solver meets
//! Σy = k to about 1e-6 relative in a handful of passes (Newton steps on a bracketed
//! scalar; the same command prints the count).
//!
//! # Input rules
//!
//! - Masked entries (mask `false`) get output 0 and gradient 0; a fully masked row gives 0.
//! - `k` must be positive and at most the row length n. When fewer than k entries of a row
//!   are unmasked, every unmasked entry saturates at 1 (the row sums to n_valid < k), as in
//!   the reference: routers ask for a fixed count on padded sequences and rely on it.
//! - Scores must be finite (checked unless [`CoorDescentConfig::validate`] is off).
//!
//! # Example
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use colt5::coor_descent::{coor_descent, CoorDescentConfig, Solver};
//!
//! let device = Default::default();
//! let scores = Tensor::<NdArray, 2>::from_floats([[3.0, 1.0, 0.5, -2.0, 2.5]], &device);
//! // The reference's iterations...
//! let config = CoorDescentConfig::iterations(20, 0.1, None, 1.0);
//! let y = coor_descent(scores.clone(), 2.0, None, &config).unwrap();
//! let values: Vec<f32> = y.into_data().to_vec().unwrap();
//! assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
//! // ...or the converged solver, which meets Σy = k.
//! let config = CoorDescentConfig::new().with_solver(Solver::converged());
//! let total: f32 = coor_descent(scores, 2.0, None, &config).unwrap().sum().into_scalar();
//! assert!((total - 2.0).abs() < 1e-5);
//! ```

mod autodiff;
mod converged;
mod cpu;
mod exp;
mod iterative;

use burn::config::Config;
use burn::tensor::{
    backend::Backend,
    ops::{BoolTensor, FloatTensor, IntTensor},
    Bool, Int, Tensor, TensorData, TensorPrimitive,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use iterative::Schedule;

/// Stands in for masked scores: far below any real score, and finite so that rows with no
/// valid entry stay finite in every intermediate.
const MASKED_SCORE: f64 = -1e30;

/// How the per-row threshold is found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Solver {
    /// The reference's fixed number of coordinate-descent iterations, with its ε-scaling
    /// schedule: eps_1 = max(eps_init, eps), eps_{t+1} = max(eps_t · eps_decay, eps); the
    /// output uses the temperature after the last update.
    Iterations {
        /// Number of iterations (≥ 1).
        n_iters: usize,
        /// Initial temperature; `None` starts at `eps`.
        eps_init: Option<f64>,
        /// Multiplicative decay of the temperature per iteration, in (0, 1].
        eps_decay: f64,
    },
    /// Solve Σ_j exp(min(s_j + a, 0)/eps) = k for a by safeguarded Newton steps.
    Converged {
        /// Stop when every row's |Σy/k − 1| is at most this (or the bracket of the
        /// threshold has shrunk to rounding).
        tolerance: f64,
        /// Upper bound on the number of passes over the data.
        max_passes: usize,
    },
}

impl Solver {
    /// `n_iters` iterations at a constant temperature (the reference's defaults for
    /// `eps_init` and `eps_decay`).
    pub fn iterations(n_iters: usize) -> Self {
        Solver::Iterations {
            n_iters,
            eps_init: None,
            eps_decay: 1.0,
        }
    }

    /// The converged solver with tolerance 1e-6 and at most 100 passes.
    pub fn converged() -> Self {
        Solver::Converged {
            tolerance: 1e-6,
            max_passes: 100,
        }
    }
}

/// Options of [`coor_descent`].
#[derive(Config, Debug)]
pub struct CoorDescentConfig {
    /// Final (smallest) temperature. Default 0.1, as the reference.
    #[config(default = 0.1)]
    pub eps: f64,
    /// The solver. Default: 20 iterations at constant temperature.
    #[config(default = "Solver::iterations(20)")]
    pub solver: Solver,
    /// Check the inputs (finite scores, 0 < k ≤ n) before solving. The check reads the scores
    /// back from the device once per call; turn it off in hot loops whose inputs are known
    /// to be valid. Default true.
    #[config(default = true)]
    pub validate: bool,
}

impl CoorDescentConfig {
    /// The reference's options: `n_iters` iterations, final temperature `eps`, starting at
    /// `eps_init` (or `eps`) and decaying by `eps_decay`.
    pub fn iterations(n_iters: usize, eps: f64, eps_init: Option<f64>, eps_decay: f64) -> Self {
        Self::new().with_eps(eps).with_solver(Solver::Iterations {
            n_iters,
            eps_init,
            eps_decay,
        })
    }

    /// The iterative solver's temperatures: eps_1..eps_T, then the temperature after the last
    /// update (the output's); `None` for the converged solver.
    pub fn temperatures(&self) -> Option<Vec<f64>> {
        self.schedule().map(|schedule| {
            let mut temperatures = schedule.iterations;
            temperatures.push(schedule.output);
            temperatures
        })
    }

    /// The temperature schedule of the iterative solver; `None` for the converged one.
    pub(crate) fn schedule(&self) -> Option<Schedule> {
        match self.solver {
            Solver::Iterations {
                n_iters,
                eps_init,
                eps_decay,
            } => Some(Schedule::new(n_iters, self.eps, eps_init, eps_decay)),
            Solver::Converged { .. } => None,
        }
    }

    /// Checks every option; the error names the first invalid one.
    pub fn check(&self) -> crate::Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config("eps", self.eps, "a finite number > 0"));
        }
        match self.solver {
            Solver::Iterations {
                n_iters,
                eps_init,
                eps_decay,
            } => {
                if n_iters == 0 {
                    return Err(Error::config("n_iters", n_iters, "at least 1"));
                }
                if let Some(eps_init) = eps_init {
                    if !(eps_init.is_finite() && eps_init > 0.0) {
                        return Err(Error::config("eps_init", eps_init, "a finite number > 0"));
                    }
                }
                if !(eps_decay > 0.0 && eps_decay <= 1.0) {
                    return Err(Error::config("eps_decay", eps_decay, "in (0, 1]"));
                }
            }
            Solver::Converged {
                tolerance,
                max_passes,
            } => {
                if !(tolerance.is_finite() && tolerance > 0.0) {
                    return Err(Error::config("tolerance", tolerance, "a finite number > 0"));
                }
                if max_passes == 0 {
                    return Err(Error::config("max_passes", max_passes, "at least 1"));
                }
            }
        }
        Ok(())
    }
}

/// The target count k: one value for every row, or one per row.
#[derive(Clone, Debug)]
pub enum RowK<B: Backend> {
    /// The same k for every row.
    Scalar(f64),
    /// One k per row, in row-major order of the leading dimensions of the scores
    /// (`numel` = product of the leading dimensions). Gradients flow into it.
    PerRow(Tensor<B, 1>),
}

impl<B: Backend> From<f64> for RowK<B> {
    fn from(k: f64) -> Self {
        RowK::Scalar(k)
    }
}

impl<B: Backend> From<usize> for RowK<B> {
    fn from(k: usize) -> Self {
        RowK::Scalar(k as f64)
    }
}

impl<B: Backend> From<Tensor<B, 1>> for RowK<B> {
    fn from(k: Tensor<B, 1>) -> Self {
        RowK::PerRow(k)
    }
}

/// What a solve produced, beyond the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolveStats {
    /// Passes over the scores the solver made: `n_iters` for the iterative solver, the
    /// number of Newton/bisection passes for the converged one.
    pub passes: usize,
}

/// Backends that can run the coordinate descent, with autodiff support.
///
/// Every method has a portable default written with tensor operations, so implementing the
/// trait for a backend takes one empty `impl` block; GPU backends override the solve and
/// gradient with fused kernels. [`Autodiff`](burn::backend::Autodiff) registers
/// [`coor_descent_backward`](Self::coor_descent_backward) as the backward of
/// [`coor_descent_rows`](Self::coor_descent_rows).
///
/// All tensors are row-major 2-D: scores `[rows, n]`, k `[rows, 1]`, mask `[rows, n]`
/// (`true` = keep). Inputs are assumed valid (use [`coor_descent`], which checks them).
///
/// The models' backends also provide [fused attention](crate::fused_attention), hence the
/// supertrait: one bound gives a model every backend extension it uses.
pub trait CoorDescentBackend:
    crate::fused_attention::AttentionBackend + crate::optim::AdamBackend
{
    /// The soft top-k of every row and the solver statistics. Autodiff backends record the
    /// operation for the backward pass.
    fn coor_descent_rows(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, SolveStats) {
        let (output, _, stats) = Self::coor_descent_solve(scores, k, mask, config);
        (output, stats)
    }

    /// Solves every row: returns the output, the thresholds the backward needs (`[rows, T]`,
    /// a_1..a_T, for the iterative solver; `[rows, 1]` for the converged one) and the
    /// statistics.
    fn coor_descent_solve(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, SolveStats) {
        portable_solve::<Self>(scores, k, mask, config)
    }

    /// Gradients of the loss with respect to the scores and to k, given the gradient with
    /// respect to the output and the thresholds from [`coor_descent_solve`](Self::coor_descent_solve).
    fn coor_descent_backward(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        thresholds: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable_backward::<Self>(scores, k, mask, thresholds, grad, config)
    }

    /// The memory of `device` in bytes and whether that is its whole memory (`true`) or
    /// what is free now (`false`), for [`crate::memory::ensure_fits`]. The default is the
    /// host's available memory; CUDA backends give the GPU's total.
    fn device_memory(_device: &Self::Device) -> Option<(u64, bool)> {
        crate::memory::host_available().map(|bytes| (bytes, false))
    }

    /// Positions of the `k` largest entries of every row of `values: [rows, n]`
    /// (1 ≤ k ≤ n): `[rows, k]`, in descending order of value, the lower position first
    /// among equal values. Routers select their tokens with it. The default selects on the
    /// host; CubeCL backends select on the device.
    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        portable_top_k_indices::<Self>(values, k)
    }
}

/// Top-k positions on the host, with the device kernel's order: larger values first, the
/// lower position first among equal values (routers' scores saturate at exactly 1, so ties
/// at the k-th place are common and must be broken the same way on every backend).
fn portable_top_k_indices<B: Backend>(values: FloatTensor<B>, k: usize) -> IntTensor<B> {
    let values = float::<B>(values);
    let [rows, n] = values.dims();
    let device = values.device();
    let host = values.into_data().convert::<f32>();
    let host = host.as_slice::<f32>().expect("f32 data");
    let mut indices = Vec::with_capacity(rows * k);
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for row in host.chunks(n) {
        order.clear();
        order.extend(0..n as u32);
        let before =
            |&a: &u32, &b: &u32| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b));
        if k < n {
            order.select_nth_unstable_by(k - 1, before);
        }
        order[..k].sort_unstable_by(before);
        indices.extend(order[..k].iter().map(|&i| i as i64));
    }
    Tensor::<B, 2, Int>::from_data(TensorData::new(indices, [rows, k]), &device).into_primitive()
}

/// The positions of the `k` largest entries of `values: [..., n]` over its last axis,
/// `[..., k]`, in descending order of value ([`CoorDescentBackend::top_k_indices`]: on the
/// device for CubeCL backends). Errors unless 1 ≤ k ≤ n.
pub fn top_k_indices<B: CoorDescentBackend, const D: usize>(
    values: Tensor<B, D>,
    k: usize,
) -> crate::Result<Tensor<B, D, Int>> {
    let dims = values.dims();
    let n = dims[D - 1];
    if k == 0 || k > n {
        return Err(Error::KExceedsRow {
            k: k as f64,
            n,
            row: 0,
        });
    }
    let rows = dims[..D - 1].iter().product();
    let indices = B::top_k_indices(values.reshape([rows, n]).into_primitive().tensor(), k);
    let mut out_dims = dims;
    out_dims[D - 1] = k;
    Ok(Tensor::<B, 2, Int>::from_primitive(indices).reshape(out_dims))
}

/// The portable solver: tensor operations of any backend.
fn portable_solve<B: Backend>(
    scores: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    config: &CoorDescentConfig,
) -> (FloatTensor<B>, FloatTensor<B>, SolveStats) {
    let scores = float::<B>(scores);
    let k = float::<B>(k);
    let mask = mask.map(Tensor::<B, 2, Bool>::from_primitive);
    let (output, thresholds, passes) = match config.solver {
        Solver::Converged {
            tolerance,
            max_passes,
        } => converged::forward(scores, k, mask.as_ref(), config.eps, tolerance, max_passes),
        Solver::Iterations { n_iters, .. } => {
            let schedule = config
                .schedule()
                .expect("the iterative solver has a schedule");
            let (y, a) = iterative::forward(scores, k, mask.as_ref(), &schedule);
            (y, a, n_iters)
        }
    };
    (
        primitive(output),
        primitive(thresholds),
        SolveStats { passes },
    )
}

/// The portable reverse sweep: tensor operations of any backend.
fn portable_backward<B: Backend>(
    scores: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    thresholds: FloatTensor<B>,
    grad: FloatTensor<B>,
    config: &CoorDescentConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let scores = float::<B>(scores);
    let mask = mask.map(Tensor::<B, 2, Bool>::from_primitive);
    let thresholds = float::<B>(thresholds);
    let grad = float::<B>(grad);
    let (d_scores, d_k) = match config.schedule() {
        Some(schedule) => {
            let k = float::<B>(k);
            iterative::backward(scores, k, mask.as_ref(), thresholds, grad, &schedule)
        }
        None => converged::backward(scores, mask.as_ref(), thresholds, grad, config.eps),
    };
    (primitive(d_scores), primitive(d_k))
}

fn float<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

fn primitive<B: Backend>(tensor: Tensor<B, 2>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// The fused row loops of `cpu.rs` for CPU backends, which read their inputs on the host.
macro_rules! host_coor_descent {
    () => {
        /// The fused row loop of `cpu.rs` for the iterative solver.
        fn coor_descent_solve(
            scores: FloatTensor<Self>,
            k: FloatTensor<Self>,
            mask: Option<BoolTensor<Self>>,
            config: &CoorDescentConfig,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, SolveStats) {
            host_solve::<Self>(scores, k, mask, config)
        }

        /// The fused reverse sweep of `cpu.rs` for the iterative solver.
        fn coor_descent_backward(
            scores: FloatTensor<Self>,
            k: FloatTensor<Self>,
            mask: Option<BoolTensor<Self>>,
            thresholds: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            config: &CoorDescentConfig,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            host_backward::<Self>(scores, k, mask, thresholds, grad, config)
        }
    };
}

impl_for_ndarray!(CoorDescentBackend { host_coor_descent!(); });

impl CoorDescentBackend for burn::backend::Flex {
    host_coor_descent!();
}

/// The iterative solver as the fused row loop of `cpu.rs`, on the host; other schedules
/// portably.
fn host_solve<B: Backend>(
    scores: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    config: &CoorDescentConfig,
) -> (FloatTensor<B>, FloatTensor<B>, SolveStats) {
    let Some(schedule) = config.schedule() else {
        return portable_solve::<B>(scores, k, mask, config);
    };
    let host = HostRows::<B>::read(scores, k, mask);
    let (y, thresholds) = cpu::forward(&host.rows(), &schedule);
    let steps = schedule.iterations.len();
    (
        host.tensor(y, [host.count, host.n]),
        host.tensor(thresholds, [host.count, steps]),
        SolveStats { passes: steps },
    )
}

/// The iterative solver's reverse sweep as the fused loop of `cpu.rs`, on the host; other
/// schedules portably.
fn host_backward<B: Backend>(
    scores: FloatTensor<B>,
    k: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    thresholds: FloatTensor<B>,
    grad: FloatTensor<B>,
    config: &CoorDescentConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let Some(schedule) = config.schedule() else {
        return portable_backward::<B>(scores, k, mask, thresholds, grad, config);
    };
    let host = HostRows::<B>::read(scores, k, mask);
    let grad = host_values::<B>(grad);
    let (d_scores, d_k) = cpu::backward(&host.rows(), &grad, &schedule);
    (
        host.tensor(d_scores, [host.count, host.n]),
        host.tensor(d_k, [host.count, 1]),
    )
}

/// One call's inputs copied to the host in f64.
struct HostRows<B: Backend> {
    scores: Vec<f64>,
    k: Vec<f64>,
    mask: Option<Vec<bool>>,
    count: usize,
    n: usize,
    device: B::Device,
}

impl<B: Backend> HostRows<B> {
    fn read(scores: FloatTensor<B>, k: FloatTensor<B>, mask: Option<BoolTensor<B>>) -> Self {
        let scores = float::<B>(scores);
        let [count, n] = scores.dims();
        let device = scores.device();
        let mask = mask.map(|m| {
            Tensor::<B, 2, Bool>::from_primitive(m)
                .into_data()
                .convert::<bool>()
                .to_vec::<bool>()
                .expect("a boolean mask")
        });
        HostRows {
            scores: host_values::<B>(scores.into_primitive().tensor()),
            k: host_values::<B>(k),
            mask,
            count,
            n,
            device,
        }
    }

    fn rows(&self) -> cpu::Rows<'_> {
        cpu::Rows {
            scores: &self.scores,
            n: self.n,
            k: &self.k,
            mask: self.mask.as_deref(),
        }
    }

    fn tensor(&self, values: Vec<f64>, shape: [usize; 2]) -> FloatTensor<B> {
        let data = TensorData::new(values, shape).convert::<burn::tensor::ops::FloatElem<B>>();
        primitive(Tensor::<B, 2>::from_data(data, &self.device))
    }
}

fn host_values<B: Backend>(tensor: FloatTensor<B>) -> Vec<f64> {
    float::<B>(tensor)
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("a float tensor")
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;

/// The soft top-k of `scores` over its last axis, k entries per row.
///
/// - `scores`: `[..., n]`, finite.
/// - `k`: a number (`2.0`, `8usize`) or a [`RowK::PerRow`] tensor with one value per row.
/// - `mask`: broadcastable to the shape of `scores` (each dimension equal or 1); `false`
///   marks entries that cannot be selected.
///
/// Returns a tensor of the shape of `scores` with values in [0, 1]. Errors name the bad
/// option or input: see [`Error`].
pub fn coor_descent<B: CoorDescentBackend, const D: usize>(
    scores: Tensor<B, D>,
    k: impl Into<RowK<B>>,
    mask: Option<Tensor<B, D, Bool>>,
    config: &CoorDescentConfig,
) -> crate::Result<Tensor<B, D>> {
    coor_descent_with_stats(scores, k, mask, config).map(|(output, _)| output)
}

/// [`coor_descent`], also returning the solver's [`SolveStats`].
pub fn coor_descent_with_stats<B: CoorDescentBackend, const D: usize>(
    scores: Tensor<B, D>,
    k: impl Into<RowK<B>>,
    mask: Option<Tensor<B, D, Bool>>,
    config: &CoorDescentConfig,
) -> crate::Result<(Tensor<B, D>, SolveStats)> {
    config.check()?;
    let dims = scores.dims();
    let n = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    if n == 0 || rows == 0 {
        return Err(Error::Shape {
            name: "scores",
            actual: dims.to_vec(),
            expected: "at least one row of at least one entry".into(),
        });
    }
    let device = scores.device();
    let mask = mask
        .map(|mask| {
            let mask_dims = mask.dims();
            if mask_dims.iter().zip(&dims).any(|(&m, &s)| m != s && m != 1) {
                return Err(Error::Shape {
                    name: "mask",
                    actual: mask_dims.to_vec(),
                    expected: format!("broadcastable to the scores' shape {dims:?}"),
                });
            }
            Ok(mask.expand(dims).reshape([rows, n]))
        })
        .transpose()?;
    let k = match k.into() {
        RowK::Scalar(k) => {
            if config.validate {
                check_k(&[k], n)?;
            }
            Tensor::<B, 2>::full([rows, 1], k, &device)
        }
        RowK::PerRow(k) => {
            let [count] = k.dims();
            if count != rows {
                return Err(Error::Shape {
                    name: "k",
                    actual: vec![count],
                    expected: format!("[{rows}]: one value per row of scores {dims:?}"),
                });
            }
            if config.validate {
                let values = k
                    .to_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .unwrap_or_default();
                check_k(&values, n)?;
            }
            k.reshape([rows, 1])
        }
    };
    let scores = scores.reshape([rows, n]);
    if config.validate {
        let count = scores
            .clone()
            .is_finite()
            .bool_not()
            .int()
            .sum()
            .into_scalar();
        let count: i64 = burn::tensor::ElementConversion::elem(count);
        if count > 0 {
            return Err(Error::NonFinite {
                name: "scores",
                count: count as usize,
            });
        }
    }
    let (output, stats) = B::coor_descent_rows(
        scores.into_primitive().tensor(),
        k.into_primitive().tensor(),
        mask.map(Tensor::into_primitive),
        config,
    );
    let output = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(output));
    Ok((output.reshape(dims), stats))
}

fn check_k(values: &[f64], n: usize) -> crate::Result<()> {
    for (row, &k) in values.iter().enumerate() {
        if !k.is_finite() || k <= 0.0 {
            return Err(Error::NonPositiveK { k, row });
        }
        if k > n as f64 {
            return Err(Error::KExceedsRow { k, n, row });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f64>;

    /// The fused host loops, which skip masked entries, against the portable solver, which
    /// computes every entry, on a causal mask with fully masked rows and per-row k.
    #[test]
    fn host_loops_skip_masked_entries_without_changing_any_value() {
        let device = Default::default();
        let [rows, n] = [12, 9];
        let scores = Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 2.0), &device);
        let k = Tensor::<B, 2>::random([rows, 1], Distribution::Uniform(1.0, 3.0), &device);
        let grad = Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 1.0), &device);
        let row = Tensor::<B, 1, Int>::arange(0..rows as i64, &device)
            .reshape([rows, 1])
            .expand([rows, n]);
        let col = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
            .reshape([1, n])
            .expand([rows, n]);
        // Rows 0 and 1 see nothing; row r ≥ 2 sees columns below r − 1.
        let mask = col.lower(row.sub_scalar(1));
        let config = CoorDescentConfig::iterations(15, 0.1, Some(2.0), 0.8);
        let mask_primitive = || Some(mask.clone().into_primitive());
        let (host_y, host_a, _) = host_solve::<B>(
            primitive(scores.clone()),
            primitive(k.clone()),
            mask_primitive(),
            &config,
        );
        let (y, a, _) = portable_solve::<B>(
            primitive(scores.clone()),
            primitive(k.clone()),
            mask_primitive(),
            &config,
        );
        let close = |x: FloatTensor<B>, y: FloatTensor<B>, what: &str| {
            let error = (float::<B>(x) - float::<B>(y)).abs().max().into_scalar();
            assert!(error < 1e-12, "{what}: {error}");
        };
        close(host_y, y, "outputs");
        close(host_a, a.clone(), "thresholds");
        let (host_ds, host_dk) = host_backward::<B>(
            primitive(scores.clone()),
            primitive(k.clone()),
            mask_primitive(),
            a.clone(),
            primitive(grad.clone()),
            &config,
        );
        let (ds, dk) = portable_backward::<B>(
            primitive(scores),
            primitive(k),
            mask_primitive(),
            a,
            primitive(grad),
            &config,
        );
        close(host_ds, ds, "score gradients");
        close(host_dk, dk, "k gradients");
    }
}
