//! The routed cross-attention of CoLT5.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Distribution, Tensor};

use super::attention::{HeavyBranch, HeavyInputs};
use crate::attention::{Attention, AttentionConfig};
use crate::coor_descent::CoorDescentBackend;
use crate::router::{CoordinateDescentRouter, CoordinateDescentRouterConfig};

/// Configuration of [`ConditionalRoutedCrossAttention`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct ConditionalRoutedCrossAttentionConfig {
    /// Model width (of queries and context).
    pub dim: usize,
    /// Queries routed per sequence.
    pub num_tokens_q: usize,
    /// Context tokens routed per sequence and route.
    pub num_tokens_kv: usize,
    /// Width of each head. Default 64.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Number of heads, split among the context routes. Default 8.
    #[config(default = 8)]
    pub heads: usize,
    /// Context routes (routing tokens of the context router). Default 1.
    #[config(default = 1)]
    pub kv_routing_tokens: usize,
    /// Scale keys by their router scores. Default false.
    #[config(default = false)]
    pub multiply_keys_by_score: bool,
    /// Unrouted queries get a learned vector instead of 0. Default true.
    #[config(default = true)]
    pub use_null_q_tokens: bool,
    /// Route the context inside blocks of this length. Default `None`.
    #[config(default = "None")]
    pub route_block_size: Option<usize>,
    /// The routers' options (their `dim`, route counts and block sizes are set by this
    /// layer). Default: the router's defaults.
    #[config(default = "CoordinateDescentRouterConfig::new(0)")]
    pub router: CoordinateDescentRouterConfig,
}

/// Cross-attention from routed queries to routed context tokens; queries that are not
/// routed get the null token (or 0). There is no light branch and no residual.
///
/// The reference's forward raises a `NameError`; this is its evident intent: queries are
/// routed when there are more than `num_tokens_q`, context tokens when there are more than
/// `num_tokens_kv`.
///
/// PyTorch parameters: `null_q_token [dim]`, `q_router.routing_token [1, dim]`,
/// `kv_router.routing_token [kv_routing_tokens, dim]`, `heavy_attn.*` ([`Attention`]).
///
/// Shapes: `x: [batch, nq, dim]`, `context: [batch, m, dim]`, masks `[batch, nq]` and
/// `[batch, m]` → `[batch, nq, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::ConditionalRoutedCrossAttentionConfig;
///
/// let device = Default::default();
/// let attn = ConditionalRoutedCrossAttentionConfig::new(16, 4, 8)
///     .with_heads(2)
///     .with_dim_head(8)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 12, 16], Distribution::Normal(0.0, 1.0), &device);
/// let context = Tensor::<NdArray, 3>::random([2, 40, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(x, context, None, None).unwrap().dims(), [2, 12, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedCrossAttention<B: Backend> {
    /// Output of the queries that are not routed.
    pub null_q_token: Option<Param<Tensor<B, 1>>>,
    /// Selects the queries.
    pub q_router: CoordinateDescentRouter<B>,
    /// Selects the context tokens, per route.
    pub kv_router: CoordinateDescentRouter<B>,
    /// Attention from routed queries to routed context.
    pub heavy_attn: Attention<B>,
    num_tokens_q: usize,
    num_tokens_kv: usize,
}

impl ConditionalRoutedCrossAttentionConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedCrossAttention<B>> {
        let router = |routes, route_block_size| {
            CoordinateDescentRouterConfig {
                dim: self.dim,
                num_routing_tokens: routes,
                route_block_size,
                ..self.router.clone()
            }
            .init(device)
        };
        Ok(ConditionalRoutedCrossAttention {
            null_q_token: self.use_null_q_tokens.then(|| {
                Param::from_tensor(Tensor::random(
                    [self.dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ))
            }),
            q_router: router(1, None)?,
            kv_router: router(self.kv_routing_tokens, self.route_block_size)?,
            heavy_attn: AttentionConfig::new(self.dim)
                .with_dim_head(self.dim_head)
                .with_heads(self.heads)
                .with_multiply_keys_by_score(self.multiply_keys_by_score)
                .init(device),
            num_tokens_q: self.num_tokens_q,
            num_tokens_kv: self.num_tokens_kv,
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedCrossAttention<B> {
    /// Attends the routed queries of `x` to the routed tokens of `context`; the masks mark
    /// real tokens.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
        context_mask: Option<Tensor<B, 2, Bool>>,
    ) -> crate::Result<Tensor<B, 3>> {
        HeavyBranch {
            null_q_token: self.null_q_token.as_ref(),
            q_router: &self.q_router,
            kv_router: &self.kv_router,
            heavy_attn: &self.heavy_attn,
            multiply_queries_by_score: false,
        }
        .forward(HeavyInputs {
            queries: x,
            query_mask: mask,
            num_queries: self.num_tokens_q,
            keys: context,
            key_mask: context_mask.map(|m| m.unsqueeze_dim::<3>(1)),
            num_keys: self.num_tokens_kv,
            random_route: false,
            rotary: None,
        })
    }
}
