//! Fused CubeCL kernels of the coordinate-descent soft top-k of colt5: the reference's
//! iterative solver in one launch, its exact reverse sweep in another, and the converged
//! solver in a third.
//!
//! The state of a row is one scalar (`docs/soft-top-k.md`): the forward computes the row maximum
//! once, runs the iterations on the threshold a, writes the output and the T thresholds
//! a_1..a_T (`rows × T × 4` bytes, all the backward keeps), and the backward recomputes each
//! iteration's softmax from the scores and a_{t−1}. The converged solver ([`converged`])
//! takes Newton/bisection passes on a until each row meets its tolerance. Scores may be f32,
//! f16 or bf16; the arithmetic is f32.
//!
//! A row is handled by the smallest group of units — one plane (warp), several rows to a
//! cube, or a cube of several planes — whose units can hold it in registers; rows longer
//! than the largest group holds stream the rest from memory. When the rows are too few to
//! occupy the device's multiprocessors, long rows are split across several cubes, which
//! combine their sums through words in global memory. Updates at the schedule's final
//! temperature use anchored weights (no exp per entry and iteration; see
//! [`Schedule::steady`]), and when they are many, in launches of one cube per
//! multiprocessor, run from the band of entries near the thresholds still to come: in the
//! forward one plane runs them with no barrier per update; in the backward, which knows
//! every threshold, the planes compute the updates' sums side by side. This crate depends
//! only on CubeCL: `colt5` wires it into burn's CubeCL backends.

mod adam;
mod attention;
mod kernels;
mod norm;
mod top_k;

use cubecl::prelude::*;
use cubecl::server::Handle;

pub use adam::{adam_step, adam_step_entries, AdamScalars};
pub use attention::{
    attention_backward, attention_forward, AttentionInputs, AttentionShape, AttentionTuning, Band,
    MAX_DIM_HEAD,
};
use kernels::{
    clear_words, BACKWARD_BAND_WORDS, COEFFICIENTS_PER_STEP, FORWARD_BANDS, FORWARD_BAND_WORDS,
    MAX_BUTTERFLY_WIDTH,
};
pub use kernels::{
    coor_descent_backward, coor_descent_converged, coor_descent_forward, KernelLayout,
};
pub use norm::{
    norm_backward, norm_backward_rows, norm_forward, norm_forward_rows, NormInputs, NormKind,
    NORM_STATS,
};
pub use top_k::top_k_rows;

/// Units of a cube when each row takes one plane.
const PLANE_LAYOUT_CUBE: usize = 256;
/// The most units a row's group gets (one cube).
const MAX_GROUP: usize = 1024;
/// Entries of a row each unit of the forward holds in registers, at most.
const FORWARD_RESIDENT: usize = 32;
/// The same for the backward, which also keeps each entry's gradient and weight there.
const BACKWARD_RESIDENT: usize = 16;
/// Shared memory the backward's per-iteration coefficients may take (bytes).
const COEFFICIENT_BYTES: usize = 16 * 1024;
/// Entries of a row one cube takes before the row is split across cubes (when the rows are
/// too few to occupy the device): beyond it the forward needs its largest cube and the
/// backward streams, while each combination of sums between cubes costs about 1 µs on an
/// H100, so shorter rows run faster in one cube.
const MAX_PIECE: usize = 16 * 1024;
/// Exchange slots a launch may use with split rows (each takes a word per cube).
const MAX_EXCHANGE_SLOTS: usize = 4096;
/// Updates at the output temperature from which a row's updates run from a band (see
/// [`Layout::new`]).
const MIN_BANDED_UPDATES: usize = 16;
/// The multiprocessors assumed of a device that does not report them, for choosing banded
/// layouts.
const ASSUMED_MULTIPROCESSORS: usize = 128;
/// The most iterations the kernels take.
pub const MAX_STEPS: usize = 1024;
/// The largest k [`top_k`] takes: its selection (8 bytes an entry) stays in shared memory.
pub const MAX_TOP_K: usize = 4096;
/// The most units of a [`top_k`] cube.
const TOP_K_MAX_UNITS: usize = 1024;

