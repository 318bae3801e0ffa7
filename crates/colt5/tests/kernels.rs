//! The fused CubeCL kernels against the f64 CPU implementation: outputs and gradients over
//! a grid of shapes (1 to 300 007 columns, odd sizes, masks, per-row k, eps schedules).
//!
//! Built with `--features wgpu` (CI runs them on lavapipe, the software Vulkan driver) or
//! `--features cuda` (on an NVIDIA GPU): `cargo test -p colt5 --features cuda --test kernels`.
//! Only backends that report their multiprocessors (CUDA) split long rows across cubes, so
//! the split layouts are checked on a GPU.
#![cfg(any(feature = "cuda", feature = "wgpu"))]

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Bool, Tensor, TensorData};
use colt5::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig, RowK, Solver};

mod common;
use common::{normals, relative_error};

#[cfg(feature = "cuda")]
type Gpu = burn::backend::Cuda;
#[cfg(not(feature = "cuda"))]
type Gpu = burn::backend::Wgpu;

type Reference = Autodiff<NdArray<f64>>;

struct Case {
    rows: usize,
    n: usize,
    /// k (default n/8, at least 1); varied around it per row when `per_row_k`.
    k: Option<f64>,
    per_row_k: bool,
    masked: bool,
    config: CoorDescentConfig,
    seed: u64,
}

/// Output, gradient with respect to the scores and (per-row k) to k, of L = Σ y·g.
struct Result {
    scores: Vec<f64>,
    output: Vec<f64>,
    d_scores: Vec<f64>,
    d_k: Option<Vec<f64>>,
}

impl Case {
    fn k_values(&self) -> Vec<f64> {
        let base = self.k.unwrap_or((self.n as f64 / 8.0).max(1.0));
        (0..self.rows)
            .map(|r| match self.per_row_k {
                true => (base * (0.5 + (r % 3) as f64 * 0.4)).clamp(0.5, self.n as f64),
                false => base,
            })
            .collect()
    }

    fn mask_values(&self) -> Vec<bool> {
        // Every third row partly masked, row 1 fully masked (when there are 3 rows or more).
        (0..self.rows * self.n)
            .map(|i| {
                let (r, j) = (i / self.n, i % self.n);
                !(r % 3 == 0 && j % 5 == 2 || r == 1 && self.rows >= 3)
            })
            .collect()
    }

    fn run<B: CoorDescentBackend + burn::tensor::backend::AutodiffBackend>(
        &self,
        device: &B::Device,
    ) -> Result {
        let float = |values: Vec<f64>, shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(
                TensorData::new(values, shape).convert::<burn::tensor::ops::FloatElem<B>>(),
                device,
            )
        };
        let shape = [self.rows, self.n];
        // Both sides see the same f32-representable inputs, so the comparison measures the
        // arithmetic, not the rounding of the inputs.
        let draw = |seed, scale| -> Vec<f64> {
            normals(seed, self.rows * self.n, scale)
                .into_iter()
                .map(|v| v as f32 as f64)
                .collect()
        };
        let score_values = draw(self.seed, 3.0);
        let scores = float(score_values.clone(), shape).require_grad();
        let grad = float(draw(self.seed + 1, 1.0), shape);
        let k_values = self.k_values();
        let k_tensor = Tensor::<B, 1>::from_data(
            TensorData::new(k_values.clone(), [self.rows])
                .convert::<burn::tensor::ops::FloatElem<B>>(),
            device,
        )
        .require_grad();
        let k = match self.per_row_k {
            true => RowK::PerRow(k_tensor.clone()),
            false => RowK::Scalar(k_values[0]),
        };
        let mask = self.masked.then(|| {
            Tensor::<B, 2, Bool>::from_data(TensorData::new(self.mask_values(), shape), device)
        });
        let y = coor_descent(scores.clone(), k, mask, &self.config).unwrap();
        let grads = (y.clone() * grad).sum().backward();
        let values = |t: Tensor<B::InnerBackend, 2>| -> Vec<f64> {
            t.into_data().convert::<f64>().to_vec().unwrap()
        };
        Result {
            scores: score_values,
            output: values(y.inner()),
            d_scores: values(scores.grad(&grads).unwrap()),
            d_k: self.per_row_k.then(|| {
                k_tensor
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .convert::<f64>()
                    .to_vec()
                    .unwrap()
            }),
        }
    }
}

