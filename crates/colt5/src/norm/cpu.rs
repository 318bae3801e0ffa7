//! [`NormBackend`](super::NormBackend) on `Flex`: the normalisation of a row and its
//! backward as one loop each, in f32 with f64 sums, rows split across the cores. The same
//! arithmetic as the CubeCL kernels (`colt5-kernels/src/norm.rs`), the statistics laid out
//! alike: mean, scale and whether the scale depends on the row.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::Normalization;
use crate::parallel::parallel_rows;

/// Statistics kept per row (as the kernels' `NORM_STATS`).
const STATS: usize = 3;

/// The contiguous f32 values of a 2-D (`[rows, dim]`) or 1-D tensor, with its dims, or
/// `None` for other element types.
fn values(tensor: &FlexTensor) -> Option<(FlexTensor, Vec<usize>)> {
    (tensor.dtype() == DType::F32).then(|| {
        (
            tensor.clone().to_contiguous(),
            tensor.layout().shape().to_vec(),
        )
    })
}

/// `y` and the rows' statistics of `x: [rows, dim]`.
pub(super) fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: Option<FlexTensor>,
    kind: Normalization,
) -> Option<(FlexTensor, FlexTensor)> {
    let ((x, dims), (gamma, _)) = (values(&x)?, values(&gamma)?);
    let beta = match beta {
        Some(beta) => Some(values(&beta)?.0),
        None => None,
    };
    let [rows, dim] = <[usize; 2]>::try_from(dims).ok()?;
    let (x, gamma) = (x.as_slice::<f32>()?, gamma.as_slice::<f32>()?);
    let beta = match &beta {
        Some(beta) => Some(beta.as_slice::<f32>()?),
        None => None,
    };
    let mut y = vec![0f32; rows * dim];
    let mut stats = vec![0f32; rows * STATS];
    if dim > 0 {
        parallel_rows(
            rows,
            [dim, STATS],
            [&mut y, &mut stats],
            rows * dim,
            |first, [y, stats]| {
                for (r, (y, stats)) in y.chunks_mut(dim).zip(stats.chunks_mut(STATS)).enumerate() {
                    let row = &x[(first + r) * dim..][..dim];
                    let (mean, scale, active) = statistics(row, kind);
                    for (j, out) in y.iter_mut().enumerate() {
                        let value = (row[j] - mean) * scale * gamma[j];
                        *out = beta.map_or(value, |beta| value + beta[j]);
                    }
                    stats.copy_from_slice(&[mean, scale, active]);
                }
            },
        );
    }
    Some((
        FlexTensor::from_data(TensorData::new(y, [rows, dim])),
        FlexTensor::from_data(TensorData::new(stats, [rows, STATS])),
    ))
}

/// The mean, the scale and whether the scale depends on the row (1) or is RMSNorm's
/// constant for a norm below eps (0).
fn statistics(row: &[f32], kind: Normalization) -> (f32, f32, f32) {
    let dim = row.len() as f64;
    let mean = match kind {
        Normalization::Layer { .. } => row.iter().map(|&v| v as f64).sum::<f64>() / dim,
        Normalization::Rms { .. } => 0.0,
    };
    let squares: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
    match kind {
        Normalization::Layer { eps } => (
            mean as f32,
            (1.0 / (squares / dim + eps).sqrt()) as f32,
            1.0,
        ),
        Normalization::Rms { eps } => {
            let norm = squares.sqrt();
            let active = if norm <= eps { 0.0 } else { 1.0 };
            (0.0, (dim.sqrt() / norm.max(eps)) as f32, active)
        }
    }
}

/// The input's gradient and the products `g · x̂` given the forward's statistics.
pub(super) fn backward(
    x: FlexTensor,
    gamma: FlexTensor,
    stats: FlexTensor,
    grad: FlexTensor,
    kind: Normalization,
) -> Option<(FlexTensor, FlexTensor)> {
    let ((x, dims), (gamma, _)) = (values(&x)?, values(&gamma)?);
    let ((stats, _), (grad, _)) = (values(&stats)?, values(&grad)?);
    let [rows, dim] = <[usize; 2]>::try_from(dims).ok()?;
    let (x, gamma) = (x.as_slice::<f32>()?, gamma.as_slice::<f32>()?);
    let (stats, grad) = (stats.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let centred = matches!(kind, Normalization::Layer { .. });
    let mut dx = vec![0f32; rows * dim];
    let mut grad_x_hat = vec![0f32; rows * dim];
    if dim > 0 {
        let work = |first: usize, [dx, grad_x_hat]: [&mut [f32]; 2]| {
            let rows = dx.chunks_mut(dim).zip(grad_x_hat.chunks_mut(dim));
            for (r, (dx, grad_x_hat)) in rows.enumerate() {
                let at = (first + r) * dim;
                let (row, g) = (&x[at..][..dim], &grad[at..][..dim]);
                let [mean, scale, active] = [0, 1, 2].map(|i| stats[(first + r) * STATS + i]);
                let x_hat = |j: usize| (row[j] - mean) * scale;
                let (mut h_sum, mut h_x_hat_sum) = (0f64, 0f64);
                for j in 0..dim {
                    let h = (g[j] * gamma[j]) as f64;
                    h_sum += h;
                    h_x_hat_sum += h * x_hat(j) as f64;
                }
                let h_mean = if centred {
                    (h_sum / dim as f64) as f32
                } else {
                    0.0
                };
                let h_x_hat_mean = (h_x_hat_sum / dim as f64) as f32 * active;
                for j in 0..dim {
                    let h = g[j] * gamma[j];
                    dx[j] = scale * (h - h_mean - x_hat(j) * h_x_hat_mean);
                    grad_x_hat[j] = g[j] * x_hat(j);
                }
            }
        };
        parallel_rows(
            rows,
            [dim, dim],
            [&mut dx, &mut grad_x_hat],
            rows * dim,
            work,
        );
    }
    Some((
        FlexTensor::from_data(TensorData::new(dx, [rows, dim])),
        FlexTensor::from_data(TensorData::new(grad_x_hat, [rows, dim])),
    ))
}
