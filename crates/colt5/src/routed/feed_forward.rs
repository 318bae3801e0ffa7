//! The routed feed-forward of CoLT5.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{backend::Backend, Bool, Tensor};

use crate::coor_descent::CoorDescentBackend;
use crate::feed_forward::{FeedForward, FeedForwardConfig};
use crate::router::{CoordinateDescentRouter, CoordinateDescentRouterConfig, RouteOptions};
use crate::rows::write_rows;

/// Configuration of [`ConditionalRoutedFeedForward`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct ConditionalRoutedFeedForwardConfig {
    /// Model width.
    pub dim: usize,
    /// Tokens per sequence that go through the heavy feed-forward.
    pub num_heavy_tokens: usize,
    /// Hidden width of the light feed-forward, as a multiple of `dim`. Default 0.5.
    #[config(default = 0.5)]
    pub light_ff_mult: f64,
    /// Hidden width of the heavy feed-forward, as a multiple of `dim`. Default 4.
    #[config(default = 4.0)]
    pub heavy_ff_mult: f64,
    /// The router (its `dim` is overwritten with this layer's). Default: the router's
    /// defaults, straight-through.
    #[config(default = "CoordinateDescentRouterConfig::new(0)")]
    pub router: CoordinateDescentRouterConfig,
}

/// `light_ff(x) + scatter(heavy_ff(routed x) · router score)`: every token gets the light
/// feed-forward; the `num_heavy_tokens` tokens the router selects also get the heavy one.
///
/// PyTorch parameters: `light_ff.*` and `heavy_ff.*` ([`FeedForward`]),
/// `router.routing_token [1, dim]`.
///
/// Shapes: `x: [batch, n, dim]`, mask `[batch, n]` → `[batch, n, dim]`. Tokens that are not
/// routed, or routed but masked, get no heavy output.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::ConditionalRoutedFeedForwardConfig;
///
/// let device = Default::default();
/// let ff = ConditionalRoutedFeedForwardConfig::new(16, 4).init::<NdArray>(&device).unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 32, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(ff.forward(x, None, None).unwrap().dims(), [2, 32, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedFeedForward<B: Backend> {
    /// The feed-forward applied to every token.
    pub light_ff: FeedForward<B>,
    /// The feed-forward applied to routed tokens.
    pub heavy_ff: FeedForward<B>,
    /// Selects the routed tokens.
    pub router: CoordinateDescentRouter<B>,
    num_heavy_tokens: usize,
}

impl ConditionalRoutedFeedForwardConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedFeedForward<B>> {
        let ff = |mult| {
            FeedForwardConfig::new(self.dim)
                .with_mult(mult)
                .init(device)
        };
        Ok(ConditionalRoutedFeedForward {
            light_ff: ff(self.light_ff_mult),
            heavy_ff: ff(self.heavy_ff_mult),
            router: CoordinateDescentRouterConfig {
                dim: self.dim,
                ..self.router.clone()
            }
            .init(device)?,
            num_heavy_tokens: self.num_heavy_tokens,
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedFeedForward<B> {
    /// Applies the layer; `num_heavy_tokens` overrides the configured count.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
        num_heavy_tokens: Option<usize>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, n, dim] = x.dims();
        let light = self.light_ff.forward(x.clone());
        let count = num_heavy_tokens.unwrap_or(self.num_heavy_tokens);
        let routed = self.router.forward(
            x,
            count,
            RouteOptions {
                mask,
                ..Default::default()
            },
        )?;
        let [_, _, routed_count, _] = routed.routed_tokens.dims();
        let tokens = routed.routed_tokens.reshape([batch, routed_count, dim]);
        let scores = routed.scores.reshape([batch, routed_count, 1]);
        let heavy = self.heavy_ff.forward(tokens) * scores;
        let heavy = match routed.indices {
            Some(indices) => write_rows(
                Tensor::zeros([batch, n, dim], &heavy.device()),
                heavy,
                indices.reshape([batch, routed_count]),
            ),
            None => heavy,
        };
        Ok(light + heavy)
    }
}
