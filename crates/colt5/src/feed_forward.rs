//! The CoLT5 feed-forward block.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::norm::{RmsNorm, RmsNormConfig};

/// Configuration of [`FeedForward`].
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    /// Model width.
    pub dim: usize,
    /// Hidden width as a multiple of `dim` (truncated: `int(dim · mult)`). Default 4.
    #[config(default = 4.0)]
    pub mult: f64,
}

/// `W₂ · gelu(W₁ · RMSNorm(x) + b₁) + b₂`, with the exact (erf) GELU.
///
/// PyTorch parameters (an `nn.Sequential`): `0.gamma`, `1.weight [hidden, dim]`, `1.bias`,
/// `3.weight [dim, hidden]`, `3.bias`.
///
/// Shapes: `[batch, seq, dim] → [batch, seq, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::feed_forward::FeedForwardConfig;
///
/// let device = Default::default();
/// let ff = FeedForwardConfig::new(16).init::<NdArray>(&device);
/// let x = Tensor::<NdArray, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(ff.forward(x).dims(), [2, 5, 16]);
/// ```
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Pre-normalisation.
    pub norm: RmsNorm<B>,
    /// `dim → hidden`.
    pub proj_in: Linear<B>,
    /// `hidden → dim`.
    pub proj_out: Linear<B>,
}

impl FeedForwardConfig {
    /// The hidden width, `int(dim · mult)`.
    pub fn hidden(&self) -> usize {
        (self.dim as f64 * self.mult) as usize
    }

    /// A block with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeedForward<B> {
        let hidden = self.hidden();
        FeedForward {
            norm: RmsNormConfig::new(self.dim).init(device),
            proj_in: LinearConfig::new(self.dim, hidden).init(device),
            proj_out: LinearConfig::new(hidden, self.dim).init(device),
        }
    }
}

impl<B: crate::norm::NormBackend> FeedForward<B> {
    /// Applies the block to every position.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::linear::by_chunks(x, |x| {
            let hidden = exact_gelu(crate::linear::apply(&self.proj_in, self.norm.forward(x)));
            crate::linear::apply(&self.proj_out, hidden)
        })
    }
}

/// GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))`, written with tensor operations so that autodiff
/// differentiates the exact function: burn 0.21's `gelu` computes the exact forward but the
/// derivative of the tanh approximation (gradients off by ~1e-4 relative).
pub(crate) fn exact_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x
        .clone()
        .mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
}
