//! CubeCL backends run the Adam kernel of `colt5-kernels`.

use burn::tensor::ops::FloatTensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use colt5_kernels::AdamScalars;

use super::{AdamBackend, AdamStep};

impl<R, F, I, BT> AdamBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: &AdamStep,
    ) -> Option<[FloatTensor<Self>; 3]> {
        let (param, grad) = (into_contiguous(param), into_contiguous(grad));
        let moments = moments.map(|(m1, m2)| (into_contiguous(m1), into_contiguous(m2)));
        let scalars = AdamScalars {
            lr: step.lr as f32,
            beta_1: step.beta_1,
            beta_2: step.beta_2,
            factor: step.factor,
            epsilon: step.epsilon,
        };
        let outputs = colt5_kernels::adam_step::<R, F>(
            &param.client,
            &param.handle,
            &grad.handle,
            moments.as_ref().map(|(m1, m2)| (&m1.handle, &m2.handle)),
            param.meta.shape.num_elements(),
            scalars,
        )
        .ok()?;
        Some(outputs.map(|handle| {
            CubeTensor::new_contiguous(
                param.client.clone(),
                param.device.clone(),
                param.meta.shape.clone(),
                handle,
                param.dtype,
            )
        }))
    }
}
