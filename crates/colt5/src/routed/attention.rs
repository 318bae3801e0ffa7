//! The routed attention of CoLT5.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Bool, Distribution, Int, Tensor};

use crate::attention::{Attention, AttentionConfig, AttentionInputs};
use crate::coor_descent::CoorDescentBackend;
use crate::local_attention::{LocalMha, LocalMhaConfig};
use crate::rotary::{RotaryEmbedding, Rotation};
use crate::router::{CoordinateDescentRouter, CoordinateDescentRouterConfig, RouteOptions};
use crate::rows::write_rows;

/// Configuration of [`ConditionalRoutedAttention`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct ConditionalRoutedAttentionConfig {
    /// Model width.
    pub dim: usize,
    /// Queries routed to the heavy attention per sequence.
    pub num_heavy_tokens_q: usize,
    /// Keys/values routed to the heavy attention per sequence and route.
    pub num_heavy_tokens_kv: usize,
    /// Key/value routes; the heavy heads are split among them. Default 1.
    #[config(default = 1)]
    pub num_routed_kv: usize,
    /// Head width of the light (local) attention. Default 64.
    #[config(default = 64)]
    pub light_dim_head: usize,
    /// Heads of the light attention. Default 8.
    #[config(default = 8)]
    pub light_heads: usize,
    /// The light attention sees `light_window_size / 2` tokens either side. Default 128.
    #[config(default = 128)]
    pub light_window_size: usize,
    /// Head width of the heavy attention. Default 64.
    #[config(default = 64)]
    pub heavy_dim_head: usize,
    /// Heads of the heavy attention. Default 8.
    #[config(default = 8)]
    pub heavy_heads: usize,
    /// Scale heavy keys by their router scores. Default false.
    #[config(default = false)]
    pub multiply_keys_by_score: bool,
    /// Scale heavy queries by their router scores. Default false.
    #[config(default = false)]
    pub multiply_queries_by_score: bool,
    /// Unrouted queries get a learned vector instead of 0 as heavy output. Default true.
    #[config(default = true)]
    pub use_null_q_tokens: bool,
    /// Rotary embeddings (absolute positions of the routed tokens) in the heavy attention.
    /// Default false.
    #[config(default = false)]
    pub rotary_emb: bool,
    /// The routers' options (their `dim` and route counts are set by this layer). Default:
    /// the router's defaults.
    #[config(default = "CoordinateDescentRouterConfig::new(0)")]
    pub router: CoordinateDescentRouterConfig,
}

/// Local attention for every token plus full attention among routed tokens:
/// `light(x) + scatter(heavy(routed queries → routed keys) · query score)`.
///
/// PyTorch parameters: `light_attn.*` ([`LocalMha`]), `null_q_token [dim]`,
/// `q_router.routing_token [1, dim]`, `kv_router.routing_token [num_routed_kv, dim]`,
/// `heavy_attn.*` ([`Attention`]); `rotary_emb.inv_freq` is accepted and recomputed.
///
/// Shapes: `x: [batch, n, dim]`, mask `[batch, n]` → `[batch, n, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::ConditionalRoutedAttentionConfig;
///
/// let device = Default::default();
/// let attn = ConditionalRoutedAttentionConfig::new(16, 4, 8)
///     .with_light_heads(2)
///     .with_light_dim_head(8)
///     .with_light_window_size(8)
///     .with_heavy_heads(2)
///     .with_heavy_dim_head(8)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 32, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(x, None).unwrap().dims(), [2, 32, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedAttention<B: Backend> {
    /// Local attention over every token.
    pub light_attn: LocalMha<B>,
    /// Heavy output of the queries that are not routed.
    pub null_q_token: Option<Param<Tensor<B, 1>>>,
    /// Selects the heavy queries.
    pub q_router: CoordinateDescentRouter<B>,
    /// Selects the heavy keys/values, per route.
    pub kv_router: CoordinateDescentRouter<B>,
    /// Attention among routed tokens.
    pub heavy_attn: Attention<B>,
    num_heavy_tokens_q: usize,
    num_heavy_tokens_kv: usize,
    multiply_queries_by_score: bool,
    rotary_dim: Option<usize>,
}

impl ConditionalRoutedAttentionConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedAttention<B>> {
        let heavy = self.init_heavy(device)?;
        Ok(ConditionalRoutedAttention {
            light_attn: LocalMhaConfig::new(self.dim, self.light_window_size / 2)
                .with_dim_head(self.light_dim_head)
                .with_heads(self.light_heads)
                .with_prenorm(true)
                .with_look_forward(Some(1))
                .init(device)?,
            null_q_token: heavy.null_q_token,
            q_router: heavy.q_router,
            kv_router: heavy.kv_router,
            heavy_attn: heavy.heavy_attn,
            num_heavy_tokens_q: self.num_heavy_tokens_q,
            num_heavy_tokens_kv: self.num_heavy_tokens_kv,
            multiply_queries_by_score: self.multiply_queries_by_score,
            rotary_dim: self.rotary_emb.then_some(self.heavy_dim_head),
        })
    }

    /// The parameters of the heavy branch, which every routed attention shares.
    pub(crate) fn init_heavy<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<HeavyParams<B>> {
        let router = |routes| {
            CoordinateDescentRouterConfig {
                dim: self.dim,
                num_routing_tokens: routes,
                ..self.router.clone()
            }
            .init(device)
        };
        Ok(HeavyParams {
            null_q_token: self.use_null_q_tokens.then(|| {
                Param::from_tensor(Tensor::random(
                    [self.dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ))
            }),
            q_router: router(1)?,
            kv_router: router(self.num_routed_kv)?,
            heavy_attn: AttentionConfig::new(self.dim)
                .with_dim_head(self.heavy_dim_head)
                .with_heads(self.heavy_heads)
                .with_multiply_keys_by_score(self.multiply_keys_by_score)
                .init(device),
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedAttention<B> {
    /// Applies the layer; `mask` marks real tokens.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, n, _] = x.dims();
        let light = self.light_attn.forward(x.clone(), mask.clone())?;
        let rotary = self.rotary_dim.map(|dim_head| {
            let device = x.device();
            let positions = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
                .unsqueeze::<2>()
                .expand([batch, n]);
            RotaryPositions {
                table: RotaryEmbedding::new(dim_head).forward(n, &device),
                queries: positions.clone(),
                keys: positions,
            }
        });
        let heavy = self.heavy().forward(HeavyInputs {
            queries: x.clone(),
            query_mask: mask.clone(),
            num_queries: self.num_heavy_tokens_q,
            keys: x,
            key_mask: mask.map(|m| m.unsqueeze_dim::<3>(1)),
            num_keys: self.num_heavy_tokens_kv,
            random_route: false,
            rotary,
        })?;
        Ok(light + heavy)
    }

    fn heavy(&self) -> HeavyBranch<'_, B> {
        HeavyBranch {
            null_q_token: self.null_q_token.as_ref(),
            q_router: &self.q_router,
            kv_router: &self.kv_router,
            heavy_attn: &self.heavy_attn,
            multiply_queries_by_score: self.multiply_queries_by_score,
        }
    }
}

/// Freshly initialised parameters of a heavy branch.
pub(crate) struct HeavyParams<B: Backend> {
    pub null_q_token: Option<Param<Tensor<B, 1>>>,
    pub q_router: CoordinateDescentRouter<B>,
    pub kv_router: CoordinateDescentRouter<B>,
    pub heavy_attn: Attention<B>,
}

/// The heavy branch every routed attention shares, borrowed from the layer that owns its
/// parameters (they sit at the layer's top level under the reference's names).
pub(crate) struct HeavyBranch<'a, B: Backend> {
    pub null_q_token: Option<&'a Param<Tensor<B, 1>>>,
    pub q_router: &'a CoordinateDescentRouter<B>,
    pub kv_router: &'a CoordinateDescentRouter<B>,
    pub heavy_attn: &'a Attention<B>,
    pub multiply_queries_by_score: bool,
}

/// What the heavy branch routes: queries among `queries`, keys/values among `keys`.
pub(crate) struct HeavyInputs<B: Backend> {
    /// `[batch, len_q, dim]`.
    pub queries: Tensor<B, 3>,
    /// `[batch, len_q]`, true = real token.
    pub query_mask: Option<Tensor<B, 2, Bool>>,
    pub num_queries: usize,
    /// `[batch_k, len_k, dim]`, shared by `groups = batch / batch_k` consecutive query
    /// sequences (one group without `key_mask`).
    pub keys: Tensor<B, 3>,
    /// `[batch_k, groups, len_k]`, true = visible to the group's queries.
    pub key_mask: Option<Tensor<B, 3, Bool>>,
    pub num_keys: usize,
    pub random_route: bool,
    pub rotary: Option<RotaryPositions<B>>,
}

/// Rotary embedding of the heavy attention: the table and every slot's absolute position.
pub(crate) struct RotaryPositions<B: Backend> {
    /// `[positions, dim_head]`.
    pub table: Rotation<B, 2>,
    /// `[batch, len_q]`.
    pub queries: Tensor<B, 2, Int>,
    /// `[batch_k, len_k]`.
    pub keys: Tensor<B, 2, Int>,
}

impl<B: CoorDescentBackend> HeavyBranch<'_, B> {
    /// Routes, attends the routed queries to the routed keys, scales by the query scores and
    /// scatters back: `[batch, len_q, dim]`, the null token (or 0) where no query was routed.
    pub fn forward(&self, inputs: HeavyInputs<B>) -> crate::Result<Tensor<B, 3>> {
        let [batch, len_q, dim] = inputs.queries.dims();
        let device = inputs.queries.device();
        let queries = self.q_router.forward(
            inputs.queries,
            inputs.num_queries,
            RouteOptions {
                mask: inputs.query_mask,
                random_route: inputs.random_route,
                routing_tokens: None,
            },
        )?;
        let keys = match inputs.key_mask {
            Some(masks) if masks.dims()[1] > 1 => self.kv_router.forward_groups(
                inputs.keys,
                inputs.num_keys,
                masks,
                inputs.random_route,
            )?,
            mask => self.kv_router.forward(
                inputs.keys,
                inputs.num_keys,
                RouteOptions {
                    mask: mask.map(|m| m.squeeze_dim::<2>(1)),
                    random_route: inputs.random_route,
                    routing_tokens: None,
                },
            )?,
        };
        let [_, _, q_count, _] = queries.routed_tokens.dims();
        let [_, routes, kv_count, _] = keys.routed_tokens.dims();
        let scores_q = queries.scores.reshape([batch, q_count]);

        let rotary = inputs.rotary.map(|positions| {
            let dim_head = positions.table.cos.dims()[1];
            // The rotation at each routed token's position, [sequences, routes, count,
            // dim_head], where the slots `[slot_batch, len]` serve `groups` sequences each.
            let at = |slots: Tensor<B, 2, Int>,
                      indices: &Option<Tensor<B, 3, Int>>,
                      routes: usize,
                      count: usize| {
                let [slot_batch, len] = slots.dims();
                let sequences = match indices {
                    Some(indices) => indices.dims()[0],
                    None => batch,
                };
                let groups = sequences / slot_batch;
                let slots = match indices {
                    Some(indices) => slots.gather(
                        1,
                        indices
                            .clone()
                            .reshape([slot_batch, groups * routes * count]),
                    ),
                    None => slots
                        .reshape([slot_batch, 1, len])
                        .expand([slot_batch, groups * routes, len])
                        .reshape([slot_batch, groups * routes * len]),
                };
                let slots = slots.reshape([sequences * routes * count]);
                positions.table.clone().map(|t| {
                    t.select(0, slots.clone())
                        .reshape([sequences, routes, count, dim_head])
                })
            };
            let q_rotation = at(positions.queries, &queries.indices, 1, q_count);
            let k_rotation = at(positions.keys, &keys.indices, routes, kv_count)
                .map(|t| t.unsqueeze_dim::<5>(2));
            (q_rotation, k_rotation)
        });
        let heavy = self.heavy_attn.forward(
            queries.routed_tokens.reshape([batch, q_count, dim]),
            AttentionInputs {
                context: Some(keys.routed_tokens),
                mask: keys.routed_mask,
                scores_kv: Some(keys.scores),
                scores_q: self.multiply_queries_by_score.then(|| scores_q.clone()),
                rotary,
            },
        )?;
        let heavy = heavy * scores_q.unsqueeze_dim(2);
        Ok(match queries.indices {
            Some(indices) => {
                let base = match self.null_q_token {
                    Some(token) => token.val().reshape([1, 1, dim]).expand([batch, len_q, dim]),
                    None => Tensor::zeros([batch, len_q, dim], &device),
                };
                write_rows(base, heavy, indices.reshape([batch, q_count]))
            }
            None => heavy,
        })
    }
}
