//! CubeCL backends run the fused attention kernels of `colt5-kernels`; shapes they do not
//! take (`dim_head` above their limit, devices with too little shared memory) get `None`.

use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use colt5_kernels::{AttentionInputs, AttentionShape, AttentionTuning, Band};

use super::{AttentionBackend, FusedAttention, Keys};

impl<R, F, I, BT> AttentionBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime + crate::matmul::RuntimeGemm,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        spec: &FusedAttention,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let call = Call::new(q, k, v, mask, spec);
        let (out, lse) =
            colt5_kernels::attention_forward::<R, F, BT>(&call.q.client, &call.inputs()).ok()?;
        let [batch, heads, queries, _] = call.q.meta.shape.dims::<4>();
        Some((
            call.tensor::<F>(out, call.q.meta.shape.clone()),
            call.tensor::<f32>(lse, Shape::new([batch, heads, queries])),
        ))
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        spec: &FusedAttention,
    ) -> Option<[FloatTensor<Self>; 3]> {
        let call = Call::new(q, k, v, mask, spec);
        let (out, lse, grad) = (
            into_contiguous(out),
            into_contiguous(lse),
            into_contiguous(grad),
        );
        let (dq, dk, dv) = colt5_kernels::attention_backward::<R, F, BT>(
            &call.q.client,
            &call.inputs(),
            &out.handle,
            &lse.handle,
            &grad.handle,
        )
        .ok()?;
        Some([
            call.tensor::<F>(dq, call.q.meta.shape.clone()),
            call.tensor::<F>(dk, call.k.meta.shape.clone()),
            call.tensor::<F>(dv, call.k.meta.shape.clone()),
        ])
    }
}

/// One call's inputs, contiguous on the device, and its band.
struct Call<R: CubeRuntime> {
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    mask: Option<CubeTensor<R>>,
    shape: AttentionShape,
    band: Band,
    scale: f32,
}

impl<R: CubeRuntime> Call<R> {
    fn new(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        mask: Option<CubeTensor<R>>,
        spec: &FusedAttention,
    ) -> Self {
        let [batch, heads, queries, dim_head] = q.meta.shape.dims::<4>();
        let keys = k.meta.shape.dims::<4>()[2];
        let causal_offset = spec.causal.then_some(keys as i64 - queries as i64);
        let band = match spec.keys {
            Keys::All => Band::full(queries, keys, causal_offset),
            Keys::Band {
                window,
                look_backward,
                look_forward,
                exact,
            } => Band {
                window,
                look_backward,
                look_forward,
                causal_offset,
                exact,
            },
        };
        Call {
            q: into_contiguous(q),
            k: into_contiguous(k),
            v: into_contiguous(v),
            mask: mask.map(into_contiguous),
            shape: AttentionShape {
                batch_heads: batch * heads,
                queries,
                keys,
                dim_head,
            },
            band,
            scale: spec.scale as f32,
        }
    }

    fn inputs(&self) -> AttentionInputs<'_> {
        AttentionInputs {
            q: &self.q.handle,
            k: &self.k.handle,
            v: &self.v.handle,
            mask: self.mask.as_ref().map(|mask| &mask.handle),
            shape: self.shape,
            band: self.band,
            scale: self.scale,
            tuning: AttentionTuning::for_band(&self.band, self.shape.keys),
        }
    }

    /// A contiguous tensor of element `E` over `handle`.
    fn tensor<E: burn_cubecl::CubeElement>(
        &self,
        handle: burn_cubecl::cubecl::server::Handle,
        shape: Shape,
    ) -> CubeTensor<R> {
        CubeTensor::new_contiguous(
            self.q.client.clone(),
            self.q.device.clone(),
            shape,
            handle,
            E::dtype(),
        )
    }
}
