//! Matrix products of token-wise layers through a backend's fastest kernel.
//!
//! A linear layer over a long sequence is one product `[tokens, d_in] · [d_in, d_out]`
//! forward and two backward (`dy·Wᵀ` and `xᵀ·dy`, whose inner dimension is the number of
//! tokens). [`MatmulBackend::gemm`] lets a backend run such products with a library
//! kernel: the CUDA backend calls cuBLAS (`cublas.rs`) where it is installed and the product
//! is large enough to pay for the hand-over between CubeCL's stream and cuBLAS's; every
//! other backend, and small products, take burn's `matmul`.

mod autodiff;
mod cpu;
#[cfg(feature = "cuda")]
mod cublas;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// Backends that may run 2-D matrix products with a faster kernel than burn's `matmul`.
/// The default runs none.
pub trait MatmulBackend: Backend {
    /// `op(a) · op(b)` of row-major matrices, `op` transposing where `transpose` says
    /// (`[a, b]`): `a` is `[m, k]` (`[k, m]` transposed), `b` is `[k, n]` (`[n, k]`
    /// transposed), the result `[m, n]`. `None` where the backend has no faster kernel for
    /// the call; the caller then uses burn's `matmul`. Autodiff backends record the
    /// product for the backward pass.
    fn gemm(
        _a: FloatTensor<Self>,
        _b: FloatTensor<Self>,
        _transpose: [bool; 2],
    ) -> Option<FloatTensor<Self>> {
        None
    }
}

impl_for_ndarray!(MatmulBackend {});

impl MatmulBackend for burn::backend::Flex {
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose: [bool; 2],
    ) -> Option<FloatTensor<Self>> {
        cpu::gemm(a, b, transpose)
    }
}

/// CubeCL runtimes that may run [`MatmulBackend::gemm`] with a library kernel: CUDA with
/// cuBLAS; the default (wgpu) runs none.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub trait RuntimeGemm: burn_cubecl::CubeRuntime {
    /// [`MatmulBackend::gemm`] on this runtime's tensors.
    fn gemm(
        _a: burn_cubecl::tensor::CubeTensor<Self>,
        _b: burn_cubecl::tensor::CubeTensor<Self>,
        _transpose: [bool; 2],
    ) -> Option<burn_cubecl::tensor::CubeTensor<Self>> {
        None
    }
}

#[cfg(feature = "wgpu")]
impl RuntimeGemm for burn_cubecl::cubecl::wgpu::WgpuRuntime {}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<R, F, I, BT> MatmulBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: RuntimeGemm,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose: [bool; 2],
    ) -> Option<FloatTensor<Self>> {
        R::gemm(a, b, transpose)
    }
}

/// `x · w + bias` for `x: [..., d_in]`, a weight `w: [d_in, d_out]` and a bias
/// `[d_out]`: with every leading dimension of `x` one row of a single product through
/// [`MatmulBackend::gemm`] where the backend has a faster kernel for it, else burn's
/// `linear` as [`burn::nn::Linear`] runs it.
pub fn linear<B: MatmulBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let flat = x.clone().reshape([rows, dims[D - 1]]);
    let Some(product) = B::gemm(
        flat.into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
        [false, false],
    ) else {
        return burn::tensor::module::linear(x, w, bias);
    };
    let mut out_dims = dims;
    out_dims[D - 1] = w.dims()[1];
    let out = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(product)).reshape(out_dims);
    match bias {
        Some(bias) => out + bias.unsqueeze(),
        None => out,
    }
}
