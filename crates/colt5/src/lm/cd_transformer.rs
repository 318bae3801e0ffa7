//! The coordinate-descent-attention language model (`coordinate_descent_attention.py`):
//! attention whose weights over the keys, and a feed-forward whose hidden activations, are
//! soft top-k masks computed by coordinate descent.

use crate::norm::{LayerNorm, LayerNormConfig};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{activation, backend::Backend, Bool, Distribution, Int, Tensor};

use super::{debug_check_tokens, last_logits, left_pad, token_tensor, Decoder, LanguageModel};
use crate::attention::{merge_heads, split_heads};
use crate::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig, RowK};
use crate::error::Error;
use crate::feed_forward::exact_gelu;

/// The coordinate descent settings of one layer: the reference's schedule (eps_init 4,
/// decay 0.7) with the model's iterations and final temperature. The scores and each row's
/// k are the model's own (products of finite activations, k ≥ 1 or the configured k):
/// checking them would read them back from the device in every layer of every forward.
fn schedule(n_iters: usize, eps: f64) -> CoorDescentConfig {
    CoorDescentConfig::iterations(n_iters, eps, Some(4.0), 0.7).with_validate(false)
}

/// `1 / (1 + e^−x)`, composed so that it keeps the backend's precision: burn 0.21's
/// `sigmoid` on `NdArray<f64>` rounds to f32 (errors up to 5e-8).
fn sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.neg().exp().add_scalar(1.0).recip()
}

/// Configuration of [`CdTransformer`]; defaults are the reference `Transformer`'s.
#[derive(Config, Debug)]
pub struct CdTransformerConfig {
    /// Vocabulary size.
    pub num_tokens: usize,
    /// Model width.
    pub dim: usize,
    /// Longest sequence (learned absolute positions).
    pub seq_len: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Width of each attention head. Default 64.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Attention heads. Default 8.
    #[config(default = 8)]
    pub heads: usize,
    /// Hidden width of the feed-forward, as a multiple of `dim`. Default 4.
    #[config(default = 4.0)]
    pub ff_mult: f64,
    /// Attention weights by coordinate descent instead of softmax. Default false.
    #[config(default = false)]
    pub attn_use_coor_descent: bool,
    /// Feed-forward activation by coordinate descent instead of GELU. Default false.
    #[config(default = false)]
    pub ff_use_coor_descent: bool,
    /// Keys each query selects (k of the attention's soft top-k; with learned k, its
    /// maximum). Default 2.
    #[config(default = 2.0)]
    pub attn_coor_descent_sparsity_k: f64,
    /// Hidden units each token activates (k of the feed-forward's soft top-k). Default 2.
    #[config(default = 2.0)]
    pub ff_coor_descent_sparsity_k: f64,
    /// Coordinate descent iterations. Default 15.
    #[config(default = 15)]
    pub coor_descent_iters: usize,
    /// Final coordinate descent temperature. Default 0.1.
    #[config(default = 0.1)]
    pub coor_descent_eps: f64,
    /// Learned null keys/values per head, visible to every query. Default 0.
    #[config(default = 0)]
    pub attn_null_kv: usize,
    /// Each query's k is learned: `sigmoid(x·W + b)·(k − 1) + 1`. Default false.
    #[config(default = false)]
    pub learned_sparsity_k: bool,
}

/// Attention of the coordinate-descent-attention model: causal, with optional null
/// keys/values, and weights that are either a softmax or a soft top-k of each query's
/// similarities (not normalised: a query's weights sum to about k).
///
/// PyTorch parameters: `norm.{weight,bias}` (LayerNorm), `null_kv [2, heads, null, dim_head]`
/// (when null > 0), `to_qkv.weight [3·heads·dim_head, dim]`, `to_out.weight [dim,
/// heads·dim_head]`, `to_learned_k.{weight [heads, dim], bias}` (learned k).
#[derive(Module, Debug)]
pub struct CdAttention<B: Backend> {
    /// Normalises the input.
    pub norm: LayerNorm<B>,
    /// Null keys (index 0) and values (index 1), `[2, heads, null, dim_head]`.
    pub null_kv: Option<Param<Tensor<B, 4>>>,
    /// Joint query/key/value projection.
    pub to_qkv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    /// Per-query, per-head k (learned sparsity).
    pub to_learned_k: Option<Linear<B>>,
    heads: usize,
    /// k of the soft top-k; `None`: softmax attention.
    sparsity_k: Option<f64>,
    coor_descent: CoorDescentConfig,
}

