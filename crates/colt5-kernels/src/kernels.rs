//! The CubeCL kernels. Every row is handled by one group of units: a plane (warp) for short
//! rows, several rows to a cube, or a whole cube for long rows. Arithmetic is f32 whatever
//! the storage type. The kernels use the fast exp and log intrinsics: their arguments are
//! finite (masked scores are −1e30, not −inf) and every log is of a sum ≥ 1 (the entry at
//! the shift contributes exp(0)).

// Nested `if comptime![..] { if .. }` is deliberate: the outer test is resolved when the
// kernel is compiled; merged with the inner one it would become a run-time condition.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

/// Stands in for masked scores: far below any real score, finite in f32.
const MASKED_SCORE: f32 = -1.0e30;

/// Sum over the units of a row's group. `planes` is the number of planes in the group (1:
/// the group is one plane); larger groups combine their planes' sums in `partials`.
#[cube]
fn group_sum(value: f32, partials: &mut SharedMemory<f32>, #[comptime] planes: u32) -> f32 {
    let plane_total = plane_sum(value);
    let mut total = plane_total;
    if comptime![planes > 1] {
        if UNIT_POS_PLANE == 0 {
            partials[PLANE_POS as usize] = plane_total;
        }
        sync_cube();
        total = 0.0;
        for i in 0..planes {
            total += partials[i as usize];
        }
        sync_cube();
    }
    total
}

/// Maximum over the units of a row's group (see [`group_sum`]).
#[cube]
fn group_max(value: f32, partials: &mut SharedMemory<f32>, #[comptime] planes: u32) -> f32 {
    let plane_best = plane_max(value);
    let mut best = plane_best;
    if comptime![planes > 1] {
        if UNIT_POS_PLANE == 0 {
            partials[PLANE_POS as usize] = plane_best;
        }
        sync_cube();
        for i in 0..planes {
            best = f32::max(best, partials[i as usize]);
        }
        sync_cube();
    }
    best
}

/// Score `j` of the row starting at `base`, with masked entries at [`MASKED_SCORE`].
#[cube]
fn score<F: Float, M: Int>(
    scores: &Array<F>,
    mask: &Array<M>,
    index: usize,
    #[comptime] masked: bool,
) -> f32 {
    let mut value = f32::cast_from(scores[index]);
    if comptime![masked] {
        if mask[index] == M::new(0) {
            value = MASKED_SCORE;
        }
    }
    value
}

/// Whether entry `index` takes part (always, without a mask).
#[cube]
fn valid<M: Int>(mask: &Array<M>, index: usize, #[comptime] masked: bool) -> bool {
    let mut keep = true;
    if comptime![masked] {
        keep = mask[index] != M::new(0);
    }
    keep
}

/// The row this unit works on and its position in the row's group.
#[cube]
fn row_and_lane() -> (usize, usize) {
    let cube = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
    (
        cube * CUBE_DIM_Y as usize + UNIT_POS_Y as usize,
        UNIT_POS_X as usize,
    )
}

/// Row maximum (masked entries at [`MASKED_SCORE`]).
#[cube]
fn row_max<F: Float, M: Int>(
    scores: &Array<F>,
    mask: &Array<M>,
    base: usize,
    n: usize,
    lane: usize,
    partials: &mut SharedMemory<f32>,
    #[comptime] masked: bool,
    #[comptime] planes: u32,
) -> f32 {
    let group = CUBE_DIM_X as usize;
    let mut best = f32::new(MASKED_SCORE);
    let mut j = lane;
    while j < n {
        best = f32::max(best, score::<F, M>(scores, mask, base + j, masked));
        j += group;
    }
    group_max(best, partials, planes)
}

/// Number of valid entries, at least 1 so that a fully masked row stays finite (n without a
/// mask, with no reduction).
#[cube]
fn valid_count<M: Int>(
    mask: &Array<M>,
    base: usize,
    n: usize,
    lane: usize,
    partials: &mut SharedMemory<f32>,
    #[comptime] masked: bool,
    #[comptime] planes: u32,
) -> f32 {
    let mut count = f32::cast_from(n as u32);
    if comptime![masked] {
        let group = CUBE_DIM_X as usize;
        let mut local = 0.0f32;
        let mut j = lane;
        while j < n {
            if mask[base + j] != M::new(0) {
                local += 1.0;
            }
            j += group;
        }
        count = f32::max(group_sum(local, partials, planes), 1.0);
    }
    count
}

