//! CoLT5's conditional layers: a light branch for every token plus a heavy branch for the
//! tokens a router selects, whose outputs are scattered back weighted by the router scores.

mod attention;
mod autoregressive_attention;
mod block;
mod cross_attention;
mod feed_forward;
mod image_attention;

pub use attention::{ConditionalRoutedAttention, ConditionalRoutedAttentionConfig};
pub use autoregressive_attention::{
    ConditionalRoutedAutoregressiveAttention, ConditionalRoutedAutoregressiveAttentionConfig,
};
pub use block::{ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerBlockConfig};
pub use cross_attention::{ConditionalRoutedCrossAttention, ConditionalRoutedCrossAttentionConfig};
pub use feed_forward::{ConditionalRoutedFeedForward, ConditionalRoutedFeedForwardConfig};
pub use image_attention::{ConditionalRoutedImageAttention, ConditionalRoutedImageAttentionConfig};
