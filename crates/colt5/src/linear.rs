//! Token-wise layers over long sequences, with the gradients of their shared parameters
//! split across chunks of tokens.
//!
//! The weight gradient of `y = x·W` is `xᵀ·dy`, a product whose inner dimension is the
//! number of tokens: at 65 536 tokens and a 512 × 1 536 weight, burn's CubeCL matmul runs
//! it as a few output tiles each looping over 65 536 terms, and a light feed-forward's
//! backward took 35 ms on an H200 against 1.7 ms for its forward. Feeding the layer the
//! tokens as `[chunks, CHUNK, dim]` makes burn compute one partial gradient per chunk side
//! by side and sum them (its linear backward sums over batch dimensions): the same values,
//! up to the order of the sum.

use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use crate::matmul::MatmulBackend;

/// Tokens per chunk: long enough for efficient products, short enough that a weight
/// gradient over a long sequence is split into many parallel pieces.
const CHUNK: usize = 2048;

/// Shortest chunk tried when the token count is not a multiple of [`CHUNK`].
const MIN_CHUNK: usize = 256;

/// The chunk length for `rows` tokens: `None` for at most [`CHUNK`] tokens, or when no
/// power-of-two chunk of at least [`MIN_CHUNK`] divides them.
pub(crate) fn chunk_len(rows: usize) -> Option<usize> {
    let mut chunk = CHUNK;
    while chunk >= MIN_CHUNK && rows % chunk != 0 {
        chunk /= 2;
    }
    (rows > CHUNK && chunk >= MIN_CHUNK).then_some(chunk)
}

/// `layer` applied to `x: [..., tokens, d_in]`, the tokens (all leading dimensions
/// together) fed in chunks of [`chunk_len`].
pub(crate) fn forward<B: MatmulBackend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    by_chunks(x, |x| apply(layer, x))
}

/// `layer` applied to `x: [..., d_in]` through [`crate::matmul::linear`] (cuBLAS for long
/// sequences on CUDA, burn's `Linear` elsewhere).
pub(crate) fn apply<B: MatmulBackend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    crate::matmul::linear(
        x,
        layer.weight.val(),
        layer.bias.as_ref().map(|bias| bias.val()),
    )
}

/// `f`, a token-wise function of `[chunks, tokens, d_in]` to `[chunks, tokens, d_out]`,
/// applied to `x: [..., tokens, d_in]` with the tokens (all leading dimensions together)
/// in chunks of [`chunk_len`]: the gradients of parameters that every token shares
/// (weights, biases, norm gains) are then sums over chunks of partial sums, which burn
/// computes in parallel, instead of single reductions over every token.
pub(crate) fn by_chunks<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let chunk = chunk_len(rows).unwrap_or(rows);
    let out = f(x.reshape([rows / chunk, chunk, dims[D - 1]]));
    let mut out_dims = dims;
    out_dims[D - 1] = out.dims()[2];
    out.reshape(out_dims)
}
