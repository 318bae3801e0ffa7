//! Normalisation over the last axis — PyTorch's LayerNorm and CoLT5's RMSNorm — in one
//! launch forward and one backward, one cube per row.
//!
//! Composed of tensor operations, a layer norm is nine kernels forward (a mean, a subtraction, a square, a
//! second mean, an add, a root, a division, the gain and the bias) and about twice as many
//! backward, each a pass over the activations. Here the forward reads a row twice (its
//! mean, then the spread around it), writes the output and keeps two scalars per row; the
//! backward reads the row, the gradient and the gain twice and writes the input's
//! gradient and the products `g · x̂` whose sums over the rows are the gain's gradient.
//! Arithmetic is f32 whatever the element type; the sums within a row are tree reductions
//! in shared memory, in a fixed order.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::kernels::cube_index;
use crate::{grid, LaunchError, Rows};

/// Units of a cube at most: the reductions' shared buffer holds one word a unit.
const MAX_UNITS: usize = 256;

/// Scalars kept per row for the backward: the mean (0 for RMSNorm), the scale `1/σ` (or
/// `√dim / max(‖x‖, eps)`) and whether the scale depends on the row (1) or is the constant
/// of an RMSNorm row whose norm is below eps (0).
pub const NORM_STATS: usize = 3;

/// Which normalisation, with `x̂ = (x − mean) · scale` and `y = x̂ · γ (+ β)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// PyTorch's LayerNorm: mean the row's mean, scale `1 / √(var + eps)` with the biased
    /// variance.
    Layer {
        /// Added to the variance.
        eps: f32,
    },
    /// CoLT5's RMSNorm: mean 0, scale `√dim / max(‖x‖₂, eps)`.
    Rms {
        /// Lower bound of the row's L2 norm.
        eps: f32,
    },
}

/// The sum of every unit's `value` over the cube, returned to every unit (`buffer` holds
/// a word per unit; the cube's width is a power of two).
#[cube]
fn cube_sum(value: f32, buffer: &mut SharedMemory<f32>) -> f32 {
    let unit = UNIT_POS_X as usize;
    buffer[unit] = value;
    sync_cube();
    let mut width = CUBE_DIM_X as usize / 2;
    while width > 0 {
        if unit < width {
            buffer[unit] += buffer[unit + width];
        }
        sync_cube();
        width /= 2;
    }
    let total = buffer[0];
    // Every unit has read the total before the buffer is written again.
    sync_cube();
    total
}

/// `y = x̂ · γ (+ β)` for each row of `x: [rows, dim]`, and the row's [`NORM_STATS`]
/// scalars in `stats`. `beta` is read only when `has_beta`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn norm_forward_rows<F: Float>(
    x: &Array<F>,
    gamma: &Array<F>,
    beta: &Array<F>,
    y: &mut Array<F>,
    stats: &mut Array<f32>,
    rows: u32,
    dim: u32,
    eps: f32,
    #[comptime] centred: bool,
    #[comptime] has_beta: bool,
) {
    let row = cube_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = dim as usize;
    let base = row * n;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let mut buffer = SharedMemory::<f32>::new(MAX_UNITS);
    let mut mean = 0.0f32;
    if comptime![centred] {
        let mut sum = 0.0f32;
        let mut i = unit;
        while i < n {
            sum += f32::cast_from(x[base + i]);
            i += units;
        }
        mean = cube_sum(sum, &mut buffer) / f32::cast_from(dim);
    }
    let mut squares = 0.0f32;
    let mut i = unit;
    while i < n {
        let centred_value = f32::cast_from(x[base + i]) - mean;
        squares += centred_value * centred_value;
        i += units;
    }
    let squares = cube_sum(squares, &mut buffer);
    let norm = f32::sqrt(squares);
    let mut scale = f32::sqrt(f32::cast_from(dim)) / f32::max(norm, eps);
    let mut active = 1.0f32;
    if comptime![centred] {
        scale = 1.0f32 / f32::sqrt(squares / f32::cast_from(dim) + eps);
    } else if norm <= eps {
        active = 0.0f32;
    }
    let mut i = unit;
    while i < n {
        let mut value = (f32::cast_from(x[base + i]) - mean) * scale * f32::cast_from(gamma[i]);
        if comptime![has_beta] {
            value += f32::cast_from(beta[i]);
        }
        y[base + i] = F::cast_from(value);
        i += units;
    }
    if unit == 0 {
        stats[row * NORM_STATS] = mean;
        stats[row * NORM_STATS + 1] = scale;
        stats[row * NORM_STATS + 2] = active;
    }
}

