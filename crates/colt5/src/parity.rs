//! Runs reference cases ([`golden`](crate::golden)) against our implementation and
//! measures the differences.
//!
//! Errors are relative, `max |ours − reference| / max |reference|`, and the tolerances are
//! those of the golden README: 1e-8 in f64; in f32, with e = min(eps, 1) of the coordinate
//! descent involved, 1e-5/e for outputs and 1e-4/e for gradients of the operator itself,
//! ten times that for modules built on it.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::AutodiffBackend, Bool, Tensor, TensorData};

use crate::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig, RowK};
use crate::golden::{Case, CaseTensor};

/// The floating-point precision a case is run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// `NdArray<f64>`.
    F64,
    /// `NdArray<f32>`.
    F32,
}

/// The difference between one of our tensors and the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The case key compared (`out.scores`, `grad.in.s`, ...).
    pub name: String,
    /// max |ours − reference|.
    pub max_abs: f64,
    /// max_abs / max |reference|.
    pub relative: f64,
    /// The largest relative error that passes.
    pub tolerance: f64,
}

impl Comparison {
    /// Whether the error is within tolerance (a NaN never is).
    pub fn ok(&self) -> bool {
        self.relative <= self.tolerance
    }
}

/// The result of running one case.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every output and gradient of the case, compared.
    Compared(Vec<Comparison>),
    /// The case's module is not implemented by this version of colt5.
    Unsupported,
}

impl Outcome {
    /// Whether every comparison passed (false when unsupported).
    pub fn passed(&self) -> bool {
        match self {
            Outcome::Compared(comparisons) => comparisons.iter().all(Comparison::ok),
            Outcome::Unsupported => false,
        }
    }
}

/// Runs `case` on the CPU backend in `precision`.
pub fn run_case(case: &Case, precision: Precision) -> crate::Result<Outcome> {
    match precision {
        Precision::F64 => run::<Autodiff<NdArray<f64>>>(case, precision),
        Precision::F32 => run::<Autodiff<NdArray<f32>>>(case, precision),
    }
}

fn run<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Outcome> {
    match case.module.as_str() {
        "coor_descent" => coor_descent_case::<B>(case, precision).map(Outcome::Compared),
        _ => Ok(Outcome::Unsupported),
    }
}

/// Relative tolerances (output, gradient) for a component whose coordinate descent runs at
/// temperature `eps` (`None`: no coordinate descent involved); `module` widens them tenfold.
fn tolerances(precision: Precision, eps: Option<f64>, module: bool) -> (f64, f64) {
    match precision {
        Precision::F64 => (1e-8, 1e-8),
        Precision::F32 => {
            let conditioning = eps.map_or(1.0, |eps| eps.min(1.0));
            let widen = if module { 10.0 } else { 1.0 };
            (1e-5 / conditioning * widen, 1e-4 / conditioning * widen)
        }
    }
}

fn coor_descent_case<B: AutodiffBackend + CoorDescentBackend>(
    case: &Case,
    precision: Precision,
) -> crate::Result<Vec<Comparison>> {
    let device = Default::default();
    let eps = case.config_f64("eps")?.unwrap_or(0.1);
    let n_iters = case.config_f64("n_iters")?.unwrap_or(0.0) as usize;
    let config = CoorDescentConfig::iterations(
        n_iters,
        eps,
        case.config_f64("eps_init")?,
        case.config_f64("eps_decay")?.unwrap_or(1.0),
    );
    let scores = float::<B, 2>(case.tensor("in.s")?, &device).require_grad();
    let mask = case.optional("in.mask").map(|m| mask::<B, 2>(m, &device));
    let k: RowK<B> = match case.optional("in.k") {
        Some(k) => RowK::PerRow(float::<B, 1>(k, &device)),
        None => RowK::Scalar(case.config_f64("k")?.unwrap_or(0.0)),
    };
    let output = coor_descent(scores.clone(), k, mask, &config)?;
    let cotangent = float::<B, 2>(case.tensor("cot.scores")?, &device);
    let grads = (output.clone() * cotangent).sum().backward();
    let d_scores = scores.grad(&grads).expect("scores require grad");

    let (out_tol, grad_tol) = tolerances(precision, Some(eps), false);
    Ok(vec![
        compare(
            "out.scores",
            output.into_data(),
            case.tensor("out.scores")?,
            out_tol,
        ),
        compare(
            "grad.in.s",
            d_scores.into_data(),
            case.tensor("grad.in.s")?,
            grad_tol,
        ),
    ])
}

fn float<B: burn::tensor::backend::Backend, const D: usize>(
    tensor: &CaseTensor,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(tensor.values.clone(), tensor.shape.clone())
            .convert::<burn::tensor::ops::FloatElem<B>>(),
        device,
    )
}

fn mask<B: burn::tensor::backend::Backend, const D: usize>(
    tensor: &CaseTensor,
    device: &B::Device,
) -> Tensor<B, D, Bool> {
    let values: Vec<bool> = tensor.values.iter().map(|&v| v != 0.0).collect();
    Tensor::from_data(TensorData::new(values, tensor.shape.clone()), device)
}

/// Compares our tensor with the reference's; a shape mismatch is an infinite error.
fn compare(name: &str, ours: TensorData, reference: &CaseTensor, tolerance: f64) -> Comparison {
    let shape_matches = ours.shape.iter().eq(reference.shape.iter());
    let ours: Vec<f64> = ours.convert::<f64>().to_vec().unwrap_or_default();
    let (max_abs, relative) = if shape_matches && ours.len() == reference.values.len() {
        let max_abs = ours
            .iter()
            .zip(&reference.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, |m: f64, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            });
        let scale = reference.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        (
            max_abs,
            if scale > 0.0 {
                max_abs / scale
            } else {
                max_abs
            },
        )
    } else {
        (f64::INFINITY, f64::INFINITY)
    };
    Comparison {
        name: name.to_string(),
        max_abs,
        relative,
        tolerance,
    }
}
