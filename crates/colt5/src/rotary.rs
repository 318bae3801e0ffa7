//! Rotary position embedding (half-split convention).

use burn::tensor::{backend::Backend, ops::FloatElem, Tensor, TensorData};

/// Rotary embedding frequencies for heads of width `dim`: position t gets the angles
/// `[t·ω, t·ω]` with `ω_i = theta^(−2i/dim)`.
///
/// The reference keeps `inv_freq` as a persistent buffer (`rotary_emb.inv_freq` in its
/// `state_dict`); we compute it, and the weight import accepts and ignores it.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    dim: usize,
    theta: f64,
}

impl RotaryEmbedding {
    /// Frequencies for heads of width `dim` (even) with base 10000.
    pub fn new(dim: usize) -> Self {
        RotaryEmbedding {
            dim,
            theta: 10000.0,
        }
    }

    /// The rotation of positions `0..seq_len`, `[seq_len, dim]`, computed in f64 (the
    /// reference computes its tables in f32, so the two agree to about 1e-7).
    pub fn forward<B: Backend>(&self, seq_len: usize, device: &B::Device) -> Rotation<B, 2> {
        let half = self.dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| self.theta.powf(-2.0 * i as f64 / self.dim as f64))
            .collect();
        let angles: Vec<f64> = (0..seq_len)
            .flat_map(|t| {
                let row: Vec<f64> = inv_freq.iter().map(|f| t as f64 * f).collect();
                [row.clone(), row].concat()
            })
            .collect();
        let table = |f: fn(f64) -> f64| {
            let values: Vec<f64> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_data(
                TensorData::new(values, [seq_len, self.dim]).convert::<FloatElem<B>>(),
                device,
            )
        };
        Rotation {
            cos: table(f64::cos),
            sin: table(f64::sin),
        }
    }
}

/// The cosines and sines of rotary angles, broadcastable against the tensors they rotate.
#[derive(Clone, Debug)]
pub struct Rotation<B: Backend, const D: usize> {
    /// cos of each angle.
    pub cos: Tensor<B, D>,
    /// sin of each angle.
    pub sin: Tensor<B, D>,
}

impl<B: Backend, const D: usize> Rotation<B, D> {
    /// Applies the same reshaping or selection to the cosines and sines.
    pub fn map<const D2: usize>(
        self,
        f: impl Fn(Tensor<B, D>) -> Tensor<B, D2>,
    ) -> Rotation<B, D2> {
        Rotation {
            cos: f(self.cos),
            sin: f(self.sin),
        }
    }

    /// `t · cos + rotate_half(t) · sin`, with `rotate_half([a, b]) = [−b, a]` over the halves
    /// of the last axis.
    pub fn apply(&self, t: Tensor<B, D>) -> Tensor<B, D> {
        let dims = t.dims();
        let half = dims[D - 1] / 2;
        let first = t.clone().narrow(D - 1, 0, half);
        let second = t.clone().narrow(D - 1, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], D - 1);
        t * self.cos.clone().expand(dims) + rotated * self.sin.clone().expand(dims)
    }
}
