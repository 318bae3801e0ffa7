//! Scaled dot-product attention with key masks, right-aligned causal masking and dropout.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{activation::softmax, backend::Backend, Bool, Tensor, TensorData};

use crate::error::Error;
use crate::fused_attention::{fused_attention, AttentionBackend, FusedAttention, Keys};

/// The logit given to masked keys: the most negative f32, exactly representable in f32 and
/// f64, so masked keys get weight exactly 0 next to any visible key.
const MASKED_LOGIT: f64 = f32::MIN as f64;

/// Configuration of [`Attend`].
#[derive(Config, Debug)]
pub struct AttendConfig {
    /// Dropout on the attention weights, applied only when autodiff is on (training).
    /// Default 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Causal masking: query i sees keys up to i + (keys − queries), so that the last query
    /// is aligned with the last key (correct with a key/value cache). Default false.
    #[config(default = false)]
    pub causal: bool,
    /// Logit scale; `None` uses `dim_head^-0.5`. Default `None`.
    #[config(default = "None")]
    pub scale: Option<f64>,
}

/// Attention of queries over keys and values; no parameters.
///
/// Shapes: `q: [batch, heads, queries, dim_head]`, `k, v: [batch, heads, keys, dim_head]`,
/// mask (`true` = visible) broadcastable to `[batch, heads, queries, keys]` (typically
/// `[batch, 1, 1, keys]`) → `[batch, heads, queries, dim_head]`.
///
/// A query that sees no key at all (every key masked, or causal with more queries than
/// keys) outputs zeros, with zero gradient. The reference outputs the mean of the values
/// there (its non-flash path) or zeros (its flash path with a causal mask).
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::attend::AttendConfig;
///
/// let device = Default::default();
/// let q = Tensor::<NdArray, 4>::random([1, 2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
/// let kv = Tensor::<NdArray, 4>::random([1, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
/// let attend = AttendConfig::new().with_causal(true).init();
/// let out = attend.forward(q, kv.clone(), kv, None).unwrap();
/// assert_eq!(out.dims(), [1, 2, 3, 8]);
/// ```
#[derive(Module, Clone, Debug)]
pub struct Attend {
    dropout: Dropout,
    causal: bool,
    scale: Option<f64>,
}

impl AttendConfig {
    /// Builds the (parameterless) module.
    pub fn init(&self) -> Attend {
        Attend {
            dropout: DropoutConfig::new(self.dropout).init(),
            causal: self.causal,
            scale: self.scale,
        }
    }
}

impl Attend {
    /// Attends; errors name the tensor whose shape does not fit.
    ///
    /// Without dropout and with a mask that does not vary over the queries, backends with
    /// fused attention (CUDA, wgpu) attend without materialising the logits.
    pub fn forward<B: AttentionBackend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
    ) -> crate::Result<Tensor<B, 4>> {
        let [batch, heads, queries, dim_head] = q.dims();
        let keys = k.dims()[2];
        let kv_shape = [batch, heads, keys, dim_head];
        for (name, tensor) in [("k", &k), ("v", &v)] {
            if tensor.dims() != kv_shape {
                return Err(Error::Shape {
                    name,
                    actual: tensor.dims().to_vec(),
                    expected: format!("{kv_shape:?} (batch, heads and dim_head of q)"),
                });
            }
        }
        let scores_shape = [batch, heads, queries, keys];
        let scale = self.scale.unwrap_or((dim_head as f64).powf(-0.5));
        let per_key = mask.as_ref().is_none_or(|mask| mask.dims()[2] == 1);
        if self.dropout.prob == 0.0 && per_key && queries > 0 && keys > 0 {
            let spec = FusedAttention {
                keys: Keys::All,
                causal: self.causal,
                scale,
            };
            let key_mask = match &mask {
                Some(mask) => Some(self.key_mask(mask.clone(), [batch, heads, keys])?),
                None => None,
            };
            if let Some(out) = fused_attention(q.clone(), k.clone(), v.clone(), key_mask, &spec) {
                return Ok(out);
            }
        }
        let mut visible = match mask {
            Some(mask) => {
                if mask
                    .dims()
                    .iter()
                    .zip(scores_shape)
                    .any(|(&m, s)| m != s && m != 1)
                {
                    return Err(Error::Shape {
                        name: "mask",
                        actual: mask.dims().to_vec(),
                        expected: format!("broadcastable to {scores_shape:?}"),
                    });
                }
                Some(mask.expand(scores_shape))
            }
            None => None,
        };
        if self.causal {
            let causal = causal_mask::<B>(queries, keys, &q.device())
                .unsqueeze::<4>()
                .expand(scores_shape);
            visible = Some(match visible {
                Some(mask) => mask.bool_and(causal),
                None => causal,
            });
        }

        let logits = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let Some(visible) = visible else {
            let weights = self.dropout.forward(softmax(logits, 3));
            return Ok(weights.matmul(v));
        };
        let weights = softmax(
            logits.mask_fill(visible.clone().bool_not(), MASKED_LOGIT),
            3,
        );
        let out = self.dropout.forward(weights).matmul(v);
        let sees_nothing = visible
            .any_dim(3)
            .bool_not()
            .expand([batch, heads, queries, dim_head]);
        Ok(out.mask_fill(sees_nothing, 0.0))
    }
}

impl Attend {
    /// A mask `[batch or 1, heads or 1, 1, keys or 1]` as the fused attention's
    /// `[batch, heads, keys]`.
    fn key_mask<B: Backend>(
        &self,
        mask: Tensor<B, 4, Bool>,
        [batch, heads, keys]: [usize; 3],
    ) -> crate::Result<Tensor<B, 3, Bool>> {
        let dims = mask.dims();
        if [dims[0], dims[1], dims[3]]
            .iter()
            .zip([batch, heads, keys])
            .any(|(&m, s)| m != s && m != 1)
        {
            return Err(Error::Shape {
                name: "mask",
                actual: dims.to_vec(),
                expected: format!("broadcastable to {:?}", [batch, heads, 1, keys]),
            });
        }
        Ok(mask
            .expand([batch, heads, 1, keys])
            .reshape([batch, heads, keys]))
    }
}

/// `true` where query i may see key j: j ≤ i + (keys − queries).
fn causal_mask<B: Backend>(queries: usize, keys: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let offset = keys as i64 - queries as i64;
    let visible: Vec<bool> = (0..queries as i64)
        .flat_map(|i| (0..keys as i64).map(move |j| j <= i + offset))
        .collect();
    Tensor::from_data(TensorData::new(visible, [queries, keys]), device)
}
