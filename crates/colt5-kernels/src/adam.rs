//! One Adam step of a parameter tensor in one launch: the moments and the parameter updated
//! together, one unit per entry, in the order of operations of burn's `Adam` (f32).

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::kernels::cube_index;
use crate::{grid, LaunchError, Rows};

/// Units of a cube.
const UNITS: u32 = 256;

/// The scalars of one step: `lr`, `β₁`, `β₂`, and from the step number t the factor
/// `√(1 − β₂ᵗ) / (1 − β₁ᵗ)` and the denominator's `ε · √(1 − β₂ᵗ)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// Learning rate.
    pub lr: f32,
    /// First moment's decay.
    pub beta_1: f32,
    /// Second moment's decay.
    pub beta_2: f32,
    /// Bias correction of the update.
    pub factor: f32,
    /// ε scaled by the second moment's bias correction.
    pub epsilon: f32,
}

/// `m₁ ← β₁ m₁ + (1 − β₁) g`, `m₂ ← β₂ m₂ + (1 − β₂) g²`, `p ← p − lr · m₁ · factor /
/// (√m₂ + ε)` for each of the `len` entries; the moments are taken as 0 when `first`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn adam_step_entries<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    moment_1: &Array<F>,
    moment_2: &Array<F>,
    new_param: &mut Array<F>,
    new_moment_1: &mut Array<F>,
    new_moment_2: &mut Array<F>,
    len: u32,
    lr: f32,
    beta_1: f32,
    beta_2: f32,
    factor: f32,
    epsilon: f32,
    #[comptime] first: bool,
) {
    let i = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < len as usize {
        let g = f32::cast_from(grad[i]);
        let mut m1 = g * (1.0f32 - beta_1);
        let mut m2 = g * g * (1.0f32 - beta_2);
        if comptime![!first] {
            m1 += f32::cast_from(moment_1[i]) * beta_1;
            m2 += f32::cast_from(moment_2[i]) * beta_2;
        }
        let update = m1 * factor / (f32::sqrt(m2) + epsilon);
        new_param[i] = F::cast_from(f32::cast_from(param[i]) - update * lr);
        new_moment_1[i] = F::cast_from(m1);
        new_moment_2[i] = F::cast_from(m2);
    }
}

/// One Adam step of `len` entries: returns the new parameter and moments (element `F`).
/// `moments` absent is the first step (moments 0).
pub fn adam_step<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    param: &Handle,
    grad: &Handle,
    moments: Option<(&Handle, &Handle)>,
    len: usize,
    scalars: AdamScalars,
) -> Result<[Handle; 3], LaunchError> {
    if len == 0 {
        return Err(LaunchError::Empty(Rows { rows: 1, n: 0 }));
    }
    let outputs = [0, 1, 2].map(|_| client.empty(len * F::type_size()));
    let (moment_1, moment_2) = moments.unwrap_or((param, param));
    let array = |handle: &Handle| unsafe { ArrayArg::from_raw_parts(handle.clone(), len) };
    unsafe {
        adam_step_entries::launch_unchecked::<F, R>(
            client,
            grid(len.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            array(param),
            array(grad),
            array(moment_1),
            array(moment_2),
            array(&outputs[0]),
            array(&outputs[1]),
            array(&outputs[2]),
            len as u32,
            scalars.lr,
            scalars.beta_1,
            scalars.beta_2,
            scalars.factor,
            scalars.epsilon,
            moments.is_none(),
        );
    }
    Ok(outputs)
}
