//! Layer normalisation, PyTorch's `nn.LayerNorm` over the last axis.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{normalize, NormBackend, Normalization};

/// Configuration of [`LayerNorm`]; defaults are PyTorch's.
#[derive(Config, Debug)]
pub struct LayerNormConfig {
    /// Size of the normalised (last) axis.
    pub dim: usize,
    /// Added to the variance. Default 1e-5.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Whether the norm has a bias β. Default true.
    #[config(default = true)]
    pub bias: bool,
}

/// `y = (x − mean) / √(var + ε) · γ + β` over the last axis, the variance biased (as
/// PyTorch's). Same parameters as burn's `LayerNorm`; on CubeCL backends the forward and
/// the backward are one fused kernel each (see [`NormBackend`]).
///
/// PyTorch parameters: `weight: [dim]` (γ, initialised to ones), `bias: [dim]` (β, zeros).
///
/// Shapes: `[..., dim] → [..., dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::norm::LayerNormConfig;
///
/// let device = Default::default();
/// let norm = LayerNormConfig::new(16).init::<NdArray>(&device);
/// let x = Tensor::<NdArray, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(norm.forward(x).dims(), [2, 5, 16]);
/// ```
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Per-feature gain γ.
    pub gamma: Param<Tensor<B, 1>>,
    /// Per-feature bias β.
    pub beta: Option<Param<Tensor<B, 1>>>,
    /// Added to the variance.
    pub epsilon: f64,
}

impl LayerNormConfig {
    /// A norm with γ = 1 and β = 0.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        LayerNorm {
            gamma: Param::from_tensor(Tensor::ones([self.dim], device)),
            beta: self
                .bias
                .then(|| Param::from_tensor(Tensor::zeros([self.dim], device))),
            epsilon: self.epsilon,
        }
    }
}

impl<B: NormBackend> LayerNorm<B> {
    /// Normalises `x` over its last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        normalize(
            x,
            self.gamma.val(),
            self.beta.as_ref().map(|beta| beta.val()),
            Normalization::Layer { eps: self.epsilon },
        )
    }
}
