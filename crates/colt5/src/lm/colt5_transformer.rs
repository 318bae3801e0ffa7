//! The CoLT5 language model: a stack of routed transformer blocks with causal routed
//! attention.

use crate::norm::{LayerNorm, LayerNormConfig};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Bool, Int, Tensor};

use super::{debug_check_tokens, LanguageModel};
use crate::coor_descent::CoorDescentBackend;
use crate::error::Error;
use crate::routed::{
    ConditionalRoutedAttentionConfig, ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedAutoregressiveAttentionConfig, ConditionalRoutedFeedForward,
    ConditionalRoutedFeedForwardConfig,
};
use crate::router::CoordinateDescentRouterConfig;

/// Configuration of [`Colt5Transformer`].
#[derive(Config, Debug)]
pub struct Colt5TransformerConfig {
    /// Vocabulary size.
    pub num_tokens: usize,
    /// Model width.
    pub dim: usize,
    /// Longest sequence.
    pub seq_len: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Routing window W: the light attention looks back one window, heavy queries and
    /// heavy feed-forward tokens are routed among the tokens of each window. Default 64.
    #[config(default = 64)]
    pub window_size: usize,
    /// Attention heads of both branches. Default 4.
    #[config(default = 4)]
    pub heads: usize,
    /// Width of each head. Default 32.
    #[config(default = 32)]
    pub dim_head: usize,
    /// Heavy queries per window; `None` routes all W, which makes the attention strictly
    /// causal. Default `None`.
    #[config(default = "None")]
    pub num_heavy_tokens_q: Option<usize>,
    /// Heavy keys/values routed among all earlier windows. Default 64.
    #[config(default = 64)]
    pub num_heavy_tokens_kv: usize,
    /// Tokens per window that also get the heavy feed-forward. Default 16.
    #[config(default = 16)]
    pub num_heavy_ff_tokens: usize,
    /// Light feed-forward width, as a multiple of `dim`. Default 0.5 (the reference's).
    #[config(default = 0.5)]
    pub light_ff_mult: f64,
    /// Heavy feed-forward width, as a multiple of `dim`. Default 4 (the reference's).
    #[config(default = 4.0)]
    pub heavy_ff_mult: f64,
    /// Coordinate-descent iterations of every router. Default 20 (the reference's).
    #[config(default = 20)]
    pub router_iters: usize,
}

/// One block: `x ← attention(x) + x; x ← feed_forward(x) + x`.
#[derive(Module, Debug)]
pub struct Colt5Block<B: Backend> {
    /// Causal routed attention.
    pub attention: ConditionalRoutedAutoregressiveAttention<B>,
    /// Routed feed-forward, routed per window.
    pub feed_forward: ConditionalRoutedFeedForward<B>,
}

/// A CoLT5 decoder-only language model: token embedding, [`Colt5Block`]s (rotary positions
/// in the heavy attention, relative positions in the light one), LayerNorm and logits.
///
/// Causality: the light attention and the heavy keys/values are strictly causal. Routing
/// within a window ranks the window's tokens among themselves, so a token's output may
/// depend on later tokens of its own window (never on a later window) where routing picks
/// a subset: in the feed-forward when `num_heavy_ff_tokens < W`, and in the attention when
/// `num_heavy_tokens_q < W`. This is the reference's autoregressive design; training sees
/// full windows and generation partial ones.
///
/// Shapes: `tokens: [batch, n]` (n ≤ `seq_len`) → logits `[batch, n, num_tokens]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Int, Tensor};
/// use colt5::lm::{Colt5TransformerConfig, LanguageModel};
///
/// let device = Default::default();
/// let model = Colt5TransformerConfig::new(256, 32, 64, 2)
///     .with_window_size(16)
///     .with_num_heavy_tokens_kv(8)
///     .with_num_heavy_ff_tokens(4)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let tokens = Tensor::<NdArray, 2, Int>::from_ints([[1, 2, 3, 4]], &device);
/// assert_eq!(model.forward(tokens).unwrap().dims(), [1, 4, 256]);
/// ```
#[derive(Module, Debug)]
pub struct Colt5Transformer<B: Backend> {
    /// Token embedding.
    pub token_emb: Embedding<B>,
    /// The blocks.
    pub layers: Vec<Colt5Block<B>>,
    /// Final normalisation.
    pub logits_norm: LayerNorm<B>,
    /// Logits.
    pub to_logits: Linear<B>,
    num_tokens: usize,
    seq_len: usize,
    window: usize,
}

impl Colt5TransformerConfig {
    /// The model's estimated memory, from its sizes (nothing is allocated). Every layer is
    /// linear in the sequence: local attention over three windows, heavy attention over a
    /// fixed number of routed keys per window.
    pub fn memory_estimate(&self) -> crate::memory::MemoryEstimate {
        // In f64 throughout: the sizes come from user configs and their products may not fit a
        // usize.
        let (dim, inner) = (self.dim as f64, self.heads as f64 * self.dim_head as f64);
        let ff = (self.light_ff_mult + self.heavy_ff_mult) * dim;
        let layer = 8.0 * dim * inner + 2.0 * dim * ff + 16.0 * dim;
        let keys = 3.0 * self.window_size as f64 + self.num_heavy_tokens_kv as f64;
        crate::memory::MemoryEstimate {
            parameters: self.depth as f64 * layer + 2.0 * dim * (self.num_tokens as f64 + 1.0),
            activations_per_token: 32.0 * dim
                + 12.0 * inner
                + 4.0 * ff
                + 4.0 * self.heads as f64 * keys
                + 4.0 * self.router_iters as f64,
            head_per_token: 4.0 * dim + 3.0 * self.num_tokens as f64,
            depth: self.depth as f64,
        }
    }