/// Whether each entry lies within `margin` of one of its row's update thresholds −a_t,
/// t < T (computed here in f64 from the reference's update; the converged solver has none):
/// the updates take min(s, −a_t), so the derivative with respect to s jumps there, and an
/// f32 and an f64 computation whose thresholds differ by rounding may take different sides.
/// (The output's own threshold −a_T is handled by [`check`]: there an entry's output
/// saturates at exactly 1 on one side.)
fn near_a_kink(case: &Case, scores: &[f64], margin: f64) -> Vec<bool> {
    let temperatures = case.config.temperatures();
    let keep = case.masked.then(|| case.mask_values());
    let k = case.k_values();
    let mut near = vec![false; scores.len()];
    for (row, row_scores) in scores.chunks(case.n).enumerate() {
        let valid = |j: usize| keep.as_ref().is_none_or(|keep| keep[row * case.n + j]);
        let live: Vec<f64> = (0..case.n)
            .filter(|&j| valid(j))
            .map(|j| row_scores[j])
            .collect();
        if live.is_empty() {
            continue;
        }
        let Some(temperatures) = &temperatures else {
            continue;
        };
        let mut ceilings = iterated_ceilings(&live, k[row], temperatures);
        ceilings.pop();
        for (j, &s) in row_scores.iter().enumerate() {
            near[row * case.n + j] = valid(j) && ceilings.iter().any(|c| (s - c).abs() < margin);
        }
    }
    near
}

/// The ceilings −a_0..−a_T of the iterative solver on one row's valid scores.
fn iterated_ceilings(live: &[f64], k: f64, temperatures: &[f64]) -> Vec<f64> {
    let row_max = live.iter().copied().fold(f64::MIN, f64::max);
    let log_k = k.ln();
    let mut a = temperatures[0] * (log_k - (live.len() as f64).ln());
    let mut ceilings = vec![-a];
    for &eps in &temperatures[1..temperatures.len() - 1] {
        let ceiling = -a;
        let shift = row_max.min(ceiling);
        let total: f64 = live
            .iter()
            .map(|&s| ((s.min(ceiling) - shift) / eps).exp())
            .sum();
        a = eps * (log_k - total.ln()) - shift;
        ceilings.push(-a);
    }
    ceilings
}