/// Σ_j exp((min(s_j, ceiling) − shift)·inv_eps) over the row, and (when `with_above`; else
/// 0, saving a reduction) the part of it from entries above the ceiling.
#[cube]
fn partition<F: Float, M: Int>(
    scores: &Array<F>,
    mask: &Array<M>,
    base: usize,
    n: usize,
    lane: usize,
    ceiling: f32,
    shift: f32,
    inv_eps: f32,
    partials: &mut SharedMemory<f32>,
    #[comptime] masked: bool,
    #[comptime] planes: u32,
    #[comptime] with_above: bool,
) -> (f32, f32) {
    let group = CUBE_DIM_X as usize;
    let mut total = 0.0f32;
    let mut above = 0.0f32;
    let mut j = lane;
    while j < n {
        let s = score::<F, M>(scores, mask, base + j, masked);
        let w = f32::exp((f32::min(s, ceiling) - shift) * inv_eps);
        total += w;
        if s > ceiling {
            above += w;
        }
        j += group;
    }
    let total = group_sum(total, partials, planes);
    let mut above_total = 0.0f32;
    if comptime![with_above] {
        above_total = group_sum(above, partials, planes);
    }
    (total, above_total)
}

/// The iterative solver. `schedule` holds eps_1..eps_T then the output temperature;
/// `thresholds` receives a_1..a_T of every row (`[rows, steps]`).
#[cube(launch, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub fn coor_descent_forward<F: Float, M: Int>(
    scores: &Array<F>,
    k: &Array<F>,
    mask: &Array<M>,
    schedule: &Array<f32>,
    output: &mut Array<F>,
    thresholds: &mut Array<f32>,
    rows: u32,
    n: u32,
    steps: u32,
    #[comptime] masked: bool,
    #[comptime] planes: u32,
) {
    let mut partials = SharedMemory::<f32>::new(32usize);
    let (row, lane) = row_and_lane();
    // Groups of a partial last cube have no row; they exit together, so no barrier of a
    // multi-plane group (only those use barriers, one row to a cube) is left waiting.
    if row >= rows as usize {
        terminate!();
    }
    let n = n as usize;
    let steps = steps as usize;
    let base = row * n;
    let row_max = row_max::<F, M>(scores, mask, base, n, lane, &mut partials, masked, planes);
    let n_valid = valid_count::<M>(mask, base, n, lane, &mut partials, masked, planes);
    let log_k = f32::ln(f32::cast_from(k[row]));
    let mut a = schedule[0] * (log_k - f32::ln(n_valid));
    if lane == 0 {
        thresholds[row * steps] = a;
    }
    for t in 1..steps {
        let eps = schedule[t];
        let ceiling = -a;
        let shift = f32::min(row_max, ceiling);
        let (total, _above) = partition::<F, M>(
            scores,
            mask,
            base,
            n,
            lane,
            ceiling,
            shift,
            1.0 / eps,
            &mut partials,
            masked,
            planes,
            false,
        );
        a = eps * (log_k - f32::ln(total)) - shift;
        if lane == 0 {
            thresholds[row * steps + t] = a;
        }
    }
    let inv_eps = 1.0 / schedule[steps];
    let group = CUBE_DIM_X as usize;
    let mut j = lane;
    while j < n {
        let s = score::<F, M>(scores, mask, base + j, masked);
        let mut y = f32::exp(f32::min(s + a, 0.0) * inv_eps);
        if !valid::<M>(mask, base + j, masked) {
            y = 0.0;
        }
        output[base + j] = F::cast_from(y);
        j += group;
    }
}

