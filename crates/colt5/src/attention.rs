//! Multi-head attention: full self-attention and CoLT5's heavy routed attention.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Bool, Distribution, Tensor};

use crate::attend::{Attend, AttendConfig};
use crate::error::Error;
use crate::fused_attention::AttentionBackend;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::rotary::Rotation;

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
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::attention::SelfAttentionConfig;
///
/// let device = Default::default();
/// let attn = SelfAttentionConfig::new(16).with_heads(2).with_dim_head(8).init::<NdArray>(&device);
/// let x = Tensor::<NdArray, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(x).unwrap().dims(), [2, 5, 16]);
/// ```
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

impl<B: AttentionBackend> SelfAttention<B> {
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
        let [q, k, v] = split_heads(crate::linear::forward(&self.to_qkv, x), self.heads);
        let out = self.attend.forward(q, k, v, None)?;
        Ok(crate::linear::forward(&self.to_out, merge_heads(out)))
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

/// Configuration of [`Attention`], CoLT5's heavy routed attention; defaults are the
/// reference's.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width.
    pub dim: usize,
    /// Width of each head. Default 64.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Number of heads, divisible by the number of key/value routes. Default 8.
    #[config(default = 8)]
    pub heads: usize,
    /// Also scale keys by the key/value router scores. Default false.
    #[config(default = false)]
    pub multiply_keys_by_score: bool,
}

/// Optional inputs of [`Attention::forward`].
#[derive(Debug, Clone, Default)]
pub struct AttentionInputs<B: Backend> {
    /// Key/value tokens per route, `[batch, routes, keys, dim]`; `None` attends to `x`.
    pub context: Option<Tensor<B, 4>>,
    /// Their padding mask, `[batch, routes, keys]`.
    pub mask: Option<Tensor<B, 3, Bool>>,
    /// Router scores of the keys, `[batch, routes, keys]`: values (and keys, if configured)
    /// are scaled by them.
    pub scores_kv: Option<Tensor<B, 3>>,
    /// Router scores of the queries, `[batch, queries]`: queries are scaled by them.
    pub scores_q: Option<Tensor<B, 2>>,
    /// Rotary rotation of the queries, broadcastable to `[batch, 1, queries, dim_head]`, and
    /// of the keys, broadcastable to `[batch, routes, 1, keys, dim_head]`.
    pub rotary: Option<(Rotation<B, 4>, Rotation<B, 5>)>,
}

/// Multi-head attention of routed queries over routed keys/values, with a learned null
/// key/value that every query can attend to, and several key/value routes: heads are split
/// evenly among the routes, head `ρ·(heads/routes) + η` attending to route ρ.
///
/// PyTorch parameters: `norm.gamma [dim]` (shared by queries and context), `null_kv
/// [2, heads, dim_head]`, `to_q.weight [heads·dim_head, dim]`, `to_kv.weight
/// [2·heads·dim_head, dim]` (per head, its key rows then its value rows),
/// `to_out.weight [dim, heads·dim_head]`.
///
/// Shapes: `x: [batch, queries, dim]` → `[batch, queries, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::attention::{AttentionConfig, AttentionInputs};
///
/// let device = Default::default();
/// let attn = AttentionConfig::new(16).with_heads(4).with_dim_head(8).init::<NdArray>(&device);
/// let queries = Tensor::<NdArray, 3>::random([2, 3, 16], Distribution::Normal(0.0, 1.0), &device);
/// // Two key/value routes of 6 tokens: heads 0-1 attend to route 0, heads 2-3 to route 1.
/// let context = Tensor::<NdArray, 4>::random([2, 2, 6, 16], Distribution::Normal(0.0, 1.0), &device);
/// let inputs = AttentionInputs { context: Some(context), ..Default::default() };
/// assert_eq!(attn.forward(queries, inputs).unwrap().dims(), [2, 3, 16]);
/// ```
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Normalises queries and context.
    pub norm: RmsNorm<B>,
    /// The null key (index 0) and value (index 1) of every head.
    pub null_kv: Param<Tensor<B, 3>>,
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key/value projection.
    pub to_kv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    attend: Attend,
    heads: usize,
    multiply_keys_by_score: bool,
}

