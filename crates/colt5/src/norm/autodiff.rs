//! Registers the fused normalisation with burn's autodiff: the forward keeps the input, the
//! gain and the rows' statistics; the backward runs the inner backend's
//! [`norm_backward`](NormBackend::norm_backward) and sums the gain's and the bias's
//! gradients over the rows.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

use super::{NormBackend, Normalization};

/// x, γ, the rows' statistics and the call.
type State<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Normalization,
);

/// The backward of a norm whose parents are x and γ (N = 2) or x, γ and β (N = 3).
#[derive(Debug)]
struct NormBackward;

impl<B: NormBackend, const N: usize> Backward<B, N> for NormBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, stats, kind) = ops.state;
        let (dx, grad_x_hat) = B::norm_backward(x, gamma, stats, grad.clone(), kind)
            .expect("a backend with a fused norm forward has its backward");
        let mut gradients = [Some(dx), Some(grad_x_hat), Some(grad)].into_iter();
        for (i, node) in ops.parents.into_iter().enumerate() {
            let gradient = gradients.next().flatten();
            if let (Some(node), Some(gradient)) = (node, gradient) {
                let gradient = match i {
                    0 => gradient,
                    _ => row_sum::<B>(gradient),
                };
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// `[rows, dim]` summed over its rows, in chunks of [`crate::linear::chunk_len`] rows
/// summed side by side before the chunks are added (one reduction over a long sequence
/// runs on few units).
fn row_sum<B: Backend>(values: FloatTensor<B>) -> FloatTensor<B> {
    let values = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(values));
    let [rows, dim] = values.dims();
    let chunk = crate::linear::chunk_len(rows).unwrap_or(rows);
    values
        .reshape([rows / chunk, chunk, dim])
        .sum_dim(1)
        .sum_dim(0)
        .reshape([dim])
        .into_primitive()
        .tensor()
}

impl<B: NormBackend, C: CheckpointStrategy> NormBackend for Autodiff<B, C> {
    const FUSES_NORM: bool = B::FUSES_NORM;

    fn fused_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        kind: Normalization,
    ) -> Option<FloatTensor<Self>> {
        let (y, stats) = B::norm_forward(
            x.primitive.clone(),
            gamma.primitive.clone(),
            beta.as_ref().map(|beta| beta.primitive.clone()),
            kind,
        )?;
        let state = (x.primitive, gamma.primitive, stats, kind);
        // The parents: x, γ and, with a bias, β.
        macro_rules! record {
            ($($node:expr),+) => {
                match NormBackward.prepare::<C>([$($node),+]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(state, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            };
        }
        Some(match beta {
            Some(beta) => record!(x.node, gamma.node, beta.node),
            None => record!(x.node, gamma.node),
        })
    }
}
