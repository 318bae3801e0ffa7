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

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor};

/// Writes `routed: [batch, k, dim]` into `base: [batch, n, dim]` at `indices: [batch, k]`
/// (unique per row), replacing what was there.
pub(crate) fn route_back<B: Backend>(
    base: Tensor<B, 3>,
    routed: Tensor<B, 3>,
    indices: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let [batch, count, dim] = routed.dims();
    let indices = indices.unsqueeze_dim::<3>(2).expand([batch, count, dim]);
    // Zero the selected rows, then add: an assignment that autodiff differentiates.
    let cleared = base.clone().scatter(
        1,
        indices.clone(),
        base.gather(1, indices.clone()).neg(),
        IndexingUpdateOp::Add,
    );
    cleared.scatter(1, indices, routed, IndexingUpdateOp::Add)
}
