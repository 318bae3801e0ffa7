//! Properties, gradients and input errors of the coordinate-descent soft top-k.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Bool, Tensor, TensorData};
use colt5::coor_descent::{coor_descent, coor_descent_with_stats, CoorDescentConfig, RowK, Solver};
use colt5::Error;
use proptest::prelude::*;

mod common;
use common::normals;

type F64 = NdArray<f64>;
type F64Grad = Autodiff<NdArray<f64>>;
type F32Grad = Autodiff<NdArray<f32>>;

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(
    values: Vec<f64>,
    shape: [usize; D],
) -> Tensor<B, D> {
    let data = TensorData::new(values, shape).convert::<burn::tensor::ops::FloatElem<B>>();
    Tensor::from_data(data, &Default::default())
}

fn bool_tensor<B: burn::tensor::backend::Backend, const D: usize>(
    values: Vec<bool>,
    shape: [usize; D],
) -> Tensor<B, D, Bool> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// A gradient check: analytic gradients of L = Σ y·g with respect to s (and k when per
/// row) against central differences in f64.
struct GradCheck {
    rows: usize,
    n: usize,
    k: Vec<f64>,
    mask: Option<Vec<bool>>,
    config: CoorDescentConfig,
    /// Standard deviation of the random scores.
    scale: f64,
}

impl GradCheck {
    fn loss(&self, s: &[f64], k: &[f64], g: &[f64]) -> f64 {
        let mask = self
            .mask
            .clone()
            .map(|m| bool_tensor::<F64, 2>(m, [self.rows, self.n]));
        let y = coor_descent(
            tensor::<F64, 2>(s.to_vec(), [self.rows, self.n]),
            RowK::PerRow(tensor::<F64, 1>(k.to_vec(), [self.rows])),
            mask,
            &self.config,
        )
        .unwrap();
        values(y).iter().zip(g).map(|(y, g)| y * g).sum()
    }

    /// Returns the largest relative error of ds and of dk.
    fn run(&self, seed: u64) -> (f64, f64) {
        let s = normals(seed, self.rows * self.n, self.scale);
        let g = normals(seed + 1, self.rows * self.n, 1.0);
        let scores = tensor::<F64Grad, 2>(s.clone(), [self.rows, self.n]).require_grad();
        let k = tensor::<F64Grad, 1>(self.k.clone(), [self.rows]).require_grad();
        let mask = self
            .mask
            .clone()
            .map(|m| bool_tensor::<F64Grad, 2>(m, [self.rows, self.n]));
        let y = coor_descent(scores.clone(), RowK::PerRow(k.clone()), mask, &self.config).unwrap();
        let grads = (y * tensor::<F64Grad, 2>(g.clone(), [self.rows, self.n]))
            .sum()
            .backward();
        let ds = values(scores.grad(&grads).unwrap());
        let dk = values(k.grad(&grads).unwrap());

        let h = 1e-6;
        let numeric = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        let ds_fd: Vec<f64> = (0..s.len())
            .map(|i| {
                numeric(&|d| {
                    let mut s2 = s.clone();
                    s2[i] += d;
                    self.loss(&s2, &self.k, &g)
                })
            })
            .collect();
        let dk_fd: Vec<f64> = (0..self.rows)
            .map(|r| {
                numeric(&|d| {
                    let mut k2 = self.k.clone();
                    k2[r] += d;
                    self.loss(&s, &k2, &g)
                })
            })
            .collect();
        (relative_error(&ds, &ds_fd), relative_error(&dk, &dk_fd))
    }
}

