//! Normalisation over the last axis: CoLT5's [`RmsNorm`] and PyTorch's [`LayerNorm`].
//!
//! Composed of tensor operations, a layer norm is nine kernels forward and about twenty
//! backward under autodiff, each a pass over the activations. [`NormBackend`] lets a
//! backend run each direction as one fused kernel: CubeCL backends (CUDA, wgpu) run those of
//! `colt5-kernels`; the others compute the same function from tensor operations.

mod autodiff;
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

impl NormBackend for burn::backend::Flex {}

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
