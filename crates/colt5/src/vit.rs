//! The routed vision transformer of CoLT5 (`vit.py`).

use crate::norm::{LayerNorm, LayerNormConfig};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, ops::FloatElem, Tensor, TensorData};

use crate::coor_descent::CoorDescentBackend;
use crate::error::Error;
use crate::routed::{
    ConditionalRoutedAttentionConfig, ConditionalRoutedFeedForward,
    ConditionalRoutedFeedForwardConfig, ConditionalRoutedImageAttention,
    ConditionalRoutedImageAttentionConfig,
};
use crate::router::CoordinateDescentRouterConfig;

/// Configuration of [`ConditionalRoutedViT`]. The reference requires every size; where it
/// has no default, the default here is the value of its README example.
#[derive(Config, Debug)]
pub struct ConditionalRoutedViTConfig {
    /// Image height and width.
    pub image_size: [usize; 2],
    /// Patch height and width; they divide the image's.
    pub patch_size: [usize; 2],
    /// Number of classes.
    pub num_classes: usize,
    /// Model width, a multiple of 4 (the 2-D sine-cosine position embedding).
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Queries routed to the heavy attention in each attention window.
    pub attn_num_heavy_tokens_q: usize,
    /// Keys/values routed to the heavy attention in each attention window.
    pub attn_num_heavy_tokens_kv: usize,
    /// Patches routed to the heavy feed-forward per image.
    pub ff_num_heavy_tokens: usize,
    /// Head width of the heavy attention. Default 64.
    #[config(default = 64)]
    pub attn_heavy_dim_head: usize,
    /// Heads of the heavy attention. Default 8.
    #[config(default = 8)]
    pub attn_heavy_heads: usize,
    /// Head width of the light attention. Default 32.
    #[config(default = 32)]
    pub attn_light_dim_head: usize,
    /// Heads of the light attention. Default 4.
    #[config(default = 4)]
    pub attn_light_heads: usize,
    /// Side of the square attention windows, in patches; it divides the patch grid.
    /// Default 4.
    #[config(default = 4)]
    pub attn_light_window_size: usize,
    /// Key/value routes of the heavy attention. Default 1.
    #[config(default = 1)]
    pub attn_num_routed_kv: usize,
    /// Hidden width of the heavy feed-forward, as a multiple of `dim`. Default 4.
    #[config(default = 4.0)]
    pub ff_heavy_mult: f64,
    /// Hidden width of the light feed-forward, as a multiple of `dim`. Default 2.
    #[config(default = 2.0)]
    pub ff_light_mult: f64,
    /// Image channels. Default 3.
    #[config(default = 3)]
    pub channels: usize,
    /// The routers' options. Default: the router's defaults with eps 1 (the reference's
    /// `default_coor_descent_eps` for images).
    #[config(default = "CoordinateDescentRouterConfig::new(0).with_eps(1.0)")]
    pub router: CoordinateDescentRouterConfig,
}

/// One block: routed image attention, then a routed feed-forward over all patches.
///
/// PyTorch parameters: `0.*` ([`ConditionalRoutedImageAttention`]) and `1.*`
/// ([`ConditionalRoutedFeedForward`]).
#[derive(Module, Debug)]
pub struct ViTBlock<B: Backend> {
    /// The attention (PyTorch `0`).
    pub attention: ConditionalRoutedImageAttention<B>,
    /// The feed-forward (PyTorch `1`).
    pub feed_forward: ConditionalRoutedFeedForward<B>,
}

/// A vision transformer of CoLT5 blocks: patches → LayerNorm → Linear → LayerNorm, plus a
/// fixed 2-D sine-cosine position embedding; routed blocks; mean over patches → LayerNorm →
/// Linear to class logits.
///
/// PyTorch parameters: `to_patch_embedding.{1,3}.{weight,bias}` (LayerNorms),
/// `to_patch_embedding.2.{weight,bias}`, `transformer.layers.{i}.{0,1}.*` ([`ViTBlock`]),
/// `linear_head.1.{weight,bias}` (LayerNorm), `linear_head.2.{weight,bias}`.
///
/// Shapes: `images: [batch, channels, height, width]` → logits `[batch, num_classes]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::vit::ConditionalRoutedViTConfig;
///
/// let device = Default::default();
/// let vit = ConditionalRoutedViTConfig::new([32, 32], [8, 8], 10, 32, 1, 4, 4, 4)
///     .with_attn_light_window_size(2)
///     .with_attn_heavy_dim_head(8)
///     .with_attn_light_dim_head(8)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let images = Tensor::<NdArray, 4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(vit.forward(images).unwrap().dims(), [2, 10]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedViT<B: Backend> {
    /// Normalises the flattened patches (PyTorch `to_patch_embedding.1`).
    pub patch_norm: LayerNorm<B>,
    /// Projects patches to the model width (PyTorch `to_patch_embedding.2`).
    pub patch_embedding: Linear<B>,
    /// Normalises the embeddings (PyTorch `to_patch_embedding.3`).
    pub embedding_norm: LayerNorm<B>,
    /// The blocks (PyTorch `transformer.layers`).
    pub layers: Vec<ViTBlock<B>>,
    /// Normalises the pooled features (PyTorch `linear_head.1`).
    pub head_norm: LayerNorm<B>,
    /// Class logits (PyTorch `linear_head.2`).
    pub head: Linear<B>,
    image_size: [usize; 2],
    patch_size: [usize; 2],
    channels: usize,
}