/// Feed-forward of the coordinate-descent-attention model: LayerNorm → Linear → GELU or a
/// soft top-k over the hidden units → Linear.
///
/// PyTorch parameters: `proj_in.0.{weight,bias}` (LayerNorm), `proj_in.1.{weight,bias}`,
/// `proj_out.{weight,bias}`.
#[derive(Module, Debug)]
pub struct CdFeedForward<B: Backend> {
    /// Normalises the input (PyTorch `proj_in.0`).
    pub norm: LayerNorm<B>,
    /// Into the hidden width (PyTorch `proj_in.1`).
    pub proj_in: Linear<B>,
    /// Back to the model width.
    pub proj_out: Linear<B>,
    /// k of the soft top-k; `None`: GELU.
    sparsity_k: Option<f64>,
    coor_descent: CoorDescentConfig,
}

/// One block: `x ← attention(x) + x; x ← feed_forward(x) + x`.
///
/// PyTorch parameters: `0.*` ([`CdAttention`]) and `1.*` ([`CdFeedForward`]).
#[derive(Module, Debug)]
pub struct CdBlock<B: Backend> {
    /// The attention (PyTorch `0`).
    pub attention: CdAttention<B>,
    /// The feed-forward (PyTorch `1`).
    pub feed_forward: CdFeedForward<B>,
}

/// The coordinate-descent-attention language model: token and learned absolute position
/// embeddings, [`CdBlock`]s, LayerNorm and a linear map to logits (untied, as the
/// reference).
///
/// PyTorch parameters: `token_emb.weight`, `pos_emb.weight`, `layers.{i}.*`,
/// `to_logits.0.{weight,bias}`, `to_logits.1.{weight,bias}`.
///
/// Shapes: tokens `[batch, n]` (n ≤ `seq_len`) → logits `[batch, n, num_tokens]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Int, Tensor};
/// use colt5::lm::{CdTransformerConfig, LanguageModel};
///
/// let device = Default::default();
/// let model = CdTransformerConfig::new(256, 32, 64, 2)
///     .with_heads(2)
///     .with_dim_head(16)
///     .with_attn_use_coor_descent(true)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let tokens = Tensor::<NdArray, 2, Int>::from_ints([[1, 2, 3, 4]], &device);
/// assert_eq!(model.forward(tokens).unwrap().dims(), [1, 4, 256]);
/// ```
#[derive(Module, Debug)]
pub struct CdTransformer<B: Backend> {
    /// Token embedding.
    pub token_emb: Embedding<B>,
    /// Learned absolute position embedding.
    pub pos_emb: Embedding<B>,
    /// The blocks.
    pub layers: Vec<CdBlock<B>>,
    /// Final normalisation (PyTorch `to_logits.0`).
    pub logits_norm: LayerNorm<B>,
    /// Logits (PyTorch `to_logits.1`).
    pub to_logits: Linear<B>,
    num_tokens: usize,
    seq_len: usize,
}

impl CdTransformerConfig {
    /// The model's estimated memory, from its sizes (nothing is allocated). Dense attention
    /// keeps each head's `[n, n]` logits, weights and their gradients; coordinate-descent
    /// attention also its solver's iterates.
    pub fn memory_estimate(&self) -> crate::memory::MemoryEstimate {
        let (dim, inner) = (self.dim as f64, self.heads as f64 * self.dim_head as f64);
        let hidden = dim * self.ff_mult;
        let layer = 4.0 * dim * inner
            + 2.0 * dim * hidden
            + 6.0 * dim
            + 2.0 * self.attn_null_kv as f64 * inner;
        let logits_per_query = self.heads as f64 * self.seq_len as f64;
        let attention = match self.attn_use_coor_descent {
            true => 8.0 + 2.0 * self.coor_descent_iters as f64,
            false => 4.0,
        };
        crate::memory::MemoryEstimate {
            parameters: self.depth as f64 * layer
                + dim * (2.0 * self.num_tokens as f64 + self.seq_len as f64 + 2.0),
            activations_per_token: 16.0 * dim
                + 8.0 * inner
                + 4.0 * hidden
                + attention * logits_per_query,
            head_per_token: 4.0 * dim + 3.0 * self.num_tokens as f64,
            depth: self.depth as f64,
        }
    }

