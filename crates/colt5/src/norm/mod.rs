//! Normalisation over the last axis: CoLT5's [`RmsNorm`] and PyTorch's [`LayerNorm`].
//!
//! Composed of tensor operations, a layer norm is nine kernels forward and about twenty
//! backward under autodiff, each a pass over the activations. [`NormBackend`] lets a
//! backend run each direction as one fused kernel: CubeCL backends (CUDA, wgpu) run those of
//! `colt5-kernels`, `Flex` one loop per row (`cpu.rs`); the others (`NdArray`, which serves
//! the f64 golden parity) compute the same function from tensor operations.

mod autodiff;
mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;
mod layer;
mod rms;

pub use layer::{LayerNorm, LayerNormConfig};
pub use rms::{RmsNorm, RmsNormConfig};

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// What a normalisation computes: `x̂ = (x − mean) · scale`, then `y = x̂ · γ (+ β)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalization {
    /// PyTorch's LayerNorm: the row's mean, `scale = 1 / √(var + eps)` with the biased
    /// variance.
    Layer {
        /// Added to the variance.
        eps: f64,
    },
    /// CoLT5's RMSNorm: mean 0, `scale = √dim / max(‖x‖₂, eps)`.
    Rms {
        /// Lower bound of the row's L2 norm.
        eps: f64,
    },
}

/// Backends that may fuse a normalisation. Shapes: `x [rows, dim]`, `gamma` and `beta`
/// `[dim]`. The defaults fuse nothing.
pub trait NormBackend: crate::matmul::MatmulBackend {
    /// Whether [`fused_norm`](Self::fused_norm) has a kernel (callers skip preparing its
    /// input otherwise).
    const FUSES_NORM: bool = false;

    /// `y = x̂ · γ (+ β)` for every row, or `None` where the backend has no fused kernel
    /// (the caller then composes it from tensor operations). Autodiff backends record the
    /// operation for the backward pass.
    fn fused_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        kind: Normalization,
    ) -> Option<FloatTensor<Self>> {
        Self::norm_forward(x, gamma, beta, kind).map(|(y, _)| y)
    }

    /// `y` and each row's statistics for [`norm_backward`](Self::norm_backward) (`[rows,
    /// 3]`, f32), or `None` without a kernel.
    fn norm_forward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: Option<FloatTensor<Self>>,
        _kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// The input's gradient and the products `g · x̂` (`[rows, dim]` each; summed over the
    /// rows, the latter is the gain's gradient) given the forward's statistics and the
    /// output's gradient `grad`; `None` where [`norm_forward`](Self::norm_forward) gives
    /// none.
    fn norm_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _stats: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
}

impl_for_ndarray!(NormBackend {});

impl NormBackend for burn::backend::Flex {
    const FUSES_NORM: bool = true;

    fn norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        cpu::forward(x, gamma, beta, kind)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        cpu::backward(x, gamma, stats, grad, kind)
    }
}

/// `x̂ · γ (+ β)` over the last axis of `x`: the backend's fused kernel where it has one,
/// tensor operations otherwise.
pub fn normalize<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    kind: Normalization,
) -> Tensor<B, D> {
    if !B::FUSES_NORM {
        return composed(x, gamma, beta, kind);
    }
    let dims = x.dims();
    let dim = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let fused = B::fused_norm(
        x.clone().reshape([rows, dim]).into_primitive().tensor(),
        gamma.clone().into_primitive().tensor(),
        beta.clone().map(|beta| beta.into_primitive().tensor()),
        kind,
    );
    match fused {
        Some(y) => Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(dims),
        None => composed(x, gamma, beta, kind),
    }
}

/// [`normalize`] from tensor operations.
fn composed<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    kind: Normalization,
) -> Tensor<B, D> {
    let dim = x.dims()[D - 1];
    let x_hat = match kind {
        Normalization::Layer { eps } => {
            let centred = x.clone() - x.mean_dim(D - 1);
            let variance = centred.clone().square().mean_dim(D - 1);
            centred / variance.add_scalar(eps).sqrt()
        }
        Normalization::Rms { eps } => {
            let norm = x.clone().square().sum_dim(D - 1).sqrt().clamp_min(eps);
            x / norm * (dim as f64).sqrt()
        }
    };
    let y = x_hat * gamma.unsqueeze();
    match beta {
        Some(beta) => y + beta.unsqueeze(),
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::{LayerNormConfig, RmsNormConfig};
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::module::Param;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Tensor, TensorData};

    /// Deterministic values in (−2, 2).
    fn values<B: burn::tensor::backend::Backend, const D: usize>(
        seed: u64,
        shape: [usize; D],
    ) -> Tensor<B, D> {
        let count = shape.iter().product::<usize>();
        let data: Vec<f32> = (0..count as u64)
            .map(|i| (((i + 1) * (seed * 2 + 7919)) % 997) as f32 / 249.25 - 2.0)
            .collect();
        Tensor::from_data(TensorData::new(data, shape), &Default::default())
    }

    /// Output and the gradients of the input, the gain and the bias of sum(norm(x) · g), a
    /// zero row first (RMSNorm's constant scale).
    fn run<B: AutodiffBackend + super::NormBackend>(shape: [usize; 2], rms: bool) -> Vec<Vec<f64>>
    where
        B::InnerBackend: super::NormBackend,
    {
        let device = Default::default();
        let dim = shape[1];
        let x = values::<B, 2>(1, shape)
            .slice_assign([0..1, 0..dim], Tensor::zeros([1, dim], &device))
            .require_grad();
        let g = values::<B, 2>(2, shape);
        let gamma = Param::from_tensor(values::<B, 1>(3, [dim]));
        let (out, parameters) = if rms {
            let mut norm = RmsNormConfig::new(dim).init::<B>(&device);
            norm.gamma = gamma;
            (norm.forward(x.clone()), vec![norm.gamma.val()])
        } else {
            let mut norm = LayerNormConfig::new(dim).init::<B>(&device);
            norm.gamma = gamma;
            norm.beta = Some(Param::from_tensor(values::<B, 1>(4, [dim])));
            let parameters = vec![norm.gamma.val(), norm.beta.as_ref().unwrap().val()];
            (norm.forward(x.clone()), parameters)
        };
        let grads = (out.clone() * g).sum().backward();
        let read = |data: TensorData| data.convert::<f64>().to_vec::<f64>().unwrap();
        let mut all = vec![
            read(out.into_data()),
            read(x.grad(&grads).unwrap().into_data()),
        ];
        all.extend(
            parameters
                .iter()
                .map(|p| read(p.grad(&grads).unwrap().into_data())),
        );
        all
    }

    #[test]
    fn flex_fused_norms_match_the_composed_f64_norms() {
        // 300 × 517 rows: enough entries that the rows are split across threads.
        for shape in [[3, 5], [300, 517]] {
            for rms in [false, true] {
                let fused = run::<Autodiff<Flex>>(shape, rms);
                let composed = run::<Autodiff<NdArray<f64>>>(shape, rms);
                for (a, b) in fused.iter().zip(&composed) {
                    let scale = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
                    let error = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        error / scale < 1e-5,
                        "{shape:?} rms {rms}: {:e}",
                        error / scale
                    );
                }
            }
        }
    }
}
