//! Multi-head self-attention.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::attend::{Attend, AttendConfig};
use crate::error::Error;
use crate::norm::{RmsNorm, RmsNormConfig};

/// Configuration of [`SelfAttention`].
#[derive(Config, Debug)]
pub struct SelfAttentionConfig {
    /// Model width.
    pub dim: usize,
    /// Width of each head. Default 64.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Number of heads. Default 8.
    #[config(default = 8)]
    pub heads: usize,
    /// Normalise the input with RMSNorm first. Default false.
    #[config(default = false)]
    pub prenorm: bool,
}

/// Full (non-causal) multi-head self-attention without biases.
///
/// PyTorch parameters: `norm.gamma [dim]` (with `prenorm`), `to_qkv.weight
/// [3·heads·dim_head, dim]` (queries, keys, values in that order, heads inside),
/// `to_out.weight [dim, heads·dim_head]`.
///
/// Shapes: `[batch, seq, dim] → [batch, seq, dim]`.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// Optional pre-normalisation.
    pub norm: Option<RmsNorm<B>>,
    /// Joint query/key/value projection.
    pub to_qkv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    attend: Attend,
    heads: usize,
}

impl SelfAttentionConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SelfAttention<B> {
        let inner = self.heads * self.dim_head;
        SelfAttention {
            norm: self
                .prenorm
                .then(|| RmsNormConfig::new(self.dim).init(device)),
            to_qkv: LinearConfig::new(self.dim, 3 * inner)
                .with_bias(false)
                .init(device),
            to_out: LinearConfig::new(inner, self.dim)
                .with_bias(false)
                .init(device),
            attend: AttendConfig::new().init(),
            heads: self.heads,
        }
    }
}

impl<B: Backend> SelfAttention<B> {
    /// Attends every position to every position.
    pub fn forward(&self, x: Tensor<B, 3>) -> crate::Result<Tensor<B, 3>> {
        let [batch, seq, dim] = x.dims();
        let expected = self.to_qkv.weight.dims()[0];
        if dim != expected {
            return Err(Error::Shape {
                name: "x",
                actual: vec![batch, seq, dim],
                expected: format!("[batch, seq, {expected}]"),
            });
        }
        let x = match &self.norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        let [q, k, v] = split_heads(self.to_qkv.forward(x), self.heads);
        let out = self.attend.forward(q, k, v, None)?;
        Ok(self.to_out.forward(merge_heads(out)))
    }
}

/// `[batch, seq, P·heads·dim_head]` → `P` tensors `[batch, heads, seq, dim_head]`, the
/// layout of PyTorch's `chunk(P, dim=-1)` followed by `b n (h d) -> b h n d`.
pub(crate) fn split_heads<B: Backend, const P: usize>(
    x: Tensor<B, 3>,
    heads: usize,
) -> [Tensor<B, 4>; P] {
    let [batch, seq, width] = x.dims();
    let dim_head = width / (P * heads);
    let x = x.reshape([batch, seq, P, heads, dim_head]);
    core::array::from_fn(|part| {
        x.clone()
            .narrow(2, part, 1)
            .reshape([batch, seq, heads, dim_head])
            .swap_dims(1, 2)
    })
}

/// `[batch, heads, seq, dim_head]` → `[batch, seq, heads·dim_head]`.
pub(crate) fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, seq, dim_head] = x.dims();
    x.swap_dims(1, 2).reshape([batch, seq, heads * dim_head])
}