    /// A model with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<CdTransformer<B>> {
        let hidden = (self.dim as f64 * self.ff_mult) as usize;
        for (name, k, limit) in [
            (
                "attn_coor_descent_sparsity_k",
                self.attn_coor_descent_sparsity_k,
                f64::INFINITY,
            ),
            (
                "ff_coor_descent_sparsity_k",
                self.ff_coor_descent_sparsity_k,
                hidden as f64,
            ),
        ] {
            if !(k > 0.0 && k <= limit) {
                return Err(Error::config(name, k, format!("a number in (0, {limit}]")));
            }
        }
        if self.learned_sparsity_k && self.attn_coor_descent_sparsity_k < 1.0 {
            return Err(Error::config(
                "attn_coor_descent_sparsity_k",
                self.attn_coor_descent_sparsity_k,
                "at least 1 with learned sparsity k",
            ));
        }
        if self.num_tokens == 0 || self.seq_len == 0 || self.dim == 0 || hidden == 0 {
            return Err(Error::config(
                "num_tokens, seq_len, dim, ff_mult",
                format!(
                    "{}, {}, {}, {}",
                    self.num_tokens, self.seq_len, self.dim, self.ff_mult
                ),
                "positive sizes",
            ));
        }
        crate::memory::ensure_host_holds("the model's weights", self.memory_estimate())?;
        let coor_descent = schedule(self.coor_descent_iters, self.coor_descent_eps);
        coor_descent.check()?;
        let inner = self.heads * self.dim_head;
        let linear =
            |d_in, d_out, bias| LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
        let layers = (0..self.depth)
            .map(|_| CdBlock {
                attention: CdAttention {
                    norm: LayerNormConfig::new(self.dim).init(device),
                    null_kv: (self.attn_null_kv > 0).then(|| {
                        Param::from_tensor(Tensor::random(
                            [2, self.heads, self.attn_null_kv, self.dim_head],
                            Distribution::Normal(0.0, 1.0),
                            device,
                        ))
                    }),
                    to_qkv: linear(self.dim, 3 * inner, false),
                    to_out: linear(inner, self.dim, false),
                    to_learned_k: (self.attn_use_coor_descent && self.learned_sparsity_k).then(
                        || {
                            let mut layer = linear(self.dim, self.heads, true);
                            // Start every query's k near 1.
                            layer.bias = Some(Param::from_tensor(
                                Tensor::ones([self.heads], device).mul_scalar(-10.0),
                            ));
                            layer
                        },
                    ),
                    heads: self.heads,
                    sparsity_k: self
                        .attn_use_coor_descent
                        .then_some(self.attn_coor_descent_sparsity_k),
                    coor_descent: coor_descent.clone(),
                },
                feed_forward: CdFeedForward {
                    norm: LayerNormConfig::new(self.dim).init(device),
                    proj_in: linear(self.dim, hidden, true),
                    proj_out: linear(hidden, self.dim, true),
                    sparsity_k: self
                        .ff_use_coor_descent
                        .then_some(self.ff_coor_descent_sparsity_k),
                    coor_descent: coor_descent.clone(),
                },
            })
            .collect();
        Ok(CdTransformer {
            token_emb: EmbeddingConfig::new(self.num_tokens, self.dim).init(device),
            pos_emb: EmbeddingConfig::new(self.seq_len, self.dim).init(device),
            layers,
            logits_norm: LayerNormConfig::new(self.dim).init(device),
            to_logits: linear(self.dim, self.num_tokens, true),
            num_tokens: self.num_tokens,
            seq_len: self.seq_len,
        })
    }
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding; rows
/// of a batch may start with padding (prompts of different lengths, padded on the left).
#[derive(Debug, Clone)]
pub struct CdCache<B: Backend> {
    /// Per layer, allocated by the first forward (which knows the batch).
    layers: Vec<Option<KvCache<B>>>,
    len: usize,
    /// Per batch row, the padding tokens it starts with; empty: none.
    padding: Vec<usize>,
}

impl<B: Backend> CdCache<B> {
    /// Positions cached so far (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One attention layer's keys and values for incremental decoding: `[batch, heads, null +
/// capacity, dim_head]`, allocated once, null keys/values in front, new positions written
/// in place (no copy of what is cached at each step).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Keys and values; taken out while a step writes them, so that their buffers have one
    /// owner and are written in place.
    slots: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Slots written (null keys included).
    filled: usize,
}

