//! The reference's fixed-iteration solver in its one-scalar-per-row form, and the exact
//! reverse sweep that differentiates it (`docs/soft-top-k.md`).
//!
//! Forward: with eps_1..eps_T the temperature schedule and eps_f the temperature after the
//! last update,
//!
//! ```text
//! a_1 = eps_1 (ln k − ln n_valid)
//! a_t = eps_t (ln k − LSE_j(min(s_j, −a_{t−1}) / eps_t))      t = 2..T
//! y_j = exp(min(s_j + a_T, 0) / eps_f)
//! ```
//!
//! Backward: given g = ∂L/∂y, with p^t = softmax(min(s, −a_{t−1})/eps_t) and
//! χ^t_j = [s_j ≤ −a_{t−1}], the adjoints run from ā_T = Σ_j g_j y_j/eps_f [s_j + a_T ≤ 0]
//! down to ā_1 with `ds −= ā_t p^t χ^t`, `ā_{t−1} = ā_t (1 − Σ_j p^t_j χ^t_j)`, and
//! dk = Σ_t ā_t eps_t / k. Only the T scalars a_t per row are kept between the passes.

use burn::tensor::{backend::Backend, Bool, Tensor};

use super::MASKED_SCORE;

/// The temperature of each iteration and the final one, resolved from the reference's
/// `eps`, `eps_init` and `eps_decay`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Schedule {
    /// eps_1..eps_T.
    pub iterations: Vec<f64>,
    /// The temperature after the last update, used for the output.
    pub output: f64,
}

impl Schedule {
    /// eps_1 = max(eps_init ?? eps, eps), eps_{t+1} = max(eps_t · decay, eps).
    pub fn new(n_iters: usize, eps: f64, eps_init: Option<f64>, eps_decay: f64) -> Self {
        let mut current = eps_init.unwrap_or(eps).max(eps);
        let mut iterations = Vec::with_capacity(n_iters);
        for _ in 0..n_iters {
            iterations.push(current);
            current = (current * eps_decay).max(eps);
        }
        Schedule {
            iterations,
            output: current,
        }
    }
}

/// Scores with masked entries replaced by [`MASKED_SCORE`], and the number of valid entries
/// per row (at least 1, so that fully masked rows stay finite; their output is zeroed).
pub(crate) fn prepare<B: Backend>(
    scores: Tensor<B, 2>,
    mask: Option<&Tensor<B, 2, Bool>>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [rows, n] = scores.dims();
    match mask {
        Some(mask) => {
            let n_valid = mask.clone().float().sum_dim(1).clamp_min(1.0);
            (
                scores.mask_fill(mask.clone().bool_not(), MASKED_SCORE),
                n_valid,
            )
        }
        None => {
            let n_valid = Tensor::full([rows, 1], n as f64, &scores.device());
            (scores, n_valid)
        }
    }
}

/// y_j = exp(min(s_j + a, 0) / eps), zero at masked entries.
pub(crate) fn output<B: Backend>(
    scores: Tensor<B, 2>,
    threshold: Tensor<B, 2>,
    eps: f64,
    mask: Option<&Tensor<B, 2, Bool>>,
) -> Tensor<B, 2> {
    let y = (scores + threshold).clamp_max(0.0).div_scalar(eps).exp();
    match mask {
        Some(mask) => y.mask_fill(mask.clone().bool_not(), 0.0),
        None => y,
    }
}

/// The softmax p^t of one iteration, given the previous threshold: the row maximum of
/// min(s, −a) is min(max s, −a), so `row_max` is computed once per call.
fn iteration_softmax<B: Backend>(
    scores: &Tensor<B, 2>,
    row_max: &Tensor<B, 2>,
    previous: Tensor<B, 2>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    let [rows, n] = scores.dims();
    let ceiling = previous.neg();
    let shift = row_max.clone().min_pair(ceiling.clone());
    let capped = scores.clone().min_pair(ceiling.clone().expand([rows, n]));
    let weights = (capped - shift.clone()).div_scalar(eps).exp();
    let total = weights.clone().sum_dim(1);
    (weights, total, shift)
}

/// Runs the iterations; returns the output y and the thresholds a_1..a_T as `[rows, T]`.
pub(crate) fn forward<B: Backend>(
    scores: Tensor<B, 2>,
    k: Tensor<B, 2>,
    mask: Option<&Tensor<B, 2, Bool>>,
    schedule: &Schedule,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (scores, n_valid) = prepare(scores, mask);
    let log_k = k.log();
    let row_max = scores.clone().max_dim(1);

    let mut thresholds = Vec::with_capacity(schedule.iterations.len());
    let mut a = (log_k.clone() - n_valid.log()).mul_scalar(schedule.iterations[0]);
    for &eps in &schedule.iterations[1..] {
        thresholds.push(a.clone());
        let (_, total, shift) = iteration_softmax(&scores, &row_max, a, eps);
        // a_t = eps (ln k − LSE) with LSE = shift/eps + ln Σ exp((min(s, −a) − shift)/eps).
        a = (log_k.clone() - total.log()).mul_scalar(eps) - shift;
    }
    thresholds.push(a.clone());
    let y = output(scores, a, schedule.output, mask);
    (y, Tensor::cat(thresholds, 1))
}

/// The exact reverse sweep: gradients with respect to the scores and to k.
pub(crate) fn backward<B: Backend>(
    scores: Tensor<B, 2>,
    k: Tensor<B, 2>,
    mask: Option<&Tensor<B, 2, Bool>>,
    thresholds: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    schedule: &Schedule,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (scores, _) = prepare(scores, mask);
    let [rows, _] = scores.dims();
    let steps = schedule.iterations.len();
    let threshold_at = |t: usize| thresholds.clone().slice([0..rows, t - 1..t]);

    let last = threshold_at(steps);
    let active = (scores.clone() + last.clone())
        .lower_equal_elem(0.0)
        .float();
    let y = output(scores.clone(), last, schedule.output, mask);
    let mut d_scores = (grad * y * active).div_scalar(schedule.output);
    let mut d_a = d_scores.clone().sum_dim(1);
    let mut d_log_k = d_a.clone().mul_scalar(schedule.iterations[steps - 1]);

    let row_max = scores.clone().max_dim(1);
    for t in (2..=steps).rev() {
        let eps = schedule.iterations[t - 1];
        let previous = threshold_at(t - 1);
        let below = scores
            .clone()
            .lower_equal(previous.clone().neg().expand(scores.dims()));
        let (weights, total, _) = iteration_softmax(&scores, &row_max, previous, eps);
        let p_below = (weights / total).mask_fill(below.bool_not(), 0.0);
        let mass_below = p_below.clone().sum_dim(1);
        d_scores = d_scores - p_below * d_a.clone();
        d_a = d_a * mass_below.neg().add_scalar(1.0);
        d_log_k = d_log_k + d_a.clone().mul_scalar(schedule.iterations[t - 2]);
    }
    let d_scores = match mask {
        Some(mask) => d_scores.mask_fill(mask.clone().bool_not(), 0.0),
        None => d_scores,
    };
    (d_scores, d_log_k / k)
}
