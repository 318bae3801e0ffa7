//! The converged solver: the fixed point of the coordinate descent, found directly.
//!
//! The iteration's fixed point solves f(a) = Σ_j exp(min(s_j + a, 0)/eps) = k, an equation
//! in one scalar a per row with f nondecreasing. We bracket the root with
//! `lo = −max s + eps ln(k/n_valid)` (every term ≤ k/n_valid, so f(lo) ≤ k) and
//! `hi = −min s` (every entry saturated, f(hi) = n_valid ≥ k), then take Newton steps on
//! ln f(a) − ln k, falling back to bisection whenever a step leaves the bracket. Rows with
//! k ≥ n_valid have every valid entry saturated and take a = hi.
//!
//! Gradient (implicit function theorem): with A = {j : s_j + a < 0}, y_j = exp((s_j+a)/eps)
//! on A and ḡ = Σ_A g y / Σ_A y, ds_j = (y_j/eps)(g_j − ḡ) on A, 0 elsewhere, and dk = ḡ.

use burn::tensor::{backend::Backend, Bool, DType, ElementConversion, Tensor};

use super::iterative::{output, prepare};

/// Stands in for masked entries when looking for the row minimum.
const UNMASKED_CEILING: f64 = 1e30;

/// Floor of a denominator that may be zero (every entry saturated): representable in f32.
const TINY: f64 = 1e-30;

/// Solves for the threshold a of every row; returns the output, a as `[rows, 1]`, and the
/// number of passes over the data that were needed.
pub(crate) fn forward<B: Backend>(
    scores: Tensor<B, 2>,
    k: Tensor<B, 2>,
    mask: Option<&Tensor<B, 2, Bool>>,
    eps: f64,
    tolerance: f64,
    max_passes: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>, usize) {
    let machine_eps = match scores.dtype() {
        DType::F64 => f64::EPSILON,
        DType::F32 | DType::Flex32 => f32::EPSILON as f64,
        _ => 1e-3,
    };
    let row_min = match mask {
        Some(mask) => scores
            .clone()
            .mask_fill(mask.clone().bool_not(), UNMASKED_CEILING),
        None => scores.clone(),
    }
    .min_dim(1);
    let (scores, n_valid) = prepare(scores, mask);
    let target = k.clone().min_pair(n_valid.clone());
    let log_target = target.clone().log();
    let mut lo = (k.clone() / n_valid.clone()).log().mul_scalar(eps) - scores.clone().max_dim(1);
    let mut hi = row_min.neg();
    // Rows with k ≥ n_valid (or no valid entry, where lo > hi) solve nothing: every valid
    // entry saturates at a = hi.
    let saturated = k
        .greater_equal(n_valid)
        .bool_or(lo.clone().greater_equal(hi.clone()));
    let saturated_threshold = hi.clone();
    let mut a = lo.clone();
    let mut passes = 0;
    while passes < max_passes {
        passes += 1;
        let y = output(scores.clone(), a.clone(), eps, None);
        let active = (scores.clone() + a.clone()).lower_elem(0.0);
        let total = y.clone().sum_dim(1);
        let active_total = y.mask_fill(active.bool_not(), 0.0).sum_dim(1);

        let residual = (total.clone() / target.clone())
            .sub_scalar(1.0)
            .abs()
            .mask_fill(saturated.clone(), 0.0);
        let width = (hi.clone() - lo.clone()) / (a.clone().abs() + eps);
        let unconverged = residual
            .greater_elem(tolerance)
            .bool_and(width.greater_elem(8.0 * machine_eps));
        let remaining: i64 = unconverged.int().sum().into_scalar().elem();
        if remaining == 0 {
            break;
        }

        let excess = total.clone().log() - log_target.clone();
        let above = excess.clone().greater_elem(0.0);
        hi = hi.clone().mask_where(above.clone(), a.clone());
        lo = a.clone().mask_where(above, lo);
        // Newton on ln f: (ln f)' = Σ_A y / (eps f).
        let step = excess * total / active_total.clamp_min(TINY) * eps;
        let newton = a.clone() - step;
        let midpoint = (lo.clone() + hi.clone()).div_scalar(2.0);
        let outside = newton
            .clone()
            .lower_equal(lo.clone())
            .bool_or(newton.clone().greater_equal(hi.clone()))
            .bool_or(newton.clone().is_nan());
        a = newton.mask_where(outside, midpoint);
    }
    let a = a.mask_where(saturated, saturated_threshold);
    let y = output(scores, a.clone(), eps, mask);
    (y, a, passes)
}

/// The implicit-function gradient with respect to the scores and to k.
pub(crate) fn backward<B: Backend>(
    scores: Tensor<B, 2>,
    mask: Option<&Tensor<B, 2, Bool>>,
    threshold: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (scores, _) = prepare(scores, mask);
    let active = (scores.clone() + threshold.clone()).lower_elem(0.0);
    let weights = output(scores, threshold, eps, mask).mask_fill(active.bool_not(), 0.0);
    let weight_total = weights.clone().sum_dim(1);
    let mean_grad = (weights.clone() * grad.clone()).sum_dim(1) / weight_total.clamp_min(TINY);
    let d_scores = (grad - mean_grad.clone()) * weights.div_scalar(eps);
    (d_scores, mean_grad)
}
