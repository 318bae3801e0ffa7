//! Windowed local multi-head attention (`LocalMHA` of lucidrains/local-attention), the light
//! branch of CoLT5's routed attention.

use crate::norm::{LayerNorm, LayerNormConfig};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::softmax, backend::Backend, Bool, Int, Tensor, TensorData};

use crate::attention::{merge_heads, split_heads};
use crate::error::Error;
use crate::fused_attention::{fused_attention, AttentionBackend, FusedAttention, Keys};

/// The logit of masked slots: finite, so that a query with no visible key averages over its
/// whole look-around (as the reference does) instead of producing NaN.
const MASKED_LOGIT: f64 = f32::MIN as f64;

/// Configuration of [`LocalMha`]; defaults are `LocalMHA`'s.
#[derive(Config, Debug)]
pub struct LocalMhaConfig {
    /// Model width.
    pub dim: usize,
    /// Window length W.
    pub window_size: usize,
    /// Width of each head. Default 64.
    #[config(default = 64)]
    pub dim_head: usize,
    /// Number of heads. Default 8.
    #[config(default = 8)]
    pub heads: usize,
    /// Causal masking. Default false.
    #[config(default = false)]
    pub causal: bool,
    /// LayerNorm (eps 1e-5) before the projection. Default false.
    #[config(default = false)]
    pub prenorm: bool,
    /// Restrict keys to the band `[i − W·look_backward, i + W·look_forward]` instead of
    /// whole windows. Default true.
    #[config(default = true)]
    pub exact_windowsize: bool,
    /// Windows looked back. Default 1.
    #[config(default = 1)]
    pub look_backward: usize,
    /// Windows looked ahead; `None` means 0 when causal, else 1. Default `None`.
    #[config(default = "None")]
    pub look_forward: Option<usize>,
}

/// Local attention: the sequence is zero-padded to a multiple of W and cut into windows;
/// each query attends to the keys of its window and `look_backward`/`look_forward`
/// neighbouring windows.
///
/// Reproduces the reference's behaviour where it matters for parity: without a mask the
/// zero-padded tail is attendable (non-causal), and a query that sees no key averages its
/// whole look-around, where slots beyond the sequence hold −1 vectors.
///
/// PyTorch parameters: `norm.weight`, `norm.bias` (with `prenorm`), `to_qkv.weight
/// [3·heads·dim_head, dim]`, `to_out.weight [dim, heads·dim_head]`.
///
/// Shapes: `x: [batch, n, dim]`, mask `[batch, n]` → `[batch, n, dim]`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use colt5::local_attention::LocalMhaConfig;
///
/// let device = Default::default();
/// let attn = LocalMhaConfig::new(16, 4).with_heads(2).with_dim_head(8).init::<NdArray>(&device).unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 10, 16], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attn.forward(x, None).unwrap().dims(), [2, 10, 16]);
/// ```
#[derive(Module, Debug)]
pub struct LocalMha<B: Backend> {
    /// Optional pre-normalisation.
    pub norm: Option<LayerNorm<B>>,
    /// Joint query/key/value projection.
    pub to_qkv: Linear<B>,
    /// Output projection.
    pub to_out: Linear<B>,
    heads: usize,
    window: usize,
    causal: bool,
    exact: bool,
    look_backward: usize,
    look_forward: usize,
}

impl LocalMhaConfig {
    /// A layer with PyTorch's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<LocalMha<B>> {
        if self.window_size == 0 {
            return Err(Error::config("window_size", 0, "at least 1"));
        }
        let look_forward = self.look_forward.unwrap_or(usize::from(!self.causal));
        if self.causal && look_forward > 0 {
            return Err(Error::config(
                "look_forward",
                look_forward,
                "0 with causal attention",
            ));
        }
        let inner = self.heads * self.dim_head;
        Ok(LocalMha {
            norm: self
                .prenorm
                .then(|| LayerNormConfig::new(self.dim).init(device)),
            to_qkv: LinearConfig::new(self.dim, 3 * inner)
                .with_bias(false)
                .init(device),
            to_out: LinearConfig::new(inner, self.dim)
                .with_bias(false)
                .init(device),
            heads: self.heads,
            window: self.window_size,
            causal: self.causal,
            exact: self.exact_windowsize,
            look_backward: self.look_backward,
            look_forward,
        })
    }
}

