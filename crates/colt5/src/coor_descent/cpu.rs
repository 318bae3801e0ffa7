//! The iterative solver and its reverse sweep as one fused loop per row, for CPU backends:
//! the same arithmetic as `iterative.rs` (in f64), without a tensor per operation and
//! iteration. Rows are split across the available cores.

use super::exp::{exp_in_place, sum};
use super::iterative::Schedule;
use super::MASKED_SCORE;
use crate::parallel::parallel_rows;

/// Row-major `[rows, n]` inputs of one call.
pub(crate) struct Rows<'a> {
    pub scores: &'a [f64],
    pub n: usize,
    /// One k per row.
    pub k: &'a [f64],
    /// `[rows, n]`, true = valid.
    pub mask: Option<&'a [bool]>,
}

impl Rows<'_> {
    fn rows(&self) -> usize {
        self.k.len()
    }

    /// Row `r`'s selectable entries: their scores in `scores` and their columns in
    /// `columns`; returns their count. Masked entries are left out: set to [`MASKED_SCORE`],
    /// as the portable solver sets them, their terms of every partition sum and every
    /// gradient would be exactly 0, so leaving them out changes no value and halves the
    /// work of a causal mask. A row with no selectable entry returns 0 and leaves both
    /// empty (its outputs and gradients are 0).
    fn row(&self, r: usize, scores: &mut Vec<f64>, columns: &mut Vec<usize>) -> usize {
        let n = self.n;
        let row = &self.scores[r * n..(r + 1) * n];
        scores.clear();
        columns.clear();
        match self.mask {
            Some(mask) => {
                for (j, (&s, &keep)) in row.iter().zip(&mask[r * n..(r + 1) * n]).enumerate() {
                    if keep {
                        scores.push(s);
                        columns.push(j);
                    }
                }
            }
            None => {
                scores.extend_from_slice(row);
                columns.extend(0..n);
            }
        }
        scores.len()
    }
}

/// Σ_j exp((min(s_j, −a) − shift)/eps) and the shift min(max s, −a); the terms are left in
/// `terms`.
fn partition(scores: &[f64], row_max: f64, a: f64, eps: f64, terms: &mut Vec<f64>) -> (f64, f64) {
    let ceiling = -a;
    let shift = row_max.min(ceiling);
    terms.clear();
    terms.extend(scores.iter().map(|&s| (s.min(ceiling) - shift) / eps));
    exp_in_place(terms);
    (sum(terms), shift)
}

/// exp(min(s_j + a, 0) / eps) for each score, into `out`.
fn outputs(scores: &[f64], a: f64, eps: f64, out: &mut Vec<f64>) {
    out.clear();
    out.extend(scores.iter().map(|&s| (s + a).min(0.0) / eps));
    exp_in_place(out);
}

/// Fills `out` with a_1..a_T of one row of `valid` selectable scores; returns the row
/// maximum. `terms` is scratch space.
fn thresholds(
    scores: &[f64],
    valid: f64,
    k: f64,
    schedule: &Schedule,
    out: &mut [f64],
    terms: &mut Vec<f64>,
) -> f64 {
    let log_k = k.ln();
    let row_max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut a = schedule.iterations[0] * (log_k - valid.ln());
    out[0] = a;
    for (t, &eps) in schedule.iterations.iter().enumerate().skip(1) {
        let (total, shift) = partition(scores, row_max, a, eps, terms);
        a = eps * (log_k - total.ln()) - shift;
        out[t] = a;
    }
    row_max
}

