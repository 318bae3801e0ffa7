//! CubeCL backends run the normalisation kernels of `colt5-kernels`.

use burn::tensor::ops::FloatTensor;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeElement, CubeRuntime, FloatElement, IntElement};
use colt5_kernels::{NormInputs, NormKind, Rows, NORM_STATS};

use super::{NormBackend, Normalization};

impl<R, F, I, BT> NormBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime + crate::matmul::RuntimeGemm,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    const FUSES_NORM: bool = true;

    fn norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: Option<FloatTensor<Self>>,
        kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        // f32 only: in bf16 the routed block's test on an H100 read non-finite outputs
        // through the fused kernels, not yet explained; bf16 composes tensor operations.
        let f32 = burn::tensor::DType::F32;
        if F::dtype() != f32 || x.dtype != f32 || gamma.dtype != f32 {
            return None;
        }
        let (x, gamma, beta) = (
            into_contiguous(x),
            into_contiguous(gamma),
            beta.map(into_contiguous),
        );
        let inputs = inputs(&x, &gamma, beta.as_ref(), kind);
        let (y, stats) = colt5_kernels::norm_forward::<R, F>(&x.client, &inputs).ok()?;
        let rows = inputs.shape.rows;
        Some((
            tensor::<R, F>(&x, y, x.meta.shape.clone()),
            tensor::<R, f32>(&x, stats, Shape::new([rows, NORM_STATS])),
        ))
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: Normalization,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let (x, gamma, stats, grad) = (
            into_contiguous(x),
            into_contiguous(gamma),
            into_contiguous(stats),
            into_contiguous(grad),
        );
        let inputs = inputs(&x, &gamma, None, kind);
        let (dx, grad_x_hat) =
            colt5_kernels::norm_backward::<R, F>(&x.client, &inputs, &stats.handle, &grad.handle)
                .ok()?;
        Some((
            tensor::<R, F>(&x, dx, x.meta.shape.clone()),
            tensor::<R, F>(&x, grad_x_hat, x.meta.shape.clone()),
        ))
    }
}

/// The kernels' view of a call on contiguous tensors (`x: [rows, dim]`).
fn inputs<'a, R: CubeRuntime>(
    x: &'a CubeTensor<R>,
    gamma: &'a CubeTensor<R>,
    beta: Option<&'a CubeTensor<R>>,
    kind: Normalization,
) -> NormInputs<'a> {
    let [rows, n] = x.meta.shape.dims::<2>();
    NormInputs {
        x: &x.handle,
        gamma: &gamma.handle,
        beta: beta.map(|beta| &beta.handle),
        shape: Rows { rows, n },
        kind: match kind {
            Normalization::Layer { eps } => NormKind::Layer { eps: eps as f32 },
            Normalization::Rms { eps } => NormKind::Rms { eps: eps as f32 },
        },
    }
}

/// A contiguous tensor of element `E` over `handle`, on `like`'s device.
fn tensor<R: CubeRuntime, E: CubeElement>(
    like: &CubeTensor<R>,
    handle: burn_cubecl::cubecl::server::Handle,
    shape: Shape,
) -> CubeTensor<R> {
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        E::dtype(),
    )
}