impl<B: Backend> KvCache<B> {
    /// Writes `k, v: [batch, heads, n, dim_head]` after the filled slots; returns every
    /// filled slot's keys and values (views of the cache).
    fn append(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> crate::Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let [batch, heads, n, dim_head] = k.dims();
        let (keys, values) = self
            .slots
            .take()
            .expect("a cache holds its slots between steps");
        let [cache_batch, cache_heads, capacity, cache_dim] = keys.dims();
        if [batch, heads, dim_head] != [cache_batch, cache_heads, cache_dim]
            || self.filled + n > capacity
        {
            self.slots = Some((keys, values));
            return Err(Error::Shape {
                name: "keys",
                actual: vec![batch, heads, self.filled + n, dim_head],
                expected: format!(
                    "within the cache's [{cache_batch}, {cache_heads}, {capacity}, {cache_dim}]"
                ),
            });
        }
        let written = [
            0..batch,
            0..heads,
            self.filled..self.filled + n,
            0..dim_head,
        ];
        let keys = keys.slice_assign(written.clone(), k);
        let values = values.slice_assign(written, v);
        self.filled += n;
        let filled = (
            keys.clone().narrow(2, 0, self.filled),
            values.clone().narrow(2, 0, self.filled),
        );
        self.slots = Some((keys, values));
        Ok(filled)
    }
}

/// Which keys the queries of one forward see (`true` = visible), built on the host once
/// per forward and shared by every layer: each query sees the null keys, the keys up to
/// its own position and none of its row's padding; a padding query sees the null keys and
/// itself, so that its (unused) output stays finite.
#[derive(Debug, Clone)]
pub struct KeyMask<B: Backend> {
    /// `[batch or 1, 1, queries, null + keys]`.
    visible: Tensor<B, 4, Bool>,
}

impl<B: Backend> KeyMask<B> {
    /// The mask of `queries` new queries after `cached` positions, with `null` null keys
    /// and each batch row's leading `padding` (empty: none).
    pub fn new(
        queries: usize,
        cached: usize,
        null: usize,
        padding: &[usize],
        device: &B::Device,
    ) -> Self {
        let keys = null + cached + queries;
        let rows = padding.len().max(1);
        let mut visible = Vec::with_capacity(rows * queries * keys);
        for row in 0..rows {
            let pad = padding.get(row).copied().unwrap_or(0);
            for i in cached..cached + queries {
                visible.extend((0..keys).map(|key| {
                    key < null || {
                        let position = key - null;
                        position == i || (position <= i && position >= pad)
                    }
                }));
            }
        }
        KeyMask {
            visible: Tensor::from_data(
                burn::tensor::TensorData::new(visible, [rows, 1, queries, keys]),
                device,
            ),
        }
    }
}

impl<B: CoorDescentBackend> CdAttention<B> {
    /// The null keys/values per head.
    pub fn null_kv_count(&self) -> usize {
        self.null_kv.as_ref().map_or(0, |null_kv| null_kv.dims()[2])
    }

    /// The null keys and values `[batch, heads, null, dim_head]` each, if the layer has any.
    fn null_keys_values(&self, batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let null_kv = self.null_kv.as_ref()?;
        let [_, heads, null, dim_head] = null_kv.dims();
        let part = |i| {
            null_kv
                .val()
                .narrow(0, i, 1)
                .reshape([1, heads, null, dim_head])
                .expand([batch, heads, null, dim_head])
        };
        Some((part(0), part(1)))
    }

    /// An empty cache of this layer's keys and values for `batch` rows and `capacity`
    /// positions, its null keys/values written in front.
    pub fn empty_kv_cache(&self, batch: usize, capacity: usize, device: &B::Device) -> KvCache<B> {
        let null = self.null_kv_count();
        let dim_head = self.to_qkv.weight.dims()[1] / (3 * self.heads);
        let shape = [batch, self.heads, null + capacity, dim_head];
        let (mut keys, mut values) = (Tensor::zeros(shape, device), Tensor::zeros(shape, device));
        if let Some((null_keys, null_values)) = self.null_keys_values(batch) {
            let front = [0..batch, 0..self.heads, 0..null, 0..dim_head];
            keys = keys.slice_assign(front.clone(), null_keys);
            values = values.slice_assign(front, null_values);
        }
        KvCache {
            slots: Some((keys, values)),
            filled: null,
        }
    }

