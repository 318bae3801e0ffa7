//! The routed transformer block of CoLT5.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{backend::Backend, Bool, Tensor};

use super::{
    ConditionalRoutedAttention, ConditionalRoutedAttentionConfig, ConditionalRoutedFeedForward,
    ConditionalRoutedFeedForwardConfig,
};
use crate::coor_descent::CoorDescentBackend;

/// Configuration of [`ConditionalRoutedTransformerBlock`]: its two layers' configurations.
#[derive(Config, Debug)]
pub struct ConditionalRoutedTransformerBlockConfig {
    /// The routed attention.
    pub attention: ConditionalRoutedAttentionConfig,
    /// The routed feed-forward.
    pub feed_forward: ConditionalRoutedFeedForwardConfig,
}

/// `x ← attention(x) + x; x ← feed_forward(x) + x`, both routed.
///
/// PyTorch parameters: `conditional_attn.*` ([`ConditionalRoutedAttention`]) and
/// `conditional_ff.*` ([`ConditionalRoutedFeedForward`]).
///
/// Shapes: `x: [batch, n, dim]`, mask `[batch, n]` → `[batch, n, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::routed::{
///     ConditionalRoutedAttentionConfig, ConditionalRoutedFeedForwardConfig,
///     ConditionalRoutedTransformerBlockConfig,
/// };
///
/// let device = Default::default();
/// let attention = ConditionalRoutedAttentionConfig::new(16, 4, 8)
///     .with_light_heads(2)
///     .with_light_dim_head(8)
///     .with_light_window_size(8)
///     .with_heavy_heads(2)
///     .with_heavy_dim_head(8);
/// let feed_forward = ConditionalRoutedFeedForwardConfig::new(16, 4);
/// let block = ConditionalRoutedTransformerBlockConfig::new(attention, feed_forward)
///     .init::<NdArray>(&device)
///     .unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 32, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(block.forward(x, None).unwrap().dims(), [2, 32, 16]);
/// ```
#[derive(Module, Debug)]
pub struct ConditionalRoutedTransformerBlock<B: Backend> {
    /// The routed attention.
    pub conditional_attn: ConditionalRoutedAttention<B>,
    /// The routed feed-forward.
    pub conditional_ff: ConditionalRoutedFeedForward<B>,
}

impl ConditionalRoutedTransformerBlockConfig {
    /// A block with PyTorch's default initialisation.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> crate::Result<ConditionalRoutedTransformerBlock<B>> {
        Ok(ConditionalRoutedTransformerBlock {
            conditional_attn: self.attention.init(device)?,
            conditional_ff: self.feed_forward.init(device)?,
        })
    }
}

impl<B: CoorDescentBackend> ConditionalRoutedTransformerBlock<B> {
    /// Applies the block.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let x = self.conditional_attn.forward(x.clone(), mask.clone())? + x;
        Ok(self.conditional_ff.forward(x.clone(), mask, None)? + x)
    }
}
