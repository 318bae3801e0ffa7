//! Registers [`MatmulBackend::gemm`] with burn's autodiff. For `c = op(a)·op(b)` the
//! gradients are products again, run by the inner backend's `gemm` (burn's `matmul` where
//! it has none): `da = dc·op(b)ᵀ` (stored transposed: `op(b)·dcᵀ`) and `db = op(a)ᵀ·dc`
//! (stored transposed: `dcᵀ·op(a)`).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::ops::FloatTensor;

use super::MatmulBackend;

/// `op(a) · op(b)` on the inner backend: its `gemm`, or burn's `matmul` of the operands
/// transposed as asked.
fn product<B: MatmulBackend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    transpose: [bool; 2],
) -> FloatTensor<B> {
    B::gemm(a.clone(), b.clone(), transpose).unwrap_or_else(|| {
        let a = if transpose[0] {
            B::float_transpose(a)
        } else {
            a
        };
        let b = if transpose[1] {
            B::float_transpose(b)
        } else {
            b
        };
        B::float_matmul(a, b)
    })
}

#[derive(Debug)]
struct GemmBackward;

impl<B: MatmulBackend> Backward<B, 2> for GemmBackward {
    /// a, b and the forward's transposes.
    type State = (FloatTensor<B>, FloatTensor<B>, [bool; 2]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, [ta, tb]) = ops.state;
        let [node_a, node_b] = ops.parents;
        if let Some(node) = node_a {
            let da = if ta {
                product::<B>(b, grad.clone(), [tb, true])
            } else {
                product::<B>(grad.clone(), b, [false, !tb])
            };
            grads.register::<B>(node.id, da);
        }
        if let Some(node) = node_b {
            let db = if tb {
                product::<B>(grad, a, [true, ta])
            } else {
                product::<B>(a, grad, [!ta, false])
            };
            grads.register::<B>(node.id, db);
        }
    }
}

impl<B: MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose: [bool; 2],
    ) -> Option<FloatTensor<Self>> {
        let out = B::gemm(a.primitive.clone(), b.primitive.clone(), transpose)?;
        Some(
            match GemmBackward
                .prepare::<C>([a.node.clone(), b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive, transpose), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            },
        )
    }
}