/// The output y `[rows, n]` and thresholds a_1..a_T `[rows, T]`.
pub(crate) fn forward(input: &Rows, schedule: &Schedule) -> (Vec<f64>, Vec<f64>) {
    let (rows, n, steps) = (input.rows(), input.n, schedule.iterations.len());
    let mut y = vec![0.0; rows * n];
    let mut a = vec![0.0; rows * steps];
    parallel_rows(
        rows,
        [n, steps],
        [&mut y, &mut a],
        rows * n * steps,
        |first, [y, a]| {
            let mut scores = Vec::with_capacity(n);
            let mut columns = Vec::with_capacity(n);
            let mut terms = Vec::with_capacity(n);
            for (local, (y, a)) in y.chunks_mut(n).zip(a.chunks_mut(steps)).enumerate() {
                let r = first + local;
                let valid = input.row(r, &mut scores, &mut columns);
                if valid == 0 {
                    // Outputs stay 0; the thresholds are those of a row of masked scores.
                    let masked = vec![MASKED_SCORE; n];
                    thresholds(&masked, 1.0, input.k[r], schedule, a, &mut terms);
                    continue;
                }
                thresholds(&scores, valid as f64, input.k[r], schedule, a, &mut terms);
                outputs(&scores, a[steps - 1], schedule.output, &mut terms);
                for (&j, &out) in columns.iter().zip(&terms) {
                    y[j] = out;
                }
            }
        },
    );
    (y, a)
}

/// Gradients with respect to the scores `[rows, n]` and to k `[rows]`.
///
/// The thresholds are recomputed here in f64 rather than read from the forward: on an f32
/// backend those were rounded to f32, and the reverse sweep amplifies that rounding by
/// 1/eps through every iteration (a 5e-3 relative gradient error at eps 0.03). The
/// recomputation costs one forward sweep.
pub(crate) fn backward(input: &Rows, grad: &[f64], schedule: &Schedule) -> (Vec<f64>, Vec<f64>) {
    let (rows, n, steps) = (input.rows(), input.n, schedule.iterations.len());
    let mut d_scores = vec![0.0; rows * n];
    let mut d_k = vec![0.0; rows];
    parallel_rows(
        rows,
        [n, 1],
        [&mut d_scores, &mut d_k],
        rows * n * steps,
        |first, [ds, dk]| {
            let mut scores = Vec::with_capacity(n);
            let mut columns = Vec::with_capacity(n);
            let mut weights = Vec::with_capacity(n);
            let mut row_grad = vec![0.0; n];
            let mut a = vec![0.0; steps];
            for (local, (ds, dk)) in ds.chunks_mut(n).zip(dk.iter_mut()).enumerate() {
                let r = first + local;
                let valid = input.row(r, &mut scores, &mut columns);
                if valid == 0 {
                    continue; // no output depends on the scores or k
                }
                let valid = valid as f64;
                let row_max =
                    thresholds(&scores, valid, input.k[r], schedule, &mut a, &mut weights);
                let g = &grad[r * n..(r + 1) * n];
                let d_row = &mut row_grad[..scores.len()];
                let last = a[steps - 1];
                outputs(&scores, last, schedule.output, &mut weights);
                let mut d_a = 0.0;
                for (((d, &s), &j), &y) in d_row.iter_mut().zip(&scores).zip(&columns).zip(&weights)
                {
                    *d = match s + last <= 0.0 {
                        true => g[j] * y / schedule.output,
                        false => 0.0,
                    };
                    d_a += *d;
                }
                let mut d_log_k = d_a * schedule.iterations[steps - 1];
                for t in (2..=steps).rev() {
                    let eps = schedule.iterations[t - 1];
                    let ceiling = -a[t - 2];
                    let (total, _) = partition(&scores, row_max, a[t - 2], eps, &mut weights);
                    let mut mass_below = 0.0;
                    for ((d, &s), &w) in d_row.iter_mut().zip(&scores).zip(weights.iter()) {
                        if s <= ceiling {
                            let p = w / total;
                            mass_below += p;
                            *d -= p * d_a;
                        }
                    }
                    d_a *= 1.0 - mass_below;
                    d_log_k += d_a * schedule.iterations[t - 2];
                }
                for (&j, &d) in columns.iter().zip(d_row.iter()) {
                    ds[j] = d;
                }
                *dk = d_log_k / input.k[r];
            }
        },
    );
    (d_scores, d_k)
}