/// The problem: `rows` rows of `n` entries, row-major and contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Number of rows.
    pub rows: usize,
    /// Entries per row.
    pub n: usize,
}

/// The temperature schedule: eps_1..eps_T followed by the output temperature.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule(pub Vec<f32>);

impl Schedule {
    /// The schedule from temperatures computed in f64 (eps_1..eps_T, then the output one).
    pub fn from_temperatures(temperatures: &[f64]) -> Self {
        Schedule(temperatures.iter().map(|&eps| eps as f32).collect())
    }

    /// Number of iterations T.
    pub fn steps(&self) -> usize {
        self.0.len().saturating_sub(1)
    }

    /// The first update t (1 ≤ t < T; T when there is none) from which every update runs at
    /// the output temperature: from there the kernels anchor their weights instead of
    /// evaluating an exp per entry and iteration.
    pub fn steady(&self) -> usize {
        let steps = self.steps();
        let Some(&output) = self.0.last() else {
            return 0;
        };
        (1..steps)
            .rev()
            .take_while(|&t| self.0[t] == output)
            .last()
            .unwrap_or(steps)
    }
}

/// Why a launch was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchError {
    /// The schedule has no iteration, or more than [`MAX_STEPS`].
    Steps(usize),
    /// A row count or length of zero.
    Empty(Rows),
    /// A launch would need more shared memory than the device gives a cube.
    SharedMemory {
        /// Bytes the launch needs.
        bytes: usize,
        /// Bytes the device allows.
        available: usize,
    },
    /// A top-k count of zero, above the row length or above [`MAX_TOP_K`].
    TopK {
        /// The count asked for.
        k: usize,
        /// The row length.
        n: usize,
    },
    /// An attention shape the kernels do not take: empty, a zero window, or `dim_head`
    /// above [`MAX_DIM_HEAD`] or not a multiple of its row split.
    Attention(AttentionShape),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::Steps(steps) => write!(
                f,
                "the fused kernels take 1 to {MAX_STEPS} iterations, not {steps}"
            ),
            LaunchError::Empty(rows) => {
                write!(f, "no entries to solve: {} rows of {}", rows.rows, rows.n)
            }
            LaunchError::SharedMemory { bytes, available } => write!(
                f,
                "the launch needs {bytes} bytes of shared memory, the device allows {available}"
            ),
            LaunchError::TopK { k, n } => write!(
                f,
                "top-k takes 1 ≤ k ≤ min(n, {MAX_TOP_K}), not k = {k} of n = {n}"
            ),
            LaunchError::Attention(shape) => write!(
                f,
                "the fused attention does not take {shape:?} (dim_head 1 to {MAX_DIM_HEAD}, \
                 divisible by its split over units, within a plane and the cube's units)"
            ),
        }
    }
}

impl std::error::Error for LaunchError {}

/// How rows map onto units: the compile-time part, and the cube shape and count.
#[derive(Clone, Copy, Debug)]
struct Layout {
    kernel: KernelLayout,
    /// Units per cube along a row.
    group: u32,
    cubes: usize,
}

