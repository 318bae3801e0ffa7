//! The routed attention of CoLT5 over images.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, BasicOps, Bool, Tensor};

use super::attention::{HeavyBranch, HeavyInputs};
use super::ConditionalRoutedAttentionConfig;
use crate::attention::{Attention, SelfAttention, SelfAttentionConfig};
use crate::coor_descent::CoorDescentBackend;
use crate::error::Error;
use crate::router::CoordinateDescentRouter;

/// Configuration of [`ConditionalRoutedImageAttention`].
#[derive(Config, Debug)]
pub struct ConditionalRoutedImageAttentionConfig {
    /// The layer's options as for sequences; `light_window_size` is the side w of the square
    /// windows, and `rotary_emb` must be false (the reference has no rotary option here).
    pub attention: ConditionalRoutedAttentionConfig,
    /// Images come as `[batch, dim, height, width]` instead of `[batch, height, width, dim]`.
    /// Default false.
    #[config(default = false)]
    pub channel_first: bool,
}

/// Routed attention over the pixels (or patches) of an image, inside w×w windows: every
/// window gets full self-attention among its w² tokens (the light branch) and routed heavy
/// attention among the tokens its routers select.
///
/// As in the reference, the heavy branch is local to each window too (the routers run on
/// the windowed tokens). A mask is given per pixel, `[batch, height, width]`, and windowed
/// the same way (the reference could only take an already windowed mask).
///
/// PyTorch parameters: `light_attn.*` ([`SelfAttention`] with prenorm), `null_q_token`,
/// `q_router.routing_token`, `kv_router.routing_token`, `heavy_attn.*` ([`Attention`]).
///
/// Shapes: `[batch, height, width, dim]` (or `[batch, dim, height, width]` with
/// `channel_first`) → the same; height and width multiples of w.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::{ConditionalRoutedAttentionConfig, ConditionalRoutedImageAttentionConfig};
///
/// let device = Default::default();
/// let options = ConditionalRoutedAttentionConfig::new(16, 8, 8)
///     .with_light_heads(2)
///     .with_light_dim_head(8)
///     .with_light_window_size(4)
///     .with_heavy_heads(2)
///     .with_heavy_dim_head(8);
/// let attn = ConditionalRoutedImageAttentionConfig::new(options).init::<NdArray>(&device).unwrap();
/// let image = Tensor::<NdArray, 4>::random([2, 8, 12, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(image, None).unwrap().dims(), [2, 8, 12, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedImageAttention<B: Backend> {
    /// Full attention inside each window.
    pub light_attn: SelfAttention<B>,
    /// Heavy output of the queries that are not routed.
    pub null_q_token: Option<Param<Tensor<B, 1>>>,
    /// Selects the heavy queries of each window.
    pub q_router: CoordinateDescentRouter<B>,
    /// Selects the heavy keys/values of each window, per route.
    pub kv_router: CoordinateDescentRouter<B>,
    /// Attention among routed tokens.
    pub heavy_attn: Attention<B>,
    num_heavy_tokens_q: usize,
    num_heavy_tokens_kv: usize,
    multiply_queries_by_score: bool,
    window: usize,
    channel_first: bool,
}

impl ConditionalRoutedImageAttentionConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedImageAttention<B>> {
        let options = &self.attention;
        if options.rotary_emb {
            return Err(Error::config(
                "rotary_emb",
                true,
                "false: the image attention has no rotary embedding",
            ));
        }
        if options.light_window_size == 0 {
            return Err(Error::config("light_window_size", 0, "at least 1"));
        }
        let heavy = options.init_heavy(device)?;
        Ok(ConditionalRoutedImageAttention {
            light_attn: SelfAttentionConfig::new(options.dim)
                .with_dim_head(options.light_dim_head)
                .with_heads(options.light_heads)
                .with_prenorm(true)
                .init(device),
            null_q_token: heavy.null_q_token,
            q_router: heavy.q_router,
            kv_router: heavy.kv_router,
            heavy_attn: heavy.heavy_attn,
            num_heavy_tokens_q: options.num_heavy_tokens_q,
            num_heavy_tokens_kv: options.num_heavy_tokens_kv,
            multiply_queries_by_score: options.multiply_queries_by_score,
            window: options.light_window_size,
            channel_first: self.channel_first,
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedImageAttention<B> {
    /// Applies the layer; `mask: [batch, height, width]` marks real pixels.
    pub fn forward(
        &self,
        image: Tensor<B, 4>,
        mask: Option<Tensor<B, 3, Bool>>,
    ) -> crate::Result<Tensor<B, 4>> {
        let x = match self.channel_first {
            true => image.permute([0, 2, 3, 1]),
            false => image,
        };
        let [batch, height, width, dim] = x.dims();
        let w = self.window;
        if height % w != 0 || width % w != 0 {
            return Err(Error::Shape {
                name: "image",
                actual: x.dims().to_vec(),
                expected: format!(
                    "height and width multiples of the window size {w} (channel-last view)"
                ),
            });
        }
        if let Some(mask) = &mask {
            if mask.dims() != [batch, height, width] {
                return Err(Error::Shape {
                    name: "mask",
                    actual: mask.dims().to_vec(),
                    expected: format!("[{batch}, {height}, {width}]"),
                });
            }
        }
        let windows = windowed(x, w);
        let mask = mask.map(|m| windowed(m.unsqueeze_dim::<4>(3), w).squeeze_dim::<2>(2));
        let light = self.light_attn.forward(windows.clone())?;
        let heavy = HeavyBranch {
            null_q_token: self.null_q_token.as_ref(),
            q_router: &self.q_router,
            kv_router: &self.kv_router,
            heavy_attn: &self.heavy_attn,
            multiply_queries_by_score: self.multiply_queries_by_score,
        }
        .forward(HeavyInputs {
            queries: windows.clone(),
            query_mask: mask.clone(),
            num_queries: self.num_heavy_tokens_q,
            keys: windows,
            key_mask: mask.map(|m| m.unsqueeze_dim::<3>(1)),
            num_keys: self.num_heavy_tokens_kv,
            random_route: false,
            rotary: None,
        })?;
        let out = unwindowed(light + heavy, [batch, height, width, dim], w);
        Ok(match self.channel_first {
            true => out.permute([0, 3, 1, 2]),
            false => out,
        })
    }
}

/// `[b, H, W, c]` → `[b·(H/w)·(W/w), w·w, c]`, windows in row-major order and pixels
/// row-major inside each window.
fn windowed<B: Backend, K: BasicOps<B>>(x: Tensor<B, 4, K>, w: usize) -> Tensor<B, 3, K> {
    let [batch, height, width, channels] = x.dims();
    x.reshape([batch, height / w, w, width / w, w, channels])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([batch * (height / w) * (width / w), w * w, channels])
}

/// The inverse of [`windowed`].
fn unwindowed<B: Backend>(
    x: Tensor<B, 3>,
    [batch, height, width, dim]: [usize; 4],
    w: usize,
) -> Tensor<B, 4> {
    x.reshape([batch, height / w, width / w, w, w, dim])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([batch, height, width, dim])
}