    /// Attends each of the `n` tokens of `x: [batch, n, dim]` to the keys `mask` shows it
    /// among the null keys, the cached tokens (which come before all of them) and the `n`
    /// tokens; the cache, if given, grows by them.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<&mut KvCache<B>>,
        mask: &KeyMask<B>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, queries, _] = x.dims();
        let x = self.norm.forward(x);
        let [q, k, v] =
            split_heads::<B, 3>(crate::linear::forward(&self.to_qkv, x.clone()), self.heads);
        let (k, v) = match (cache, self.null_keys_values(batch)) {
            (Some(cache), _) => cache.append(k, v)?,
            (None, Some((null_keys, null_values))) => (
                Tensor::cat(vec![null_keys, k], 2),
                Tensor::cat(vec![null_values, v], 2),
            ),
            (None, None) => (k, v),
        };
        let [_, heads, keys, dim_head] = k.dims();
        let mask_dims = mask.visible.dims();
        if mask_dims[2] != queries || mask_dims[3] != keys || ![1, batch].contains(&mask_dims[0]) {
            return Err(Error::Shape {
                name: "mask",
                actual: mask_dims.to_vec(),
                expected: format!("[1 or {batch}, 1, {queries}, {keys}] (queries, keys)"),
            });
        }
        let sim = q
            .mul_scalar((dim_head as f64).powf(-0.5))
            .matmul(k.swap_dims(2, 3));
        let visible = mask.visible.clone();
        let attn = match self.sparsity_k {
            Some(sparsity_k) => {
                // k may exceed a query's visible keys (early positions): they all saturate
                // (the solver's k ≥ n case), as in the reference, which does not bound k.
                let k = match &self.to_learned_k {
                    Some(to_k) => RowK::PerRow(
                        sigmoid(to_k.forward(x))
                            .mul_scalar(sparsity_k - 1.0)
                            .add_scalar(1.0)
                            .swap_dims(1, 2)
                            .reshape([batch * heads * queries]),
                    ),
                    None => RowK::Scalar(sparsity_k),
                };
                coor_descent(sim, k, Some(visible), &self.coor_descent)?
            }
            None => activation::softmax(
                sim.mask_fill(
                    visible.bool_not().expand([batch, heads, queries, keys]),
                    f64::from(f32::MIN),
                ),
                3,
            ),
        };
        Ok(crate::linear::forward(
            &self.to_out,
            merge_heads(attn.matmul(v)),
        ))
    }
}

impl<B: CoorDescentBackend> CdFeedForward<B> {
    /// Applies the feed-forward to `[batch, n, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> crate::Result<Tensor<B, 3>> {
        let hidden = crate::linear::forward(&self.proj_in, self.norm.forward(x));
        let hidden = match self.sparsity_k {
            Some(k) => coor_descent(hidden, k, None, &self.coor_descent)?,
            None => exact_gelu(hidden),
        };
        Ok(crate::linear::forward(&self.proj_out, hidden))
    }
}

impl<B: CoorDescentBackend> CdTransformer<B> {
    /// An empty cache for [`CdTransformer::forward_cached`].
    pub fn empty_cache(&self) -> CdCache<B> {
        self.padded_cache(Vec::new())
    }

    /// An empty cache for a batch whose row r starts with `padding[r]` padding tokens
    /// (prompts of different lengths padded on the left to one length): no query sees a
    /// row's padding and the row's positions start after it, so each row computes what it
    /// would alone.
    pub fn padded_cache(&self, padding: Vec<usize>) -> CdCache<B> {
        // Rows without padding need neither per-row positions nor per-row masks.
        let padding = match padding.iter().all(|&pad| pad == 0) {
            true => Vec::new(),
            false => padding,
        };
        CdCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            padding,
        }
    }

    /// Logits of `tokens: [batch, n]` that follow the cached tokens; the cache grows by n.
    /// Cached and uncached decoding compute the same function; the cache may hold at most
    /// `seq_len` positions of its longest row (positions are absolute).
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut CdCache<B>,
    ) -> crate::Result<Tensor<B, 3>> {
        self.forward_after(tokens, Some(cache))
    }

    /// Logits of `tokens` after the cache's tokens, or from the start without a cache.
    fn forward_after(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut CdCache<B>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, n] = tokens.dims();
        let (cached, padding) = cache
            .as_ref()
            .map_or((0, Vec::new()), |cache| (cache.len, cache.padding.clone()));
        let shortest_padding = padding.iter().copied().min().unwrap_or(0);
        if n == 0 || cached + n - shortest_padding > self.seq_len {
            return Err(Error::Shape {
                name: "tokens",
                actual: vec![batch, cached + n - shortest_padding],
                expected: format!("1 to seq_len = {} positions", self.seq_len),
            });
        }
        if !padding.is_empty() && padding.len() != batch {
            return Err(Error::Shape {
                name: "tokens",
                actual: vec![batch, n],
                expected: format!("the cache's {} rows", padding.len()),
            });
        }
        debug_check_tokens(&tokens, self.num_tokens)?;
        let device = tokens.device();
        let positions = match padding.is_empty() {
            true => Tensor::<B, 1, Int>::arange(cached as i64..(cached + n) as i64, &device)
                .reshape([1, n]),
            false => {
                let positions: Vec<i64> = padding
                    .iter()
                    .flat_map(|&pad| {
                        (cached..cached + n).map(move |i| i.saturating_sub(pad) as i64)
                    })
                    .collect();
                Tensor::from_data(
                    burn::tensor::TensorData::new(positions, [batch, n]),
                    &device,
                )
            }
        };
        let null = self
            .layers
            .first()
            .map_or(0, |layer| layer.attention.null_kv_count());
        let mask = KeyMask::new(n, cached, null, &padding, &device);
        let capacity = self.seq_len + shortest_padding;
        let mut x = self.token_emb.forward(tokens) + self.pos_emb.forward(positions);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|cache| {
                cache.layers[i]
                    .get_or_insert_with(|| layer.attention.empty_kv_cache(batch, capacity, &device))
            });
            x = layer.attention.forward(x.clone(), layer_cache, &mask)? + x;
            x = layer.feed_forward.forward(x.clone())? + x;
        }
        if let Some(cache) = cache {
            cache.len += n;
        }
        Ok(crate::linear::by_chunks(x, |x| {
            crate::linear::apply(&self.to_logits, self.logits_norm.forward(x))
        }))
    }
}