impl Layout {
    /// Rows longer than [`MAX_PIECE`] are split into pieces of at most that many entries
    /// when the device has multiprocessors to spare: one cube per piece and at most one cube
    /// per multiprocessor, so that the cubes of a row run together (CubeCL 0.10 has no
    /// cooperative launch to guarantee it: two split launches started at the same moment on
    /// two streams of one device could hold each other's multiprocessors). A backend that
    /// does not report its multiprocessors splits nothing. Each piece takes the smallest
    /// group (a plane, or a power-of-two number of planes up to a cube) that holds it in
    /// registers at `resident` entries per unit; the longest take the largest group and
    /// stream what does not fit.
    ///
    /// The last `final_updates` updates run at the output temperature: when they are
    /// [`MIN_BANDED_UPDATES`] or more, rows that take a cube of several planes, hold their
    /// entries in registers and leave no multiprocessor with two cubes run them from a band
    /// (one plane, no barrier per update). Measured on an H100, the band saves 12–17 µs over
    /// the router's 36 such updates of 16 × 16384 and 64 × 32768, but its code costs more
    /// than it saves over 6 (and busy multiprocessors hide the barriers it removes).
    fn new<R: Runtime>(
        client: &ComputeClient<R>,
        shape: Rows,
        slots: usize,
        steps: usize,
        final_updates: usize,
        resident: usize,
    ) -> Layout {
        let hardware = &client.properties().hardware;
        let plane = hardware.plane_size_max.max(1) as usize;
        // At most 32 planes: the partial sums' shared buffer.
        let max_group = (hardware.max_units_per_cube as usize)
            .min(MAX_GROUP)
            .min(32 * plane)
            .max(plane);
        // A split row's combination reads one word per cube and value (two values at most)
        // in one plane.
        let max_splits = match hardware.num_streaming_multiprocessors {
            Some(multiprocessors) if slots <= MAX_EXCHANGE_SLOTS => {
                (multiprocessors as usize / shape.rows).min(plane / 2)
            }
            _ => 1,
        };
        let mut splits = 1;
        while splits * 2 <= max_splits && shape.n.div_ceil(splits) > MAX_PIECE {
            splits *= 2;
        }
        let piece = shape.n.div_ceil(splits);
        let mut group = plane;
        while group * resident < piece && group * 2 <= max_group {
            group *= 2;
        }
        let per_unit = piece.div_ceil(group).min(resident);
        let streamed = per_unit * group * splits < shape.n;
        let max_steps = max_steps(steps);
        // Banded layouts take one row to a cube.
        let banded = group > plane
            && !streamed
            && final_updates >= MIN_BANDED_UPDATES
            && shape.rows * splits
                <= hardware
                    .num_streaming_multiprocessors
                    .map_or(ASSUMED_MULTIPROCESSORS, |m| m as usize);
        let rows_per_cube = if group == plane && splits == 1 {
            let coefficient_rows = if streamed {
                COEFFICIENT_BYTES / (4 * COEFFICIENTS_PER_STEP as usize * max_steps)
            } else {
                usize::MAX
            };
            (PLANE_LAYOUT_CUBE / plane).clamp(1, coefficient_rows.max(1))
        } else {
            1
        };
        Layout {
            kernel: KernelLayout {
                planes: (group / plane) as u32,
                per_unit: per_unit as u32,
                streamed,
                rows_per_cube: rows_per_cube as u32,
                splits: splits as u32,
                max_steps: max_steps as u32,
                banded,
                plane_width: if hardware.plane_size_min == hardware.plane_size_max
                    && hardware.plane_size_max.is_power_of_two()
                    && hardware.plane_size_max <= MAX_BUTTERFLY_WIDTH
                {
                    hardware.plane_size_max
                } else {
                    0
                },
            },
            group: group as u32,
            cubes: shape.rows.div_ceil(rows_per_cube) * splits,
        }
    }

    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_2d(self.group, self.kernel.rows_per_cube)
    }

    fn cube_count(&self) -> CubeCount {
        grid(self.cubes)
    }
}

/// A grid of `cubes` cubes: rows of at most 65 535 (the limit of the grid's first
/// dimension), as many rows as needed; kernels number their cube by `cube_index`.
fn grid(cubes: usize) -> CubeCount {
    const MAX_X: usize = 65_535;
    let x = cubes.min(MAX_X);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

fn max_steps(steps: usize) -> usize {
    steps.next_power_of_two().max(8)
}

/// The inputs of one call: scores `[rows, n]` and k `[rows]` of element type `F`, and an
/// optional mask `[rows, n]` of element type `M` (nonzero = keep).
pub struct Inputs<'a> {
    /// The scores.
    pub scores: &'a Handle,
    /// One k per row.
    pub k: &'a Handle,
    /// The mask, if any.
    pub mask: Option<&'a Handle>,
    /// Their shape.
    pub shape: Rows,
}

