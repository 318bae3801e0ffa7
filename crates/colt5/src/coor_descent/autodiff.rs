//! Registers the coordinate descent with burn's autodiff: the forward keeps the inputs'
//! handles and the per-row thresholds, and the backward runs the inner backend's
//! [`coor_descent_backward`](CoorDescentBackend::coor_descent_backward).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};

use super::{CoorDescentBackend, CoorDescentConfig, SolveStats};

/// What the backward needs: the scores and k (handles to the caller's tensors, not
/// copies), the mask, the thresholds (`rows × passes` scalars) and the options.
type State<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    Option<BoolTensor<B>>,
    FloatTensor<B>,
    CoorDescentConfig,
);

#[derive(Debug)]
struct CoorDescentBackward;

impl<B: CoorDescentBackend> Backward<B, 2> for CoorDescentBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_scores, node_k] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (scores, k, mask, thresholds, config) = ops.state;
        let (d_scores, d_k) = B::coor_descent_backward(scores, k, mask, thresholds, grad, &config);
        if let Some(node) = node_scores {
            grads.register::<B>(node.id, d_scores);
        }
        if let Some(node) = node_k {
            grads.register::<B>(node.id, d_k);
        }
    }
}

impl<B: CoorDescentBackend, C: CheckpointStrategy> CoorDescentBackend for Autodiff<B, C> {
    fn device_memory(device: &Self::Device) -> Option<(u64, bool)> {
        B::device_memory(device)
    }

    fn coor_descent_rows(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, SolveStats) {
        match CoorDescentBackward
            .prepare::<C>([scores.node.clone(), k.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, thresholds, stats) = B::coor_descent_solve(
                    scores.primitive.clone(),
                    k.primitive.clone(),
                    mask.clone(),
                    config,
                );
                let state = (
                    scores.primitive,
                    k.primitive,
                    mask,
                    thresholds,
                    config.clone(),
                );
                (prep.finish(state, output), stats)
            }
            OpsKind::UnTracked(prep) => {
                let (output, stats) =
                    B::coor_descent_rows(scores.primitive, k.primitive, mask, config);
                (prep.finish(output), stats)
            }
        }
    }

    /// Indices carry no gradient: the inner backend selects.
    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        B::top_k_indices(values.primitive, k)
    }
}