fn check(case: Case) {
    let gpu = case.run::<Autodiff<Gpu>>(&Default::default());
    let reference = case.run::<Reference>(&Default::default());
    let eps = case.config.eps;
    let output = relative_error(&gpu.output, &reference.output);
    // The score gradients are compared to the tolerance away from the kinks (f32 thresholds
    // carry errors of about 1e-6 of the scores' scale), and ten times more loosely at them:
    // a few entries per row (the k-th largest converges onto the threshold).
    let max_score = reference
        .scores
        .iter()
        .fold(1.0, |m: f64, s| m.max(s.abs()));
    // The f32 thresholds' errors grow with the updates that carry them (each passes its
    // error on with a factor at most 1, near 1 at the final temperature): about 1e-5 of the
    // scores' scale after 20 updates. The entries counted near them grow likewise.
    let updates = match case.config.solver {
        Solver::Iterations { n_iters, .. } => n_iters.max(20),
        Solver::Converged { .. } => 20,
    } as f64;
    let near = near_a_kink(
        &case,
        &reference.scores,
        1e-5 * (updates / 20.0).sqrt() * max_score,
    );
    let at_updates = near.iter().filter(|&&n| n).count();
    assert!(
        at_updates as f64 <= (8 * case.rows + near.len() / 1000) as f64 * updates / 20.0,
        "{at_updates} of {} entries lie near a threshold",
        near.len()
    );
    // An entry on opposite sides of the output's threshold −a_T in the two solves (the k-th
    // largest score converges onto it) is saturated at exactly 1 in one of them and not in
    // the other; its gradient then differs by g·y/eps, the whole scale, and through the
    // threshold's own gradient it shifts every gradient of its row, so that row's gradients
    // are not compared.
    let crossing = |i: usize| (gpu.output[i] == 1.0) != (reference.output[i] == 1.0);
    let at_output = (0..gpu.output.len()).filter(|&i| crossing(i)).count();
    assert!(
        at_output <= 8 * case.rows + near.len() / 1000,
        "{at_output} entries on opposite sides of the output's threshold"
    );
    let crossed_rows: Vec<bool> = (0..case.rows)
        .map(|row| (row * case.n..(row + 1) * case.n).any(crossing))
        .collect();
    let in_crossed_row: Vec<bool> = (0..gpu.output.len())
        .map(|i| crossed_rows[i / case.n])
        .collect();
    let only = |values: &[f64], at_kinks: bool| -> Vec<f64> {
        values
            .iter()
            .zip(near.iter().zip(&in_crossed_row))
            .map(|(&v, (&n, &f))| if n == at_kinks && !f { v } else { 0.0 })
            .collect()
    };
    let d_scores = relative_error(
        &only(&gpu.d_scores, false),
        &only(&reference.d_scores, false),
    );
    let kink_diff = only(&gpu.d_scores, true)
        .iter()
        .zip(only(&reference.d_scores, true))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let d_scores_at_kinks = kink_diff
        / reference
            .d_scores
            .iter()
            .fold(1e-6, |m: f64, v| m.max(v.abs()));
    println!(
        "{}×{} masked {} per-row k {} {:?} eps {eps}: output {output:.1e}, d_scores {d_scores:.1e} ({at_updates} entries at an update's threshold: {d_scores_at_kinks:.1e}; {at_output} across the output's: their rows not compared)",
        case.rows, case.n, case.masked, case.per_row_k, case.config.solver
    );
    assert!(
        d_scores_at_kinks < 1e-3 / eps,
        "score gradient error at the thresholds {d_scores_at_kinks:e}"
    );
    // ../shared/golden/README.md: f32 outputs 1e-5/eps, gradients 1e-4/eps (relative).
    assert!(output < 1e-5 / eps, "output error {output:e}");
    assert!(d_scores < 1e-4 / eps, "score gradient error {d_scores:e}");
    if let (Some(gpu), Some(reference)) = (gpu.d_k, reference.d_k) {
        let uncrossed = |values: &[f64]| -> Vec<f64> {
            values
                .iter()
                .zip(&crossed_rows)
                .map(|(&v, &crossed)| if crossed { 0.0 } else { v })
                .collect()
        };
        let d_k = relative_error(&uncrossed(&gpu), &uncrossed(&reference));
        assert!(d_k < 1e-4 / eps, "k gradient error {d_k:e}");
    }
    if case.masked {
        let mask = case.mask_values();
        for (i, keep) in mask.iter().enumerate() {
            if !keep {
                assert_eq!(gpu.output[i], 0.0, "masked output {i}");
                assert_eq!(gpu.d_scores[i], 0.0, "masked gradient {i}");
            }
        }
    }
}

fn router() -> CoorDescentConfig {
    router_iterations(20)
}

/// The router's schedule (eps 0.03 from 4, decay 0.7) over `n_iters` iterations.
fn router_iterations(n_iters: usize) -> CoorDescentConfig {
    CoorDescentConfig::iterations(n_iters, 0.03, Some(4.0), 0.7)
}

#[test]
fn kernels_match_the_cpu_implementation_over_shapes() {
    let shapes = [
        (1, 1),
        (3, 7),
        (5, 33),
        (4, 100),
        (9, 1000),
        (3, 2047),
        (2, 4097),
        (3, 10_001),
        (2, 65_536),
        // Rows split across cubes on a GPU: 4 pieces; 16 pieces, streamed in the backward.
        (3, 40_001),
        (1, 300_007),
    ];
    for (index, &(rows, n)) in shapes.iter().enumerate() {
        for (masked, per_row_k) in [(false, false), (true, true)] {
            check(Case {
                rows,
                n,
                k: None,
                per_row_k,
                masked,
                config: router(),
                seed: 100 + index as u64,
            });
        }
    }
}

