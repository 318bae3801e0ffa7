//! # colt5
//!
//! Conditional computation for long sequences, on [burn](https://burn.dev): the
//! coordinate-descent soft top-k with an exact backward pass, the CoLT5 routed layers, and
//! the coordinate-descent-attention language model. Modules are generic over burn's
//! `Backend`, so the same model runs on CPU (burn's `Flex`, which the CLI uses, or
//! `NdArray`, which the f64 parity tests use) and, with the `cuda` feature, on NVIDIA GPUs.
//!
//! Start with [`coor_descent::coor_descent`], the routing operator.

#![warn(missing_docs)]

/// `impl $trait for NdArray<E, I, Q> { $body }` under the bounds burn's own `Backend` impl
/// for `NdArray` carries, for the backend extensions.
macro_rules! impl_for_ndarray {
    ($trait:path { $($body:tt)* }) => {
        impl<E, I, Q> $trait for burn::backend::NdArray<E, I, Q>
        where
            E: burn::backend::ndarray::FloatNdArrayElement,
            I: burn::backend::ndarray::IntNdArrayElement,
            Q: burn::backend::ndarray::QuantElement,
            burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
            burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
        {
            $($body)*
        }
    };
}

pub mod attend;
pub mod attention;
pub mod coor_descent;
pub mod error;
pub mod feed_forward;
pub mod fused_attention;
pub mod golden;
pub mod import;
mod linear;
pub mod lm;
pub mod local_attention;
pub mod matmul;
pub mod memory;
pub mod norm;
pub mod optim;
mod parallel;
pub mod parity;
pub mod rotary;
pub mod routed;
pub mod router;
mod rows;
pub mod topk;
pub mod train;
pub mod vit;

pub use error::{Error, Result};