impl ConditionalRoutedViTConfig {
    /// A model with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<ConditionalRoutedViT<B>> {
        let [height, width] = self.image_size;
        let [patch_height, patch_width] = self.patch_size;
        if patch_height == 0
            || patch_width == 0
            || height % patch_height != 0
            || width % patch_width != 0
        {
            return Err(Error::config(
                "patch_size",
                format!("{:?}", self.patch_size),
                format!(
                    "nonzero sides dividing the image size {:?}",
                    self.image_size
                ),
            ));
        }
        if self.dim < 8 || self.dim % 4 != 0 {
            return Err(Error::config(
                "dim",
                self.dim,
                "a multiple of 4, at least 8 (the 2-D sine-cosine position embedding)",
            ));
        }
        let grid = [height / patch_height, width / patch_width];
        let window = self.attn_light_window_size;
        if window == 0 || grid[0] % window != 0 || grid[1] % window != 0 {
            return Err(Error::config(
                "attn_light_window_size",
                window,
                format!("a nonzero divisor of the patch grid {grid:?}"),
            ));
        }
        let attention = ConditionalRoutedImageAttentionConfig::new(
            ConditionalRoutedAttentionConfig::new(
                self.dim,
                self.attn_num_heavy_tokens_q,
                self.attn_num_heavy_tokens_kv,
            )
            .with_num_routed_kv(self.attn_num_routed_kv)
            .with_light_dim_head(self.attn_light_dim_head)
            .with_light_heads(self.attn_light_heads)
            .with_light_window_size(window)
            .with_heavy_dim_head(self.attn_heavy_dim_head)
            .with_heavy_heads(self.attn_heavy_heads)
            .with_router(self.router.clone()),
        );
        let feed_forward =
            ConditionalRoutedFeedForwardConfig::new(self.dim, self.ff_num_heavy_tokens)
                .with_light_ff_mult(self.ff_light_mult)
                .with_heavy_ff_mult(self.ff_heavy_mult)
                .with_router(self.router.clone());
        let layers = (0..self.depth)
            .map(|_| {
                Ok(ViTBlock {
                    attention: attention.init(device)?,
                    feed_forward: feed_forward.init(device)?,
                })
            })
            .collect::<crate::Result<_>>()?;
        let patch_dim = self.channels * patch_height * patch_width;
        Ok(ConditionalRoutedViT {
            patch_norm: LayerNormConfig::new(patch_dim).init(device),
            patch_embedding: LinearConfig::new(patch_dim, self.dim).init(device),
            embedding_norm: LayerNormConfig::new(self.dim).init(device),
            layers,
            head_norm: LayerNormConfig::new(self.dim).init(device),
            head: LinearConfig::new(self.dim, self.num_classes).init(device),
            image_size: self.image_size,
            patch_size: self.patch_size,
            channels: self.channels,
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedViT<B> {
    /// Class logits of a batch of images.
    pub fn forward(&self, images: Tensor<B, 4>) -> crate::Result<Tensor<B, 2>> {
        let [batch, channels, height, width] = images.dims();
        if [channels, height, width] != [self.channels, self.image_size[0], self.image_size[1]] {
            return Err(Error::Shape {
                name: "images",
                actual: images.dims().to_vec(),
                expected: format!(
                    "[batch, {}, {}, {}]",
                    self.channels, self.image_size[0], self.image_size[1]
                ),
            });
        }
        let device = images.device();
        let [patch_height, patch_width] = self.patch_size;
        let [rows, cols] = [height / patch_height, width / patch_width];
        // b c (h p1) (w p2) -> b h w (p1 p2 c)
        let patches = images
            .reshape([batch, channels, rows, patch_height, cols, patch_width])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([batch, rows, cols, patch_height * patch_width * channels]);
        let x = self.patch_norm.forward(patches);
        let x = self.embedding_norm.forward(self.patch_embedding.forward(x));
        let [_, _, _, dim] = x.dims();
        let mut x = x + sincos_2d::<B>(rows, cols, dim, &device).unsqueeze();
        for layer in &self.layers {
            x = layer.attention.forward(x.clone(), None)? + x;
            let flat = x.reshape([batch, rows * cols, dim]);
            x = (layer.feed_forward.forward(flat.clone(), None, None)? + flat)
                .reshape([batch, rows, cols, dim]);
        }
        let pooled = x
            .reshape([batch, rows * cols, dim])
            .mean_dim(1)
            .reshape([batch, dim]);
        Ok(self.head.forward(self.head_norm.forward(pooled)))
    }
}

/// The fixed position embedding `[rows, cols, dim]`: at grid point (y, x),
/// `[sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]` with `ω_i = 10000^(−i/(dim/4 − 1))`.
fn sincos_2d<B: Backend>(rows: usize, cols: usize, dim: usize, device: &B::Device) -> Tensor<B, 3> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 10000f64.powf(-(i as f64) / (quarter - 1) as f64))
        .collect();
    let mut values = Vec::with_capacity(rows * cols * dim);
    for y in 0..rows {
        for x in 0..cols {
            for f in [f64::sin, f64::cos] {
                values.extend(omega.iter().map(|w| f(x as f64 * w)));
            }
            for f in [f64::sin, f64::cos] {
                values.extend(omega.iter().map(|w| f(y as f64 * w)));
            }
        }
    }
    Tensor::from_data(
        TensorData::new(values, [rows, cols, dim]).convert::<FloatElem<B>>(),
        device,
    )
}