impl<B: CoorDescentBackend> LanguageModel<B> for CdTransformer<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> crate::Result<Tensor<B, 3>> {
        self.forward_after(tokens, None)
    }

    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    fn device(&self) -> B::Device {
        self.to_logits.weight.device()
    }

    /// Decodes with a key/value cache while the sequence fits in `seq_len`, then (positions
    /// being absolute) recomputes the last `seq_len` tokens at each step, as the reference.
    fn decoder(&self) -> Box<dyn Decoder + '_> {
        Box::new(CachedDecoder {
            model: self,
            cache: self.empty_cache(),
            lengths: Vec::new(),
        })
    }
}

/// Incremental decoding of a [`CdTransformer`], a batch of rows at a time.
struct CachedDecoder<'a, B: Backend> {
    model: &'a CdTransformer<B>,
    cache: CdCache<B>,
    /// Each row's length when the cache was last extended.
    lengths: Vec<usize>,
}

impl<B: CoorDescentBackend> Decoder for CachedDecoder<'_, B> {
    fn next_logits(&mut self, rows: &[Vec<i64>]) -> crate::Result<Vec<Vec<f64>>> {
        let (model, num_tokens) = (self.model, self.model.num_tokens);
        let device = model.device();
        // Past seq_len (positions being absolute) each row's last seq_len tokens are
        // recomputed, as the reference does.
        let windows: Vec<&[i64]> = rows
            .iter()
            .map(|row| &row[row.len().saturating_sub(model.seq_len)..])
            .collect();
        let clipped = windows
            .iter()
            .zip(rows)
            .any(|(window, row)| window.len() < row.len());
        let grew_by_one = !clipped
            && !self.cache.is_empty()
            && rows.len() == self.lengths.len()
            && rows
                .iter()
                .zip(&self.lengths)
                .all(|(row, &len)| row.len() == len + 1);
        let logits = if grew_by_one {
            let last: Vec<&[i64]> = rows.iter().map(|row| &row[row.len() - 1..]).collect();
            let tokens = token_tensor::<B>(&last, num_tokens, &device)?;
            model.forward_cached(tokens, &mut self.cache)?
        } else {
            if windows.is_empty() || windows.iter().any(|window| window.is_empty()) {
                return Err(Error::Shape {
                    name: "prompt",
                    actual: rows.iter().map(Vec::len).collect(),
                    expected: "at least one row, each of at least one token".into(),
                });
            }
            let (ids, padding) = left_pad(&windows);
            let padded: Vec<&[i64]> = ids.chunks(ids.len() / windows.len()).collect();
            let tokens = token_tensor::<B>(&padded, num_tokens, &device)?;
            self.cache = model.padded_cache(padding);
            model.forward_cached(tokens, &mut self.cache)?
        };
        self.lengths = match clipped {
            true => Vec::new(),
            false => rows.iter().map(Vec::len).collect(),
        };
        last_logits(logits)
    }
}