impl AttentionConfig {
    /// A layer with PyTorch's default initialisation (null key/value from N(0, 1)).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out).with_bias(false).init(device);
        Attention {
            norm: RmsNormConfig::new(self.dim).init(device),
            null_kv: Param::from_tensor(Tensor::random(
                [2, self.heads, self.dim_head],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            to_q: linear(self.dim, inner),
            to_kv: linear(self.dim, 2 * inner),
            to_out: linear(inner, self.dim),
            attend: AttendConfig::new().init(),
            heads: self.heads,
            multiply_keys_by_score: self.multiply_keys_by_score,
        }
    }
}

impl<B: AttentionBackend> Attention<B> {
    /// Attends `x` to the context (or to itself).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        inputs: AttentionInputs<B>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, queries, dim] = x.dims();
        let [_, heads, dim_head] = self.null_kv.dims();
        let x = self.norm.forward(x);
        let context = match inputs.context {
            Some(context) => self.norm.forward(context),
            None => x.clone().unsqueeze_dim(1),
        };
        let [_, routes, keys, _] = context.dims();
        if heads % routes != 0 || context.dims()[0] != batch || context.dims()[3] != dim {
            return Err(Error::Shape {
                name: "context",
                actual: context.dims().to_vec(),
                expected: format!("[{batch}, routes dividing {heads} heads, keys, {dim}]"),
            });
        }
        let per_route = heads / routes;
        let [mut q] = split_heads::<B, 1>(crate::linear::forward(&self.to_q, x), heads);
        if let Some(scores) = inputs.scores_q {
            q = q * scores.reshape([batch, 1, queries, 1]);
        }

        // Route ρ uses the key/value rows of its own heads: [dim, (routes·per_route·2·dim_head)].
        let weight = self
            .to_kv
            .weight
            .val()
            .reshape([1, dim, routes, per_route * 2 * dim_head])
            .swap_dims(1, 2)
            .expand([batch, routes, dim, per_route * 2 * dim_head]);
        let kv = context
            .matmul(weight)
            .reshape([batch, routes, keys, per_route, 2, dim_head])
            .permute([0, 1, 3, 2, 4, 5]);
        let mut k: Tensor<B, 5> = kv.clone().narrow(4, 0, 1).squeeze_dim(4);
        let mut v: Tensor<B, 5> = kv.narrow(4, 1, 1).squeeze_dim(4);
        if let Some(scores) = inputs.scores_kv {
            let scores = scores.reshape([batch, routes, 1, keys, 1]);
            v = v * scores.clone();
            if self.multiply_keys_by_score {
                k = k * scores;
            }
        }
        if let Some((q_rotation, k_rotation)) = inputs.rotary {
            q = q_rotation.apply(q);
            k = k_rotation.apply(k);
        }
        let merge = |t: Tensor<B, 5>| t.reshape([batch, heads, keys, dim_head]);
        let null = |i: usize| {
            self.null_kv
                .val()
                .narrow(0, i, 1)
                .reshape([1, heads, 1, dim_head])
                .expand([batch, heads, 1, dim_head])
        };
        let k = Tensor::cat(vec![null(0), merge(k)], 2);
        let v = Tensor::cat(vec![null(1), merge(v)], 2);
        let mask = inputs.mask.map(|mask| {
            let mask = mask
                .reshape([batch, routes, 1, keys])
                .expand([batch, routes, per_route, keys])
                .reshape([batch, heads, 1, keys]);
            let null_visible = Tensor::<B, 4, Bool>::from_data(
                burn::tensor::TensorData::new(vec![true; batch * heads], [batch, heads, 1, 1]),
                &mask.device(),
            );
            Tensor::cat(vec![null_visible, mask], 3)
        });
        let out = self.attend.forward(q, k, v, mask)?;
        Ok(crate::linear::forward(&self.to_out, merge_heads(out)))
    }
}