/// The exact reverse sweep (DESIGN §1) from the thresholds of the forward: gradients with
/// respect to the scores and to k. `coefficients` (shared, 3 per iteration and row of the
/// cube) carries each iteration's ā_t/Z_t, ceiling and shift from the sweep to the final
/// pass, so the gradient is written once.
#[cube(launch, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub fn coor_descent_backward<F: Float, M: Int>(
    scores: &Array<F>,
    k: &Array<F>,
    mask: &Array<M>,
    schedule: &Array<f32>,
    thresholds: &Array<f32>,
    grad: &Array<F>,
    d_scores: &mut Array<F>,
    d_k: &mut Array<F>,
    rows: u32,
    n: u32,
    steps: u32,
    #[comptime] masked: bool,
    #[comptime] planes: u32,
    #[comptime] max_steps: u32,
    #[comptime] rows_per_cube: u32,
) {
    let mut partials = SharedMemory::<f32>::new(32usize);
    let mut coefficients =
        SharedMemory::<f32>::new(comptime![(3 * max_steps * rows_per_cube) as usize]);
    let (row, lane) = row_and_lane();
    // Rows past the end still reach the barrier below: they only skip the memory accesses.
    let active = row < rows as usize;
    let row = select(active, row, 0usize);
    let n = n as usize;
    let steps = steps as usize;
    let base = row * n;
    let group = CUBE_DIM_X as usize;
    let slot = UNIT_POS_Y as usize * 3 * max_steps as usize;
    let row_max = row_max::<F, M>(scores, mask, base, n, lane, &mut partials, masked, planes);
    let a_last = thresholds[row * steps + steps - 1];
    let inv_eps_out = 1.0 / schedule[steps];

    // ā_T = Σ_j g_j ∂y_j/∂a.
    let mut local = 0.0f32;
    let mut j = lane;
    while j < n {
        let s = score::<F, M>(scores, mask, base + j, masked);
        if s + a_last <= 0.0 && valid::<M>(mask, base + j, masked) {
            local += f32::cast_from(grad[base + j]) * f32::exp((s + a_last) * inv_eps_out);
        }
        j += group;
    }
    let mut d_a = group_sum(local, &mut partials, planes) * inv_eps_out;
    let mut d_log_k = d_a * schedule[steps - 1];

    // Reverse sweep over t = T..2: a_t depends on a_{t−1} through the softmax at eps_t.
    let mut t = steps;
    while t >= 2 {
        let eps = schedule[t - 1];
        let ceiling = -thresholds[row * steps + t - 2];
        let shift = f32::min(row_max, ceiling);
        let (total, above) = partition::<F, M>(
            scores,
            mask,
            base,
            n,
            lane,
            ceiling,
            shift,
            1.0 / eps,
            &mut partials,
            masked,
            planes,
            true,
        );
        if lane == 0 {
            coefficients[slot + 3 * (t - 2)] = d_a / total;
            coefficients[slot + 3 * (t - 2) + 1] = ceiling;
            coefficients[slot + 3 * (t - 2) + 2] = shift;
        }
        // 1 − Σ_below p = Σ_above p, computed directly to avoid the cancellation.
        d_a *= above / total;
        d_log_k += d_a * schedule[t - 2];
        t -= 1;
    }
    sync_cube();

    if active {
        let mut j = lane;
        while j < n {
            let s = score::<F, M>(scores, mask, base + j, masked);
            let mut ds = 0.0f32;
            if valid::<M>(mask, base + j, masked) {
                if s + a_last <= 0.0 {
                    ds = f32::cast_from(grad[base + j])
                        * f32::exp((s + a_last) * inv_eps_out)
                        * inv_eps_out;
                }
                for u in 0..steps - 1 {
                    let ceiling = coefficients[slot + 3 * u + 1];
                    if s <= ceiling {
                        let shift = coefficients[slot + 3 * u + 2];
                        ds -= coefficients[slot + 3 * u] * f32::exp((s - shift) / schedule[u + 1]);
                    }
                }
            }
            d_scores[base + j] = F::cast_from(ds);
            j += group;
        }
        if lane == 0 {
            d_k[row] = F::cast_from(d_log_k / f32::cast_from(k[row]));
        }
    }
}
