//! Registers the fused attention with burn's autodiff: the forward keeps the inputs'
//! handles, the output and the log-sum-exp; the backward runs the inner backend's
//! [`attention_backward`](AttentionBackend::attention_backward).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::ops::{BoolTensor, FloatTensor};

use super::{AttentionBackend, FusedAttention};

/// q, k, v, the mask, the output, the log-sum-exp and the call.
type State<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<BoolTensor<B>>,
    FloatTensor<B>,
    FloatTensor<B>,
    FusedAttention,
);

#[derive(Debug)]
struct AttentionBackward;

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, mask, out, lse, spec) = ops.state;
        let gradients = B::attention_backward(q, k, v, mask, out, lse, grad, &spec)
            .expect("a backend with a fused attention forward has its backward");
        for (node, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        spec: &FusedAttention,
    ) -> Option<FloatTensor<Self>> {
        let (out, lse) = B::attention_forward(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            mask.clone(),
            spec,
        )?;
        Some(
            match AttentionBackward
                .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (
                        q.primitive,
                        k.primitive,
                        v.primitive,
                        mask,
                        out.clone(),
                        lse,
                        *spec,
                    );
                    prep.finish(state, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }
}