    /// A model with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<Colt5Transformer<B>> {
        Error::require_positive(&[
            ("num_tokens", self.num_tokens),
            ("dim", self.dim),
            ("seq_len", self.seq_len),
            ("window_size", self.window_size),
            ("heads", self.heads),
            ("dim_head", self.dim_head),
            ("num_heavy_tokens_kv", self.num_heavy_tokens_kv),
            ("num_heavy_ff_tokens", self.num_heavy_ff_tokens),
        ])?;
        let w = self.window_size;
        let heavy_q = self.num_heavy_tokens_q.unwrap_or(w);
        if heavy_q == 0 || heavy_q > w {
            return Err(Error::config(
                "num_heavy_tokens_q",
                heavy_q,
                format!("in 1..={w} (the window size)"),
            ));
        }
        if self.num_heavy_ff_tokens > w {
            return Err(Error::config(
                "num_heavy_ff_tokens",
                self.num_heavy_ff_tokens,
                format!("at most the window size {w}"),
            ));
        }
        crate::memory::ensure_host_holds("the model's weights", self.memory_estimate())?;
        let router = CoordinateDescentRouterConfig::new(self.dim).with_n_iters(self.router_iters);
        let attention = ConditionalRoutedAutoregressiveAttentionConfig::new(
            ConditionalRoutedAttentionConfig::new(self.dim, heavy_q, self.num_heavy_tokens_kv)
                .with_light_heads(self.heads)
                .with_light_dim_head(self.dim_head)
                .with_light_window_size(w)
                .with_heavy_heads(self.heads)
                .with_heavy_dim_head(self.dim_head)
                .with_rotary_emb(true)
                .with_router(router.clone()),
        );
        let feed_forward =
            ConditionalRoutedFeedForwardConfig::new(self.dim, self.num_heavy_ff_tokens)
                .with_light_ff_mult(self.light_ff_mult)
                .with_heavy_ff_mult(self.heavy_ff_mult)
                .with_router(router);
        let layers = (0..self.depth)
            .map(|_| {
                Ok(Colt5Block {
                    attention: attention.init(device)?,
                    feed_forward: feed_forward.init(device)?,
                })
            })
            .collect::<crate::Result<_>>()?;
        Ok(Colt5Transformer {
            token_emb: EmbeddingConfig::new(self.num_tokens, self.dim).init(device),
            layers,
            logits_norm: LayerNormConfig::new(self.dim).init(device),
            to_logits: LinearConfig::new(self.dim, self.num_tokens).init(device),
            num_tokens: self.num_tokens,
            seq_len: self.seq_len,
            window: w,
        })
    }
}

impl<B: CoorDescentBackend> Colt5Block<B> {
    /// Applies the block to `x: [batch, n, dim]`, routing the feed-forward within windows of
    /// `window` tokens (the last one padded and masked).
    fn forward(&self, x: Tensor<B, 3>, window: usize) -> crate::Result<Tensor<B, 3>> {
        let x = self.attention.forward(x.clone(), false)? + x;
        let [batch, n, dim] = x.dims();
        let device = x.device();
        let blocks = n.div_ceil(window);
        let pad = blocks * window - n;
        let (windows, mask) = match pad {
            0 => (x.clone(), None),
            _ => {
                let valid = Tensor::<B, 2, Bool>::full([batch, n], true, &device);
                let padding = Tensor::<B, 2, Bool>::full([batch, pad], false, &device);
                (
                    Tensor::cat(
                        vec![x.clone(), Tensor::zeros([batch, pad, dim], &device)],
                        1,
                    ),
                    Some(Tensor::cat(vec![valid, padding], 1).reshape([batch * blocks, window])),
                )
            }
        };
        let routed = self
            .feed_forward
            .forward(windows.reshape([batch * blocks, window, dim]), mask, None)?
            .reshape([batch, blocks * window, dim])
            .narrow(1, 0, n);
        Ok(routed + x)
    }
}

impl<B: CoorDescentBackend> LanguageModel<B> for Colt5Transformer<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> crate::Result<Tensor<B, 3>> {
        let [batch, n] = tokens.dims();
        if n == 0 || n > self.seq_len {
            return Err(Error::Shape {
                name: "tokens",
                actual: vec![batch, n],
                expected: format!("[batch, n] with 1 ≤ n ≤ seq_len = {}", self.seq_len),
            });
        }
        debug_check_tokens(&tokens, self.num_tokens)?;
        let mut x = self.token_emb.forward(tokens);
        for layer in &self.layers {
            x = layer.forward(x, self.window)?;
        }
        Ok(crate::linear::by_chunks(x, |x| {
            crate::linear::apply(&self.to_logits, self.logits_norm.forward(x))
        }))
    }

    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    fn device(&self) -> B::Device {
        self.token_emb.weight.device()
    }
}
