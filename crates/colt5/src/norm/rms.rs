//! RMSNorm as CoLT5 defines it.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{normalize, NormBackend, Normalization};

/// Configuration of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Size of the normalised (last) axis.
    pub dim: usize,
}

/// `y = x / max(‖x‖₂, 1e-12) · √dim · γ` over the last axis.
///
/// The epsilon bounds the L2 norm, not the mean square inside a root as in the usual
/// RMSNorm: the two differ only for inputs of norm below 1e-12, and this is the reference's.
/// PyTorch parameter: `gamma: [dim]` (initialised to ones).
///
/// Shapes: `[..., dim] → [..., dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::norm::RmsNormConfig;
///
/// let device = Default::default();
/// let norm = RmsNormConfig::new(16).init::<NdArray>(&device);
/// let x = Tensor::<NdArray, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(norm.forward(x).dims(), [2, 5, 16]);
/// ```
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-feature gain γ.
    pub gamma: Param<Tensor<B, 1>>,
}

impl RmsNormConfig {
    /// A norm with γ = 1.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            gamma: Param::from_tensor(Tensor::ones([self.dim], device)),
        }
    }
}

impl<B: NormBackend> RmsNorm<B> {
    /// Normalises `x` over its last axis (one fused kernel per direction on CubeCL
    /// backends).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        normalize(x, self.gamma.val(), None, Normalization::Rms { eps: EPS })
    }
}

/// The bound on the L2 norm (the reference's).
const EPS: f64 = 1e-12;