/// Runs the iterative solver: returns the output `[rows, n]` (element `F`) and the
/// thresholds `[rows, T]` (f32).
pub fn forward<R: Runtime, F: Float + CubeElement, M: Int + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &Inputs,
    schedule: &Schedule,
) -> Result<(Handle, Handle), LaunchError> {
    let steps = schedule.steps();
    let (
        Launch {
            rows,
            n,
            layout,
            mask,
            exchange,
        },
        schedule_handle,
    ) = Launch::<R>::iterative::<M>(
        client,
        inputs,
        schedule,
        Exchange {
            slots: steps + 1 + 3 * FORWARD_BANDS as usize,
            band_words: FORWARD_BAND_WORDS as usize,
        },
        FORWARD_RESIDENT,
    )?;
    let output = client.empty(rows * n * F::type_size());
    let thresholds = client.empty(rows * steps * 4);
    unsafe {
        coor_descent_forward::launch_unchecked::<F, M, R>(
            client,
            layout.cube_count(),
            layout.cube_dim(),
            ArrayArg::from_raw_parts(inputs.scores.clone(), rows * n),
            ArrayArg::from_raw_parts(inputs.k.clone(), rows),
            mask,
            ArrayArg::from_raw_parts(schedule_handle, steps + 1),
            ArrayArg::from_raw_parts(output.clone(), rows * n),
            ArrayArg::from_raw_parts(thresholds.clone(), rows * steps),
            exchange,
            rows as u32,
            n as u32,
            steps as u32,
            schedule.steady() as u32,
            layout.kernel,
            inputs.mask.is_some(),
        );
    }
    Ok((output, thresholds))
}

/// The exact reverse sweep: given the thresholds of [`forward`] and the gradient `[rows, n]`
/// with respect to its output, returns the gradients with respect to the scores `[rows, n]`
/// and to k `[rows]` (element `F`).
pub fn backward<R: Runtime, F: Float + CubeElement, M: Int + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &Inputs,
    schedule: &Schedule,
    thresholds: &Handle,
    grad: &Handle,
) -> Result<(Handle, Handle), LaunchError> {
    let steps = schedule.steps();
    let (
        Launch {
            rows,
            n,
            layout,
            mask,
            exchange,
        },
        schedule_handle,
    ) = Launch::<R>::iterative::<M>(
        client,
        inputs,
        schedule,
        Exchange {
            slots: 2 * steps + 3,
            band_words: BACKWARD_BAND_WORDS as usize,
        },
        BACKWARD_RESIDENT,
    )?;
    let d_scores = client.empty(rows * n * F::type_size());
    let d_k = client.empty(rows * F::type_size());
    unsafe {
        coor_descent_backward::launch_unchecked::<F, M, R>(
            client,
            layout.cube_count(),
            layout.cube_dim(),
            ArrayArg::from_raw_parts(inputs.scores.clone(), rows * n),
            ArrayArg::from_raw_parts(inputs.k.clone(), rows),
            mask,
            ArrayArg::from_raw_parts(schedule_handle, steps + 1),
            ArrayArg::from_raw_parts(thresholds.clone(), rows * steps),
            ArrayArg::from_raw_parts(grad.clone(), rows * n),
            ArrayArg::from_raw_parts(d_scores.clone(), rows * n),
            ArrayArg::from_raw_parts(d_k.clone(), rows),
            exchange,
            rows as u32,
            n as u32,
            steps as u32,
            schedule.steady() as u32,
            layout.kernel,
            inputs.mask.is_some(),
        );
    }
    Ok((d_scores, d_k))
}