impl<B: AttentionBackend> LocalMha<B> {
    /// Attends each position to its neighbourhood; `mask` marks real tokens (keys only).
    ///
    /// Without a mask, backends with fused attention (CUDA, wgpu) attend over the band
    /// directly, never materialising the windows' logits.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> crate::Result<Tensor<B, 3>> {
        let [batch, n, dim] = x.dims();
        let expected = self.to_qkv.weight.dims()[0];
        if dim != expected || n == 0 {
            return Err(Error::Shape {
                name: "x",
                actual: vec![batch, n, dim],
                expected: format!("[batch, n ≥ 1, {expected}]"),
            });
        }
        if let Some(mask) = &mask {
            if mask.dims() != [batch, n] {
                return Err(Error::Shape {
                    name: "mask",
                    actual: mask.dims().to_vec(),
                    expected: format!("[{batch}, {n}]"),
                });
            }
        }
        let device = x.device();
        let qkv = crate::linear::by_chunks(x, |x| {
            let x = match &self.norm {
                Some(norm) => norm.forward(x),
                None => x,
            };
            crate::linear::apply(&self.to_qkv, x)
        });
        let [q, k, v] = split_heads::<B, 3>(qkv, self.heads);
        let dim_head = q.dims()[3];
        let (w, lb, lf) = (self.window, self.look_backward, self.look_forward);
        let windows = n.div_ceil(w);
        let padded = windows * w;
        let slots = (lb + lf + 1) * w;
        let pad = |t: Tensor<B, 4>| {
            if padded == n {
                t
            } else {
                let zeros = Tensor::zeros([batch, self.heads, padded - n, dim_head], &device);
                Tensor::cat(vec![t, zeros], 2)
            }
        };
        let scale = (dim_head as f64).powf(-0.5);
        let (q, k, v) = (pad(q), pad(k), pad(v));
        if mask.is_none() {
            let spec = FusedAttention {
                keys: Keys::Band {
                    window: w,
                    look_backward: lb,
                    look_forward: lf,
                    exact: self.exact,
                },
                causal: self.causal,
                scale,
            };
            // Every query sees at least itself here, so the look-around's outside slots, which
            // the fused band omits, would weigh exactly 0.
            if let Some(out) = fused_attention(q.clone(), k.clone(), v.clone(), None, &spec) {
                let out = out.narrow(2, 0, n);
                return Ok(crate::linear::forward(&self.to_out, merge_heads(out)));
            }
        }
        let to_windows = |t: Tensor<B, 4>| t.reshape([batch, self.heads, windows, w, dim_head]);
        let q = to_windows(q).mul_scalar(scale);
        let k = self.look_around(to_windows(k));
        let v = self.look_around(to_windows(v));

        let mut visible = self
            .band(windows, &device)
            .unsqueeze::<5>()
            .expand([batch, self.heads, windows, w, slots]);
        if let Some(mask) = mask {
            let mask = if padded == n {
                mask
            } else {
                let tail = Tensor::<B, 2, Bool>::from_data(
                    TensorData::new(vec![false; batch * (padded - n)], [batch, padded - n]),
                    &device,
                );
                Tensor::cat(vec![mask, tail], 1)
            };
            // Look around the mask like the keys (slots beyond the sequence are masked by the band).
            let mask = self
                .look_around(mask.float().reshape([batch, 1, windows, w, 1]))
                .reshape([batch, 1, windows, 1, slots])
                .greater_elem(0.5);
            visible = visible.bool_and(mask.expand([batch, self.heads, windows, w, slots]));
        }
        let logits = q
            .matmul(k.swap_dims(3, 4))
            .mask_fill(visible.bool_not(), MASKED_LOGIT);
        let out = softmax(logits, 4).matmul(v);
        let out = out
            .reshape([batch, self.heads, padded, dim_head])
            .narrow(2, 0, n);
        Ok(crate::linear::forward(&self.to_out, merge_heads(out)))
    }

    /// `[.., windows, W, d]` → `[.., windows, (lb + lf + 1)·W, d]`: each window followed by its
    /// neighbours' rows, −1 where a neighbour lies outside the sequence.
    fn look_around(&self, t: Tensor<B, 5>) -> Tensor<B, 5> {
        let [b, h, windows, w, d] = t.dims();
        let (lb, lf) = (self.look_backward, self.look_forward);
        let device = t.device();
        let outside = |count| Tensor::full([b, h, count, w, d], -1.0, &device);
        let mut parts = Vec::new();
        if lb > 0 {
            parts.push(outside(lb));
        }
        parts.push(t);
        if lf > 0 {
            parts.push(outside(lf));
        }
        let extended = Tensor::cat(parts, 2);
        let neighbours = (0..=lb + lf)
            .map(|c| extended.clone().narrow(2, c, windows))
            .collect();
        Tensor::cat(neighbours, 3)
    }

    /// Which look-around slot each query may see, `[windows, W, slots]`: the slot must lie
    /// inside the sequence and, per the options, before the query (causal) and inside the
    /// exact band. Built on the device from position ranges.
    fn band(&self, windows: usize, device: &B::Device) -> Tensor<B, 3, Bool> {
        let (w, lb, lf) = (
            self.window as i64,
            self.look_backward as i64,
            self.look_forward as i64,
        );
        let slots = (lb + lf + 1) * w;
        let shape = [windows, self.window, slots as usize];
        let range =
            |end: i64, dims: [usize; 3]| Tensor::<B, 1, Int>::arange(0..end, device).reshape(dims);
        let window = range(windows as i64, [windows, 1, 1]);
        let slot = range(slots, [1, 1, slots as usize]);
        // Query i = window·W + r; slot s holds position p = (window − lb)·W + s of window
        // window − lb + s / W.
        let query = (window.clone().mul_scalar(w) + range(w, [1, self.window, 1])).expand(shape);
        let key_window = window.clone().sub_scalar(lb) + slot.clone().div_scalar(w);
        let position = (window.sub_scalar(lb).mul_scalar(w) + slot).expand(shape);
        let mut visible = key_window
            .clone()
            .greater_equal_elem(0)
            .bool_and(key_window.lower_elem(windows as i64))
            .expand(shape);
        if self.causal {
            visible = visible.bool_and(position.clone().lower_equal(query.clone()));
            if self.exact {
                visible = visible.bool_and(query.lower_equal(position.add_scalar(w * lb)));
            }
        } else if self.exact {
            visible = visible
                .bool_and(
                    position
                        .clone()
                        .lower_equal(query.clone().add_scalar(w * lf)),
                )
                .bool_and(position.greater_equal(query.sub_scalar(w * lb)));
        }
        visible
    }
}
