//! [`AdamBackend::adam_step`](super::AdamBackend::adam_step) on `Flex`: one pass over the
//! entries (split across the cores for large tensors by `crate::parallel`), each entry's
//! arithmetic that of burn's tensor operations in their order, so the results are those of
//! burn's `Adam`.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::AdamStep;
use crate::parallel::parallel_rows;

/// The new parameter and moments, or `None` for tensors that are not f32.
pub(super) fn adam_step(
    param: FlexTensor,
    grad: FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    step: &AdamStep,
) -> Option<[FlexTensor; 3]> {
    let f32_values = |t: FlexTensor| (t.dtype() == DType::F32).then(|| t.to_contiguous());
    let (param, grad) = (f32_values(param)?, f32_values(grad)?);
    let moments = match moments {
        Some((m1, m2)) => Some((f32_values(m1)?, f32_values(m2)?)),
        None => None,
    };
    let (p, g) = (param.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let moments = match &moments {
        Some((m1, m2)) => Some((m1.as_slice::<f32>()?, m2.as_slice::<f32>()?)),
        None => None,
    };
    let len = p.len();
    let lr = step.lr as f32;
    let mut out = [vec![0f32; len], vec![0f32; len], vec![0f32; len]];
    let [new_p, new_m1, new_m2] = &mut out;
    let outputs = [&mut new_p[..], &mut new_m1[..], &mut new_m2[..]];
    parallel_rows(
        len,
        [1, 1, 1],
        outputs,
        len,
        |start, [new_p, new_m1, new_m2]| {
            for j in 0..new_p.len() {
                let i = start + j;
                let mut m1 = g[i] * (1.0 - step.beta_1);
                let mut m2 = g[i] * g[i] * (1.0 - step.beta_2);
                if let Some((moment_1, moment_2)) = moments {
                    m1 += moment_1[i] * step.beta_1;
                    m2 += moment_2[i] * step.beta_2;
                }
                let update = m1 * step.factor / (m2.sqrt() + step.epsilon);
                new_p[j] = p[i] - update * lr;
                new_m1[j] = m1;
                new_m2[j] = m2;
            }
        },
    );
    Some(out.map(|values| FlexTensor::from_data(TensorData::new(values, [len]))))
}