/// The converged solver's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Convergence {
    /// The temperature.
    pub eps: f32,
    /// A row stops once |Σy/k − 1| is at most this.
    pub tolerance: f32,
    /// Passes over a row at most.
    pub max_passes: u32,
}

/// Runs the converged solver: returns the output `[rows, n]` and the thresholds `[rows]`
/// (element `F`), and the passes over its row each took `[rows]` (u32).
pub fn converged<R: Runtime, F: Float + CubeElement, M: Int + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &Inputs,
    convergence: Convergence,
) -> Result<(Handle, Handle, Handle), LaunchError> {
    let Launch {
        rows,
        n,
        layout,
        mask,
        exchange,
    } = Launch::<R>::new::<M>(
        client,
        inputs,
        Exchange {
            slots: 2 * convergence.max_passes as usize + 3,
            band_words: 0,
        },
        // No per-iteration coefficients (the backward's alone keeps them): any step count,
        // and no band.
        1,
        0,
        FORWARD_RESIDENT,
    )?;
    let output = client.empty(rows * n * F::type_size());
    let thresholds = client.empty(rows * F::type_size());
    let passes = client.empty(rows * 4);
    unsafe {
        coor_descent_converged::launch_unchecked::<F, M, R>(
            client,
            layout.cube_count(),
            layout.cube_dim(),
            ArrayArg::from_raw_parts(inputs.scores.clone(), rows * n),
            ArrayArg::from_raw_parts(inputs.k.clone(), rows),
            mask,
            ArrayArg::from_raw_parts(output.clone(), rows * n),
            ArrayArg::from_raw_parts(thresholds.clone(), rows),
            ArrayArg::from_raw_parts(passes.clone(), rows),
            exchange,
            rows as u32,
            n as u32,
            convergence.eps,
            convergence.tolerance,
            convergence.max_passes,
            layout.kernel,
            inputs.mask.is_some(),
        );
    }
    Ok((output, thresholds, passes))
}

/// The exchange words a kernel uses for a split row: a word per cube in each of `slots`
/// slots, then `band_words` per row when the layout is banded.
struct Exchange {
    slots: usize,
    band_words: usize,
}

/// What the kernels' launches share: the checked shape, the layout, the mask (or a
/// one-element placeholder the kernels never read) and the cleared exchange words of split
/// rows (a one-word placeholder when no row is split), as kernel arguments.
struct Launch<R: Runtime> {
    rows: usize,
    n: usize,
    layout: Layout,
    mask: ArrayArg<R>,
    exchange: ArrayArg<R>,
}

impl<R: Runtime> Launch<R> {
    /// A launch whose kernel combines a split row's sums through `exchange`.
    fn new<M: Int + CubeElement>(
        client: &ComputeClient<R>,
        inputs: &Inputs,
        exchange: Exchange,
        steps: usize,
        final_updates: usize,
        resident: usize,
    ) -> Result<Launch<R>, LaunchError> {
        let Rows { rows, n } = inputs.shape;
        if rows == 0 || n == 0 {
            return Err(LaunchError::Empty(inputs.shape));
        }
        let (mask, mask_len) = match inputs.mask {
            Some(mask) => (mask.clone(), rows * n),
            None => (client.empty(M::type_size()), 1),
        };
        let layout = Layout::new(
            client,
            inputs.shape,
            exchange.slots,
            steps,
            final_updates,
            resident,
        );
        let exchange_len = match (layout.kernel.splits, layout.kernel.banded) {
            (1, _) => 1,
            (_, false) => exchange.slots * layout.cubes,
            (_, true) => exchange.slots * layout.cubes + rows * exchange.band_words,
        };
        let exchange = client.empty(exchange_len * 4);
        if layout.kernel.splits > 1 {
            const UNITS: u32 = 256;
            let cubes = exchange_len.div_ceil(UNITS as usize) as u32;
            unsafe {
                clear_words::launch_unchecked::<R>(
                    client,
                    CubeCount::Static(cubes, 1, 1),
                    CubeDim::new_1d(UNITS),
                    ArrayArg::from_raw_parts(exchange.clone(), exchange_len),
                );
            }
        }
        // The lengths are those of the buffers just allocated or given.
        let (mask, exchange) = unsafe {
            (
                ArrayArg::from_raw_parts(mask, mask_len),
                ArrayArg::from_raw_parts(exchange, exchange_len),
            )
        };
        Ok(Launch {
            rows,
            n,
            layout,
            mask,
            exchange,
        })
    }