fn relative_error(ours: &[f64], reference: &[f64]) -> f64 {
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    ours.iter()
        .zip(reference)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// `tolerance` bounds the relative error of ds and dk against central differences.
fn check_gradients(config: CoorDescentConfig, masked: bool, tolerance: f64) {
    // Scores spread over many temperatures, so that entries are saturated, active and
    // negligible, except for the converged solver: its gradient vanishes on rows with a
    // single active entry, so keep several entries active there.
    let scale = match config.solver {
        Solver::Iterations { .. } => 2.0,
        Solver::Converged { .. } => 10.0 * config.eps,
    };
    let (rows, n) = (3, 17);
    let mask = masked.then(|| (0..rows * n).map(|i| i % 5 != 2 && i != 3).collect());
    let check = GradCheck {
        rows,
        n,
        // Non-integer k: at an integer k with well-separated scores and small eps the row sits on
        // a kink (the k-th entry at saturation) that a finite difference would straddle.
        k: vec![2.5, 4.5, 7.25],
        mask,
        config,
        scale,
    };
    let (ds, dk) = check.run(7);
    assert!(ds < tolerance, "ds relative error {ds:e}");
    assert!(dk < tolerance, "dk relative error {dk:e}");
}

#[test]
fn iterative_gradients_match_finite_differences() {
    check_gradients(
        CoorDescentConfig::iterations(20, 0.1, None, 1.0),
        false,
        1e-6,
    );
    check_gradients(
        CoorDescentConfig::iterations(20, 0.1, None, 1.0),
        true,
        1e-6,
    );
}

#[test]
fn iterative_gradients_with_eps_schedule_match_finite_differences() {
    check_gradients(
        CoorDescentConfig::iterations(20, 0.03, Some(4.0), 0.7),
        true,
        1e-6,
    );
}

#[test]
fn iterative_gradients_at_many_iterations_and_small_eps_match_finite_differences() {
    check_gradients(
        CoorDescentConfig::iterations(120, 0.03, None, 1.0),
        false,
        1e-6,
    );
    check_gradients(
        CoorDescentConfig::iterations(100, 0.2, Some(2.0), 0.9),
        true,
        1e-6,
    );
}

#[test]
fn converged_gradients_match_finite_differences() {
    let converged = Solver::Converged {
        tolerance: 1e-13,
        max_passes: 200,
    };
    // The forward is solved to ~1e-13; central differences with h = 1e-6 magnify that
    // residual to ~1e-7 of the gradient's scale.
    check_gradients(
        CoorDescentConfig::new().with_solver(converged.clone()),
        false,
        1e-5,
    );
    check_gradients(
        CoorDescentConfig::new()
            .with_eps(0.03)
            .with_solver(converged),
        true,
        1e-5,
    );
}

/// f32 gradients against f64 at eps 0.03, where the reference in f32 is off by up to 2.5e-3.
#[test]
fn f32_gradients_are_accurate_at_small_eps() {
    let (rows, n) = (128, 2048);
    let s = normals(11, rows * n, 3.0);
    let g = normals(12, rows * n, 1.0);
    let gradient = |config: &CoorDescentConfig, f32: bool| -> Vec<f64> {
        if f32 {
            let scores = tensor::<F32Grad, 2>(s.clone(), [rows, n]).require_grad();
            let y = coor_descent(scores.clone(), 128.0, None, config).unwrap();
            let grads = (y * tensor::<F32Grad, 2>(g.clone(), [rows, n]))
                .sum()
                .backward();
            values(scores.grad(&grads).unwrap())
        } else {
            let scores = tensor::<F64Grad, 2>(s.clone(), [rows, n]).require_grad();
            let y = coor_descent(scores.clone(), 128.0, None, config).unwrap();
            let grads = (y * tensor::<F64Grad, 2>(g.clone(), [rows, n]))
                .sum()
                .backward();
            values(scores.grad(&grads).unwrap())
        }
    };
    for config in [
        CoorDescentConfig::iterations(20, 0.03, Some(4.0), 0.7),
        CoorDescentConfig::iterations(50, 0.03, None, 1.0),
    ] {
        let error = relative_error(&gradient(&config, true), &gradient(&config, false));
        println!(
            "f32 vs f64 gradient, {:?}: relative error {error:.2e}",
            config.solver
        );
        assert!(error < 1e-4, "{error:e}");
    }
}

#[test]
fn masked_entries_and_fully_masked_rows_are_zero_with_zero_gradient() {
    let s = normals(3, 2 * 8, 1.0);
    let mut mask = vec![true; 16];
    mask[1] = false;
    mask[5] = false;
    for m in &mut mask[8..] {
        *m = false;
    }
    for solver in [Solver::iterations(20), Solver::converged()] {
        let config = CoorDescentConfig::new().with_solver(solver);
        let scores = tensor::<F64Grad, 2>(s.clone(), [2, 8]).require_grad();
        let y = coor_descent(
            scores.clone(),
            2.0,
            Some(bool_tensor::<F64Grad, 2>(mask.clone(), [2, 8])),
            &config,
        )
        .unwrap();
        let grads = y.clone().sum().backward();
        let y = values(y);
        let ds = values(scores.grad(&grads).unwrap());
        for i in 0..16 {
            assert!(y[i].is_finite() && ds[i].is_finite());
            if !mask[i] {
                assert_eq!(y[i], 0.0, "output at masked entry {i}");
                assert_eq!(ds[i], 0.0, "gradient at masked entry {i}");
            }
        }
    }
}

#[test]
fn fewer_valid_entries_than_k_saturate_every_valid_entry() {
    let s = normals(4, 10, 1.0);
    let mask: Vec<bool> = (0..10).map(|i| i < 3).collect();
    for solver in [Solver::iterations(30), Solver::converged()] {
        let config = CoorDescentConfig::new().with_solver(solver);
        let y = coor_descent(
            tensor::<F64, 2>(s.clone(), [1, 10]),
            5.0,
            Some(bool_tensor::<F64, 2>(mask.clone(), [1, 10])),
            &config,
        )
        .unwrap();
        let y = values(y);
        assert!(y[..3].iter().all(|&v| (v - 1.0).abs() < 1e-12), "{y:?}");
        assert!(y[3..].iter().all(|&v| v == 0.0), "{y:?}");
    }
}

#[test]
fn broadcast_mask_and_per_row_k_on_three_dimensional_scores() {
    let s = normals(5, 2 * 3 * 16, 1.0);
    let mask: Vec<bool> = (0..32).map(|i| i % 16 < 12).collect();
    let k = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let config = CoorDescentConfig::new().with_solver(Solver::converged());
    let y = coor_descent(
        tensor::<F64, 3>(s.clone(), [2, 3, 16]),
        RowK::PerRow(tensor::<F64, 1>(k.clone(), [6])),
        Some(bool_tensor::<F64, 3>(mask, [2, 1, 16])),
        &config,
    )
    .unwrap();
    assert_eq!(y.dims(), [2, 3, 16]);
    let y = values(y);
    for (row, chunk) in y.chunks(16).enumerate() {
        let total: f64 = chunk.iter().sum();
        assert!((total - k[row]).abs() < 1e-5 * k[row], "row {row}: {total}");
        assert!(chunk[12..].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn many_iterations_reach_the_converged_solution() {
    let s = normals(6, 4 * 40, 1.0);
    let solve = |solver: Solver| {
        let config = CoorDescentConfig::new().with_eps(0.2).with_solver(solver);
        values(coor_descent(tensor::<F64, 2>(s.clone(), [4, 40]), 6.0, None, &config).unwrap())
    };
    let iterated = solve(Solver::iterations(2000));
    let converged = solve(Solver::Converged {
        tolerance: 1e-14,
        max_passes: 200,
    });
    let error = relative_error(&iterated, &converged);
    assert!(error < 1e-9, "{error:e}");
}

#[test]
fn converged_solver_needs_few_passes() {
    let s = normals(8, 64 * 2048, 3.0);
    let config = CoorDescentConfig::new()
        .with_eps(0.03)
        .with_solver(Solver::converged());
    let (y, stats) =
        coor_descent_with_stats(tensor::<F64, 2>(s, [64, 2048]), 256.0, None, &config).unwrap();
    let worst = values(y.sum_dim(1))
        .iter()
        .fold(0.0f64, |m, total| m.max((total / 256.0 - 1.0).abs()));
    println!(
        "converged solver: {} passes, worst |Σy/k − 1| = {worst:.1e}",
        stats.passes
    );
    assert!(worst <= 1e-6, "{worst:e}");
    assert!(stats.passes <= 30, "{} passes", stats.passes);
}

fn error_of(
    scores: Vec<f64>,
    shape: [usize; 2],
    k: RowK<F64>,
    mask: Option<Tensor<F64, 2, Bool>>,
    config: CoorDescentConfig,
) -> Error {
    coor_descent(tensor::<F64, 2>(scores, shape), k, mask, &config).unwrap_err()
}

#[test]
fn bad_input_gives_typed_errors() {
    let ok = || vec![0.5; 8];
    let cfg = CoorDescentConfig::new;
    assert!(matches!(
        error_of(
            ok(),
            [2, 4],
            2.0.into(),
            None,
            CoorDescentConfig::iterations(0, 0.1, None, 1.0)
        ),
        Error::InvalidConfig {
            name: "n_iters",
            ..
        }
    ));
    assert!(matches!(
        error_of(ok(), [2, 4], 2.0.into(), None, cfg().with_eps(0.0)),
        Error::InvalidConfig { name: "eps", .. }
    ));
    assert!(matches!(
        error_of(
            ok(),
            [2, 4],
            2.0.into(),
            None,
            CoorDescentConfig::iterations(5, 0.1, None, 1.5)
        ),
        Error::InvalidConfig {
            name: "eps_decay",
            ..
        }
    ));
    let mut nan = ok();
    nan[3] = f64::NAN;
    nan[5] = f64::INFINITY;
    assert_eq!(
        error_of(nan, [2, 4], 2.0.into(), None, cfg()),
        Error::NonFinite {
            name: "scores",
            count: 2
        }
    );
    assert!(matches!(
        error_of(ok(), [2, 4], 0.0.into(), None, cfg()),
        Error::NonPositiveK { .. }
    ));
    assert_eq!(
        error_of(
            ok(),
            [2, 4],
            RowK::PerRow(tensor::<F64, 1>(vec![2.0, 5.0], [2])),
            None,
            cfg()
        ),
        Error::KExceedsRow {
            k: 5.0,
            n: 4,
            row: 1
        }
    );
    assert!(matches!(
        error_of(
            ok(),
            [2, 4],
            RowK::PerRow(tensor::<F64, 1>(vec![2.0; 3], [3])),
            None,
            cfg()
        ),
        Error::Shape { name: "k", .. }
    ));
    assert!(matches!(
        error_of(
            ok(),
            [2, 4],
            2.0.into(),
            Some(bool_tensor::<F64, 2>(vec![true; 6], [2, 3])),
            cfg()
        ),
        Error::Shape { name: "mask", .. }
    ));
    let message = error_of(ok(), [2, 4], 9.0.into(), None, cfg()).to_string();
    assert!(
        message.contains("k = 9") && message.contains("row length 4"),
        "{message}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn outputs_lie_in_the_unit_interval_and_masked_entries_are_zero(
        seed in 0u64..10_000,
        rows in 1usize..4,
        n in 1usize..40,
        k_fraction in 0.05f64..1.0,
        eps in 0.02f64..2.0,
        converged in any::<bool>(),
    ) {
        let s = normals(seed, rows * n, 4.0);
        let mask: Vec<bool> = normals(seed + 9, rows * n, 1.0).iter().map(|v| *v > -0.8).collect();
        let k = (k_fraction * n as f64).max(0.5);
        let solver = if converged { Solver::converged() } else { Solver::Iterations { n_iters: 20, eps_init: Some(4.0), eps_decay: 0.7 } };
        let config = CoorDescentConfig::new().with_eps(eps).with_solver(solver);
        let y = values(coor_descent(
            tensor::<F64, 2>(s, [rows, n]),
            k,
            Some(bool_tensor::<F64, 2>(mask.clone(), [rows, n])),
            &config,
        ).unwrap());
        for (v, keep) in y.iter().zip(&mask) {
            prop_assert!((0.0..=1.0).contains(v), "{v}");
            if !keep { prop_assert_eq!(*v, 0.0); }
        }
    }

    #[test]
    fn converged_rows_sum_to_k(
        seed in 0u64..10_000,
        n in 2usize..300,
        k_fraction in 0.01f64..1.0,
        eps in 0.01f64..3.0,
        scale in 0.1f64..10.0,
    ) {
        let s = normals(seed, 2 * n, scale);
        let k = (k_fraction * n as f64).max(1.0);
        let config = CoorDescentConfig::new().with_eps(eps).with_solver(Solver::converged());
        let y = coor_descent(tensor::<F32Grad, 2>(s, [2, n]), k, None, &config).unwrap();
        for total in values(y.sum_dim(1)) {
            prop_assert!((total - k).abs() <= 1e-4 * k, "Σy = {total}, k = {k}");
        }
    }
}