/// The input's gradient `dx` and the products `g · x̂` (whose sums over rows are the gain's
/// gradient) of each row, from the forward's `stats` and the output's gradient `grad`:
/// with `h = g · γ`, `dx = scale · (h − mean(h) − x̂ · mean(h · x̂))`, the first mean only
/// when `centred`, the second only for rows whose scale depends on them.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn norm_backward_rows<F: Float>(
    x: &Array<F>,
    gamma: &Array<F>,
    grad: &Array<F>,
    stats: &Array<f32>,
    dx: &mut Array<F>,
    grad_x_hat: &mut Array<F>,
    rows: u32,
    dim: u32,
    #[comptime] centred: bool,
) {
    let row = cube_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = dim as usize;
    let base = row * n;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let mut buffer = SharedMemory::<f32>::new(MAX_UNITS);
    let mean = stats[row * NORM_STATS];
    let scale = stats[row * NORM_STATS + 1];
    let active = stats[row * NORM_STATS + 2];
    let mut h_sum = 0.0f32;
    let mut h_x_hat_sum = 0.0f32;
    let mut i = unit;
    while i < n {
        let x_hat = (f32::cast_from(x[base + i]) - mean) * scale;
        let h = f32::cast_from(grad[base + i]) * f32::cast_from(gamma[i]);
        h_sum += h;
        h_x_hat_sum += h * x_hat;
        i += units;
    }
    let inverse_dim = 1.0f32 / f32::cast_from(dim);
    let mut h_mean = 0.0f32;
    if comptime![centred] {
        h_mean = cube_sum(h_sum, &mut buffer) * inverse_dim;
    }
    let h_x_hat_mean = cube_sum(h_x_hat_sum, &mut buffer) * inverse_dim * active;
    let mut i = unit;
    while i < n {
        let x_hat = (f32::cast_from(x[base + i]) - mean) * scale;
        let g = f32::cast_from(grad[base + i]);
        let h = g * f32::cast_from(gamma[i]);
        dx[base + i] = F::cast_from(scale * (h - h_mean - x_hat * h_x_hat_mean));
        grad_x_hat[base + i] = F::cast_from(g * x_hat);
        i += units;
    }
}

/// The inputs of a normalisation: `x: [rows, dim]`, the gain `[dim]` and an optional bias
/// `[dim]`, all of element `F`, contiguous.
pub struct NormInputs<'a> {
    /// The rows.
    pub x: &'a Handle,
    /// The gain γ.
    pub gamma: &'a Handle,
    /// The bias β, if any.
    pub beta: Option<&'a Handle>,
    /// `rows × dim` (`n` is dim).
    pub shape: Rows,
    /// Which normalisation.
    pub kind: NormKind,
}

impl NormInputs<'_> {
    /// Units per cube: about four entries each, 32 to [`MAX_UNITS`] (a power of two).
    fn cube_dim<R: Runtime>(&self, client: &ComputeClient<R>) -> CubeDim {
        let limit = (client.properties().hardware.max_units_per_cube as usize)
            .clamp(32, MAX_UNITS)
            .next_power_of_two();
        let units = (self.shape.n / 4).next_power_of_two().clamp(32, limit);
        CubeDim::new_1d(units as u32)
    }

    fn check(&self) -> Result<(), LaunchError> {
        match self.shape.rows == 0 || self.shape.n == 0 {
            true => Err(LaunchError::Empty(self.shape)),
            false => Ok(()),
        }
    }
}

/// Normalises every row: returns `y` (`[rows, dim]`, element `F`) and the rows' stats
/// (`[rows, NORM_STATS]`, f32) that [`norm_backward`] takes.
pub fn norm_forward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &NormInputs,
) -> Result<(Handle, Handle), LaunchError> {
    inputs.check()?;
    let Rows { rows, n } = inputs.shape;
    let y = client.empty(rows * n * F::type_size());
    let stats = client.empty(rows * NORM_STATS * 4);
    let (centred, eps) = match inputs.kind {
        NormKind::Layer { eps } => (true, eps),
        NormKind::Rms { eps } => (false, eps),
    };
    let beta = inputs.beta.unwrap_or(inputs.gamma);
    unsafe {
        norm_forward_rows::launch_unchecked::<F, R>(
            client,
            grid(rows),
            inputs.cube_dim(client),
            ArrayArg::from_raw_parts(inputs.x.clone(), rows * n),
            ArrayArg::from_raw_parts(inputs.gamma.clone(), n),
            ArrayArg::from_raw_parts(beta.clone(), n),
            ArrayArg::from_raw_parts(y.clone(), rows * n),
            ArrayArg::from_raw_parts(stats.clone(), rows * NORM_STATS),
            rows as u32,
            n as u32,
            eps,
            centred,
            inputs.beta.is_some(),
        );
    }
    Ok((y, stats))
}

/// The backward of [`norm_forward`] given its stats and the output's gradient `grad`
/// (`[rows, dim]`, element `F`): the input's gradient and the products `g · x̂` (both
/// `[rows, dim]`, element `F`); the gain's gradient is the latter summed over rows, the
/// bias's the gradient summed over rows.
pub fn norm_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &NormInputs,
    stats: &Handle,
    grad: &Handle,
) -> Result<(Handle, Handle), LaunchError> {
    inputs.check()?;
    let Rows { rows, n } = inputs.shape;
    let dx = client.empty(rows * n * F::type_size());
    let grad_x_hat = client.empty(rows * n * F::type_size());
    unsafe {
        norm_backward_rows::launch_unchecked::<F, R>(
            client,
            grid(rows),
            inputs.cube_dim(client),
            ArrayArg::from_raw_parts(inputs.x.clone(), rows * n),
            ArrayArg::from_raw_parts(inputs.gamma.clone(), n),
            ArrayArg::from_raw_parts(grad.clone(), rows * n),
            ArrayArg::from_raw_parts(stats.clone(), rows * NORM_STATS),
            ArrayArg::from_raw_parts(dx.clone(), rows * n),
            ArrayArg::from_raw_parts(grad_x_hat.clone(), rows * n),
            rows as u32,
            n as u32,
            matches!(inputs.kind, NormKind::Layer { .. }),
        );
    }
    Ok((dx, grad_x_hat))
}