    /// A launch of the iterative solver's kernels, with the schedule checked and uploaded.
    fn iterative<M: Int + CubeElement>(
        client: &ComputeClient<R>,
        inputs: &Inputs,
        schedule: &Schedule,
        exchange: Exchange,
        resident: usize,
    ) -> Result<(Launch<R>, Handle), LaunchError> {
        let steps = schedule.steps();
        if steps == 0 || steps > MAX_STEPS {
            return Err(LaunchError::Steps(steps));
        }
        let final_updates = steps - schedule.steady();
        let launch = Launch::new::<M>(client, inputs, exchange, steps, final_updates, resident)?;
        Ok((launch, client.create_from_slice(f32::as_bytes(&schedule.0))))
    }
}

/// The positions of the `k` largest entries of every row of `values` (`[rows, n]`, element
/// `F`): `[rows, k]` of element `I`, in descending order of value, the lower position
/// first among equal values. One cube per row (32 to 1024 units, about 16 entries a unit,
/// within the device's limit); 1 ≤ k ≤ min(n, [`MAX_TOP_K`]), and the selection must fit
/// the device's shared memory (8 bytes an entry: k = 4096 needs about 41 KB).
pub fn top_k<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    values: &Handle,
    shape: Rows,
    k: usize,
) -> Result<Handle, LaunchError> {
    let Rows { rows, n } = shape;
    if rows == 0 || n == 0 {
        return Err(LaunchError::Empty(shape));
    }
    if k == 0 || k > n || k > MAX_TOP_K {
        return Err(LaunchError::TopK { k, n });
    }
    let hardware = &client.properties().hardware;
    let max_units = (hardware.max_units_per_cube as usize).clamp(32, TOP_K_MAX_UNITS);
    let units = (n / 16).next_power_of_two().clamp(32, max_units);
    // A few capacity classes, so that few variants of the kernel are compiled.
    let capacity = k.next_power_of_two().max(64);
    // The selection (key and position), the units' two offsets, the histogram and two words.
    let shared = 4 * (2 * capacity + 2 * max_units + 256 + 2);
    if shared > hardware.max_shared_memory_size {
        return Err(LaunchError::SharedMemory {
            bytes: shared,
            available: hardware.max_shared_memory_size,
        });
    }
    let indices = client.empty(rows * k * I::type_size());
    unsafe {
        top_k_rows::launch_unchecked::<F, I, R>(
            client,
            grid(rows),
            CubeDim::new_1d(units as u32),
            ArrayArg::from_raw_parts(values.clone(), rows * n),
            ArrayArg::from_raw_parts(indices.clone(), rows * k),
            rows as u32,
            n as u32,
            k as u32,
            n.div_ceil(units) as u32,
            capacity as u32,
            max_units as u32,
        );
    }
    Ok(indices)
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn steady_is_where_the_schedule_reaches_the_output_temperature() {
        // eps_1..eps_5, then the output temperature.
        assert_eq!(Schedule(vec![4.0, 2.0, 1.0, 1.0, 1.0, 1.0]).steady(), 2);
        assert_eq!(Schedule(vec![1.0, 1.0, 1.0]).steady(), 1);
        // The last update is still above the output temperature: none.
        assert_eq!(Schedule(vec![4.0, 2.0, 1.0]).steady(), 2);
        assert_eq!(Schedule(vec![0.5]).steady(), 0);
        assert_eq!(Schedule(vec![]).steady(), 0);
    }
}
