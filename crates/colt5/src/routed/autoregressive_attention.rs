//! The causal routed attention of CoLT5, for language models.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor};

use super::attention::{HeavyBranch, HeavyInputs, RotaryPositions};
use super::ConditionalRoutedAttentionConfig;
use crate::attention::Attention;
use crate::coor_descent::CoorDescentBackend;
use crate::error::Error;
use crate::local_attention::{LocalMha, LocalMhaConfig};
use crate::rotary::RotaryEmbedding;
use crate::router::CoordinateDescentRouter;

/// Configuration of [`ConditionalRoutedAutoregressiveAttention`].
#[derive(Config, Debug)]
pub struct ConditionalRoutedAutoregressiveAttentionConfig {
    /// The layer's options as for the non-causal layer; the light attention looks back one
    /// window of `light_window_size` tokens.
    pub attention: ConditionalRoutedAttentionConfig,
    /// Length of the blocks in which queries are routed; `None` means `light_window_size`.
    /// Default `None`.
    #[config(default = "None")]
    pub heavy_window_size: Option<usize>,
}

/// Causal routed attention: causal local attention for every token, and for each block of
/// W = `heavy_window_size` tokens (after the first), heavy attention from the block's
/// routed queries to keys routed among all earlier blocks.
///
/// Causality: a token's output depends on later tokens only through the query router,
/// which ranks the queries of a block among themselves; with `num_heavy_tokens_q ≥ W`
/// every query of a block is heavy and the layer is strictly causal, otherwise it is causal
/// across blocks (an output never depends on a later block). This is the reference's
/// design.
///
/// PyTorch parameters: as [`super::ConditionalRoutedAttention`]: `light_attn.*` ([`LocalMha`]),
/// `null_q_token`, `q_router.routing_token`, `kv_router.routing_token`, `heavy_attn.*`.
///
/// Shapes: `x: [batch, n, dim]` → `[batch, n, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::{
///     ConditionalRoutedAttentionConfig, ConditionalRoutedAutoregressiveAttentionConfig,
/// };
///
/// let device = Default::default();
/// let options = ConditionalRoutedAttentionConfig::new(16, 4, 8)
///     .with_light_heads(2)
///     .with_light_dim_head(8)
///     .with_light_window_size(8)
///     .with_heavy_heads(2)
///     .with_heavy_dim_head(8);
/// let attn = ConditionalRoutedAutoregressiveAttentionConfig::new(options)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 30, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(x, false).unwrap().dims(), [2, 30, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedAutoregressiveAttention<B: Backend> {
    /// Causal local attention over every token.
    pub light_attn: LocalMha<B>,
    /// Heavy output of the queries that are not routed.
    pub null_q_token: Option<Param<Tensor<B, 1>>>,
    /// Selects the heavy queries of each block.
    pub q_router: CoordinateDescentRouter<B>,
    /// Selects the heavy keys/values among earlier blocks, per route.
    pub kv_router: CoordinateDescentRouter<B>,
    /// Attention among routed tokens.
    pub heavy_attn: Attention<B>,
    num_heavy_tokens_q: usize,
    num_heavy_tokens_kv: usize,
    multiply_queries_by_score: bool,
    heavy_window: usize,
    rotary_dim: Option<usize>,
}

impl ConditionalRoutedAutoregressiveAttentionConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedAutoregressiveAttention<B>> {
        let options = &self.attention;
        let heavy_window = self.heavy_window_size.unwrap_or(options.light_window_size);
        if heavy_window == 0 {
            return Err(Error::config("heavy_window_size", 0, "at least 1"));
        }
        let heavy = options.init_heavy(device)?;
        Ok(ConditionalRoutedAutoregressiveAttention {
            light_attn: LocalMhaConfig::new(options.dim, options.light_window_size)
                .with_dim_head(options.light_dim_head)
                .with_heads(options.light_heads)
                .with_prenorm(true)
                .with_causal(true)
                .with_exact_windowsize(false)
                .init(device)?,
            null_q_token: heavy.null_q_token,
            q_router: heavy.q_router,
            kv_router: heavy.kv_router,
            heavy_attn: heavy.heavy_attn,
            num_heavy_tokens_q: options.num_heavy_tokens_q,
            num_heavy_tokens_kv: options.num_heavy_tokens_kv,
            multiply_queries_by_score: options.multiply_queries_by_score,
            heavy_window,
            rotary_dim: options.rotary_emb.then_some(options.heavy_dim_head),
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedAutoregressiveAttention<B> {
    /// Applies the layer; `random_route` routes by random scores instead of the soft top-k
    /// (the reference's option for exploration).
    pub fn forward(&self, x: Tensor<B, 3>, random_route: bool) -> crate::Result<Tensor<B, 3>> {
        let [batch, n, dim] = x.dims();
        let device = x.device();
        let light = self.light_attn.forward(x.clone(), None)?;
        let w = self.heavy_window;
        let blocks = n.div_ceil(w);
        if blocks <= 1 {
            // No block has an earlier block to attend to.
            return Ok(light);
        }
        let padded = blocks * w;
        let x = match padded - n {
            0 => x,
            pad => Tensor::cat(vec![x, Tensor::zeros([batch, pad, dim], &device)], 1),
        };
        // Query block m (1 ≤ m < blocks) becomes batch row (b, m − 1).
        let query_rows = batch * (blocks - 1);
        let queries = x
            .clone()
            .narrow(1, w, padded - w)
            .reshape([query_rows, w, dim]);
        let positions = Tensor::<B, 1, Int>::arange(0..padded as i64, &device);
        let query_positions = positions
            .clone()
            .narrow(0, w, padded - w)
            .reshape([1, blocks - 1, w])
            .expand([batch, blocks - 1, w])
            .reshape([query_rows, w]);
        let query_mask = query_positions.clone().lower_elem(n as i64);
        // Block m sees the keys of blocks < m: position t is visible iff t < m·w. The keys
        // are the sequence itself, shared by the blocks: the key router scores each token
        // once and each block routes among the scores of its prefix.
        let key_limits = Tensor::<B, 1, Int>::arange(1..blocks as i64, &device)
            .mul_scalar(w as i64)
            .reshape([blocks - 1, 1]);
        let key_mask = positions
            .clone()
            .reshape([1, padded])
            .expand([blocks - 1, padded])
            .lower(key_limits.expand([blocks - 1, padded]))
            .unsqueeze::<3>()
            .expand([batch, blocks - 1, padded]);
        let rotary = self.rotary_dim.map(|dim_head| RotaryPositions {
            table: RotaryEmbedding::new(dim_head).forward(padded, &device),
            queries: query_positions,
            keys: positions.unsqueeze::<2>().expand([batch, padded]),
        });
        let heavy = HeavyBranch {
            null_q_token: self.null_q_token.as_ref(),
            q_router: &self.q_router,
            kv_router: &self.kv_router,
            heavy_attn: &self.heavy_attn,
            multiply_queries_by_score: self.multiply_queries_by_score,
        }
        .forward(HeavyInputs {
            queries,
            query_mask: Some(query_mask),
            num_queries: self.num_heavy_tokens_q,
            keys: x,
            key_mask: Some(key_mask),
            num_keys: self.num_heavy_tokens_kv,
            random_route,
            rotary,
        })?;
        // Block 0 has no heavy output; the rest is cut back to the sequence.
        let heavy = heavy.reshape([batch, padded - w, dim]).narrow(1, 0, n - w);
        let heavy = Tensor::cat(vec![Tensor::zeros([batch, w, dim], &device), heavy], 1);
        Ok(light + heavy)
    }
}
