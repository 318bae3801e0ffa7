//! Fused attention: softmax(scale·q·kᵀ)·v without the queries × keys matrix, forward and
//! backward, as a backend extension. CubeCL backends (CUDA, wgpu) run the kernels of
//! `colt5-kernels` (online softmax; the backward recomputes the weights from each query's
//! log-sum-exp); other backends have none, and callers then take their materialised path.
//! [`LocalMha`](crate::local_attention::LocalMha) uses it for its band of windows and
//! [`Attend`](crate::attend::Attend) for whole attention, so long sequences cost memory
//! linear in the band, not quadratic.

mod autodiff;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;

use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// The keys a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys {
    /// Every key.
    All,
    /// Local attention: query i in window `i / window` sees the keys of the windows from
    /// `look_backward` before to `look_forward` after its own; with `exact`, only those
    /// within `window·look_backward` before and `window·look_forward` after it.
    Band {
        /// Window length (≥ 1).
        window: usize,
        /// Windows seen before the query's.
        look_backward: usize,
        /// Windows seen after the query's.
        look_forward: usize,
        /// Limit the band to the windows' lengths around the query.
        exact: bool,
    },
}

/// What one fused attention call computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedAttention {
    /// The keys each query may see.
    pub keys: Keys,
    /// Query i sees no key after `i + (keys − queries)` (right-aligned, as
    /// [`Attend`](crate::attend::Attend)).
    pub causal: bool,
    /// The logits' scale.
    pub scale: f64,
}

/// Backends that may fuse attention. Shapes: `q [batch, heads, queries, dim_head]`,
/// `k, v [batch, heads, keys, dim_head]`, key mask `[batch, heads, keys]` (`true` =
/// visible). A query that sees no key outputs zeros. The defaults fuse nothing.
pub trait AttentionBackend: crate::norm::NormBackend {
    /// The attention's output, or `None` where the backend has no fused kernel for the
    /// call (the caller then computes it another way). Autodiff backends record the
    /// operation for the backward pass.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        spec: &FusedAttention,
    ) -> Option<FloatTensor<Self>> {
        Self::attention_forward(q, k, v, mask, spec).map(|(out, _)| out)
    }

    /// The output and each query's log-sum-exp of its scaled logits (`[batch, heads,
    /// queries]`, f32), or `None` without a kernel for the call.
    fn attention_forward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _mask: Option<BoolTensor<Self>>,
        _spec: &FusedAttention,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Gradients `(dq, dk, dv)` given the forward's output, log-sum-exp and the output's
    /// gradient; `None` where [`attention_forward`](Self::attention_forward) gives none.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _mask: Option<BoolTensor<Self>>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _spec: &FusedAttention,
    ) -> Option<[FloatTensor<Self>; 3]> {
        None
    }
}

impl_for_ndarray!(AttentionBackend {});

impl AttentionBackend for burn::backend::Flex {}

/// [`AttentionBackend::fused_attention`] on tensors.
pub fn fused_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 3, Bool>>,
    spec: &FusedAttention,
) -> Option<Tensor<B, 4>> {
    B::fused_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.map(|mask| mask.into_primitive()),
        spec,
    )
    .map(|out| Tensor::from_primitive(TensorPrimitive::Float(out)))
}