/// The configurations of the reference's `bench_accuracy.py` (which measures its own f32
/// gradients at up to 2.5e-3 relative error at eps 0.03).
#[test]
fn kernels_are_accurate_at_small_eps_and_many_iterations() {
    let configs = [
        (128, 2048, 128.0, router(), false),
        (
            128,
            2048,
            128.0,
            CoorDescentConfig::iterations(50, 0.03, None, 1.0),
            false,
        ),
        (
            128,
            2048,
            128.0,
            CoorDescentConfig::iterations(50, 0.03, None, 1.0),
            true,
        ),
        (
            128,
            2048,
            128.0,
            CoorDescentConfig::iterations(50, 1.0, None, 1.0),
            true,
        ),
        (
            128,
            2048,
            128.0,
            CoorDescentConfig::iterations(100, 0.1, None, 1.0),
            false,
        ),
        (
            128,
            2048,
            128.0,
            CoorDescentConfig::iterations(100, 0.03, None, 1.0),
            false,
        ),
        (16, 16384, 2048.0, router(), false),
        // The router's schedule with 35 updates at its final temperature, run from bands;
        // the second splits each row into 4 cubes on a GPU.
        (16, 16384, 2048.0, router_iterations(50), false),
        (4, 40_001, 5000.0, router_iterations(50), true),
    ];
    for (index, (rows, n, k, config, masked)) in configs.into_iter().enumerate() {
        check(Case {
            rows,
            n,
            k: Some(k),
            per_row_k: false,
            masked,
            config,
            seed: 7 + index as u64,
        });
    }
}

#[test]
fn rows_beyond_one_grid_dimension_are_solved() {
    // More cubes than one grid dimension takes (65 535), whatever the plane size.
    check(Case {
        rows: 600_000,
        n: 2,
        k: None,
        per_row_k: false,
        masked: false,
        config: router(),
        seed: 11,
    });
}

/// The converged solver's kernel (each row stops on its own) against the f64 CPU solve, at
/// the default temperature and the router's.
#[test]
fn converged_kernel_matches_the_cpu_implementation() {
    let shapes = [
        (3, 7),
        (5, 33),
        (9, 1000),
        (3, 10_001),
        (2, 65_536),
        (16, 16_384),
        (3, 40_001),
    ];
    for (index, &(rows, n)) in shapes.iter().enumerate() {
        for (masked, per_row_k) in [(false, false), (true, true)] {
            for eps in [0.1, 0.03] {
                check(Case {
                    rows,
                    n,
                    k: None,
                    per_row_k,
                    masked,
                    config: CoorDescentConfig::new()
                        .with_eps(eps)
                        .with_solver(Solver::converged()),
                    seed: 200 + index as u64,
                });
            }
        }
    }
}

/// The device's top-k selects exactly: for each row the positions of the k largest values,
/// largest first, the lower position first among equal values (the expected order is
/// computed here by a stable sort). Values are rounded to a coarse grid on some rows so
/// that ties straddle the k-th place, and include negative numbers, zeros of both signs
/// and the largest floats.
#[test]
fn top_k_selects_the_largest_in_order() {
    use colt5::coor_descent::top_k_indices;
    let device = Default::default();
    for (rows, n, k, seed) in [
        (1, 65_536, 4096, 1),
        (3, 1000, 7, 2),
        (257, 64, 16, 3),
        (5, 17, 17, 4),
        (2, 33, 1, 5),
        (4, 5000, 1000, 6),
    ] {
        let mut values: Vec<f32> = normals(seed, rows * n, 2.0)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        for (row, chunk) in values.chunks_mut(n).enumerate() {
            match row % 3 {
                // Few distinct values: many ties at the k-th place.
                1 => chunk.iter_mut().for_each(|v| *v = v.round()),
                2 => {
                    chunk[0] = -0.0;
                    chunk[n / 2] = 0.0;
                    chunk[n - 1] = f32::MAX;
                    if n > 3 {
                        chunk[1] = f32::MIN;
                    }
                }
                _ => {}
            }
        }
        let tensor =
            Tensor::<Gpu, 2>::from_data(TensorData::new(values.clone(), [rows, n]), &device);
        let got: Vec<i64> = top_k_indices(tensor, k)
            .unwrap()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        for (row, chunk) in values.chunks(n).enumerate() {
            let mut order: Vec<usize> = (0..n).collect();
            // -0.0 and 0.0 are ordered by sign, as the kernel's keys order them.
            order.sort_by(|&a, &b| chunk[b].total_cmp(&chunk[a]));
            let expected: Vec<i64> = order[..k].iter().map(|&j| j as i64).collect();
            assert_eq!(
                &got[row * k..(row + 1) * k],
                &expected[..],
                "{rows} x {n}, k = {k}: row {row}"
            );
        }
    }
}
