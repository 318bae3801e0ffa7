//! The CubeCL kernels. Every row is handled by one group of units: a plane (warp) for short
//! rows, several rows to a cube, a cube of several planes for longer rows, or, when the rows
//! are few and long, several cubes that combine their sums through global memory
//! ([`Reducer::across_cubes`]). Each unit holds its first `per_unit` entries of the row
//! (entries lane, lane + units, …, `units` being the row's units) in registers for the whole
//! call, so the iterations read no memory; entries beyond `per_unit · units` are streamed
//! from memory each iteration.
//! Arithmetic is f32 whatever the storage type. The kernels use the fast exp and log
//! intrinsics: their arguments are finite (masked scores are −1e30, not −inf) and every log
//! is of a sum ≥ 1 (the entry at the shift contributes exp(0)).

// Nested `if comptime![..] { if .. }` is deliberate: the outer test is resolved when the
// kernel is compiled; merged with the inner one it would become a run-time condition.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

/// How far (in units of the temperature) the shift may move from the anchor of anchored
/// weights before they are recomputed: weights stay within e^±30 of the anchor's.
const ANCHOR_MARGIN: f32 = 30.0;

/// Stands in for masked scores: far below any real score, finite in f32.
const MASKED_SCORE: f32 = -1.0e30;

/// What the backward keeps per iteration for its streamed entries: ā_t/Z_t, the ceiling, the
/// shift and the inverse temperature.
pub(crate) const COEFFICIENTS_PER_STEP: u32 = 4;

/// Values one combination may carry.
const MAX_VALUES: u32 = 4;

/// Words of `partials` one combination uses: [`MAX_VALUES`] per plane, for 32 planes.
const PARTIALS: usize = 128;

/// The widest plane that [`plane_fold`] reduces by its unrolled butterfly.
pub(crate) const MAX_BUTTERFLY_WIDTH: u32 = 128;

/// Where the units of a row combine their partial results: `partials` in shared memory for
/// the planes of a cube ([`MAX_VALUES`] words per plane), and `exchange` in global memory for
/// the cubes of a row split across several (see [`Reducer::across_cubes`]). Every
/// combination of a split row takes its own exchange slots (one per value), numbered by the
/// kernel.
///
/// Successive combinations in shared memory alternate between two halves of `partials`, so
/// each needs one barrier: a half is written again two combinations later, after the
/// barrier of the one between, which every unit reaches only once it has read the half.
#[derive(CubeType)]
struct Reducer {
    partials: SharedMemory<f32>,
    exchange: Array<Atomic<u32>>,
    /// The half of `partials` the next combination uses (0 or 1).
    half: usize,
}

#[cube]
impl Reducer {
    /// The first word of the half of `partials` this combination uses.
    fn next_half(&mut self) -> usize {
        let start = self.half * PARTIALS;
        self.half = 1 - self.half;
        start
    }

    /// Sum over the units of a row.
    fn sum(&mut self, value: f32, slot: usize, #[comptime] layout: KernelLayout) -> f32 {
        let (total, _) = self.sum_pair(value, 0.0, slot, layout, 1u32);
        total
    }

    /// Sums of two values over the units of a row, combined at once (`values` 1: the first
    /// alone).
    fn sum_pair(
        &mut self,
        first: f32,
        second: f32,
        slot: usize,
        #[comptime] layout: KernelLayout,
        #[comptime] values: u32,
    ) -> (f32, f32) {
        let mut both = Array::<f32>::new(2usize);
        both[0] = first;
        both[1] = second;
        self.combine(&mut both, slot, layout, values, false, false);
        (both[0], both[1])
    }

    /// Maximum over the units of a row.
    fn max(&mut self, value: f32, slot: usize, #[comptime] layout: KernelLayout) -> f32 {
        let mut best = Array::<f32>::new(1usize);
        best[0] = value;
        self.combine(&mut best, slot, layout, 1u32, true, false);
        best[0]
    }

    /// Combines the first `count` of `values` over the units of a row in place: their sums
    /// (or, when `maximum`, the maximum of the first). With `prefix`, also returns the sum of
    /// the first value over the units before this one (planes, then cubes, in order).
    fn combine(
        &mut self,
        values: &mut Array<f32>,
        slot: usize,
        #[comptime] layout: KernelLayout,
        #[comptime] count: u32,
        #[comptime] maximum: bool,
        #[comptime] prefix: bool,
    ) -> f32 {
        let mut before = 0.0f32;
        if comptime![prefix] {
            before = plane_exclusive_sum(values[0]);
        }
        #[unroll]
        for v in 0..count {
            values[v as usize] = plane_fold(values[v as usize], maximum, layout.plane_width);
        }
        if comptime![layout.planes > 1] {
            let start = self.next_half();
            let words = MAX_VALUES as usize;
            if UNIT_POS_PLANE == 0 {
                #[unroll]
                for v in 0..count {
                    self.partials[start + words * PLANE_POS as usize + v as usize] =
                        values[v as usize];
                }
            }
            sync_cube();
            #[unroll]
            for v in 0..count {
                values[v as usize] = select(maximum, f32::new(MASKED_SCORE), 0.0);
            }
            for i in 0..layout.planes {
                #[unroll]
                for v in 0..count {
                    let part = self.partials[start + words * i as usize + v as usize];
                    values[v as usize] = fold(values[v as usize], part, maximum);
                }
                if comptime![prefix] {
                    if i < PLANE_POS {
                        before += self.partials[start + words * i as usize];
                    }
                }
            }
        }
        if comptime![layout.splits > 1] {
            before += self.across_cubes(values, slot, layout, count, maximum, prefix);
        }
        before
    }

    /// Combines the first `count` of `values` (each the same in every unit of the cube) over
    /// the cubes of a row split across `layout.splits` cubes, one row to a cube, and returns
    /// the sum of the first over the row's cubes before this one when `prefix`. Each cube
    /// posts its values to `exchange` (slot-major: word `slot · cubes + cube`, value v in
    /// slot + v), then lanes of its first plane wait for the words of the row's other cubes
    /// and combine them in one fixed order, so that every cube of the row gets the same
    /// bits. Words are posted bit-inverted: 0, the cleared state, would be a NaN's, which is
    /// never posted. The cubes of a row must run at the same time: the launch keeps the grid
    /// within what the device holds at once.
    fn across_cubes(
        &mut self,
        values: &mut Array<f32>,
        slot: usize,
        #[comptime] layout: KernelLayout,
        #[comptime] count: u32,
        #[comptime] maximum: bool,
        #[comptime] prefix: bool,
    ) -> f32 {
        let splits = comptime![layout.splits as usize];
        let start = self.next_half();
        let cubes = CUBE_COUNT;
        let cube = cube_index();
        let first_cube = cube - cube % splits;
        let unit = UNIT_POS_X as usize;
        if unit == 0 {
            #[unroll]
            for v in 0..count {
                self.exchange[(slot + v as usize) * cubes + cube]
                    .store(u32::reinterpret(values[v as usize]) ^ u32::MAX);
            }
        }
        if PLANE_POS == 0 {
            // Lane l reads words l, l + plane, …: value word / splits of cube word % splits.
            let mut own = Array::<f32>::new(comptime![MAX_VALUES as usize]);
            #[unroll]
            for v in 0..count {
                own[v as usize] = select(maximum, f32::new(MASKED_SCORE), 0.0);
            }
            let mut earlier = 0.0f32;
            let mut word = unit;
            while word < splits * count as usize {
                let value = word / splits;
                let at = (slot + value) * cubes + first_cube + word % splits;
                let posted = polled(&self.exchange, at);
                #[unroll]
                for v in 0..count {
                    if value == v as usize {
                        own[v as usize] = fold(own[v as usize], posted, maximum);
                    }
                }
                if comptime![prefix] {
                    if value == 0 && word < cube % splits {
                        earlier += posted;
                    }
                }
                word += PLANE_DIM as usize;
            }
            // Only the first splits · count lanes hold words: the butterfly spans those.
            let width = comptime![if layout.plane_width == 0 {
                0
            } else {
                layout
                    .plane_width
                    .min((layout.splits * count).next_power_of_two().max(2))
            }];
            #[unroll]
            for v in 0..count {
                let total = plane_fold(own[v as usize], maximum, width);
                if unit == 0 {
                    self.partials[start + v as usize] = total;
                }
            }
            if comptime![prefix] {
                let total_earlier = plane_fold(earlier, false, width);
                if unit == 0 {
                    self.partials[start + MAX_VALUES as usize] = total_earlier;
                }
            }
        }
        sync_cube();
        #[unroll]
        for v in 0..count {
            values[v as usize] = self.partials[start + v as usize];
        }
        let mut earlier = 0.0f32;
        if comptime![prefix] {
            earlier = self.partials[start + MAX_VALUES as usize];
        }
        earlier
    }

    /// Three values from unit 0 of the cube, in every unit.
    fn broadcast_first_unit(&mut self, first: f32, second: f32, third: f32) -> (f32, f32, f32) {
        let start = self.next_half();
        if UNIT_POS == 0 {
            self.partials[start] = first;
            self.partials[start + 1] = second;
            self.partials[start + 2] = third;
        }
        sync_cube();
        (
            self.partials[start],
            self.partials[start + 1],
            self.partials[start + 2],
        )
    }
}

/// `a` and `b` combined: their maximum when `maximum`, else their sum.
#[cube]
fn fold(a: f32, b: f32, #[comptime] maximum: bool) -> f32 {
    if comptime![maximum] {
        f32::max(a, b)
    } else {
        a + b
    }
}

/// `value` combined over the units of the plane, as [`fold`] does: by an unrolled butterfly
/// of shuffles when every plane is `width` units wide (at most [`MAX_BUTTERFLY_WIDTH`];
/// every unit gets the same bits, the operands of each step being swapped between
/// partners), else by the runtime's plane operation (`width` 0).
#[cube]
fn plane_fold(value: f32, #[comptime] maximum: bool, #[comptime] width: u32) -> f32 {
    if comptime![width > 1] {
        let mut result = butterfly_step(value, 64u32, width, maximum);
        result = butterfly_step(result, 32u32, width, maximum);
        result = butterfly_step(result, 16u32, width, maximum);
        result = butterfly_step(result, 8u32, width, maximum);
        result = butterfly_step(result, 4u32, width, maximum);
        result = butterfly_step(result, 2u32, width, maximum);
        butterfly_step(result, 1u32, width, maximum)
    } else if comptime![maximum] {
        plane_max(value)
    } else {
        plane_sum(value)
    }
}

/// One step of [`plane_fold`]'s butterfly: `value` folded with the partner `offset` units
/// away, a step that planes of `width` units or fewer skip.
#[cube]
fn butterfly_step(
    value: f32,
    #[comptime] offset: u32,
    #[comptime] width: u32,
    #[comptime] maximum: bool,
) -> f32 {
    if comptime![offset < width] {
        fold(value, plane_shuffle_xor(value, offset), maximum)
    } else {
        value
    }
}

/// A reducer over `exchange`.
#[cube]
fn new_reducer(exchange: Array<Atomic<u32>>) -> Reducer {
    Reducer {
        partials: SharedMemory::<f32>::new(2 * PARTIALS),
        exchange,
        half: 0,
    }
}

/// The cube's position in the grid, as one index (the grid of `grid` in lib.rs).
#[cube]
pub(crate) fn cube_index() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize
}

/// Score at `index`, with masked entries at [`MASKED_SCORE`].
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

/// The row this unit works on and its position among the row's units (a split row's units
/// are its cubes' units in order).
#[cube]
fn row_and_lane(#[comptime] layout: KernelLayout) -> (usize, usize) {
    let splits = comptime![layout.splits as usize];
    let cube = cube_index();
    (
        cube / splits * CUBE_DIM_Y as usize + UNIT_POS_Y as usize,
        cube % splits * CUBE_DIM_X as usize + UNIT_POS_X as usize,
    )
}

/// The part of a row one unit holds: its resident entries (slot i is entry
/// `lane + i · stride`, `stride` being the row's number of units; slots past the row's end,
/// `live` onwards, hold [`MASKED_SCORE`]) and where its streamed entries start.
#[derive(CubeType)]
struct Share {
    resident: Array<f32>,
    live: u32,
    base: usize,
    lane: usize,
    stride: usize,
    n: usize,
    streamed_from: usize,
}

/// Loads the unit's share of the row starting at `base`.
#[cube]
fn load_share<F: Float, M: Int>(
    scores: &Array<F>,
    mask: &Array<M>,
    base: usize,
    n: usize,
    lane: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) -> Share {
    let per_unit = comptime![layout.per_unit];
    let stride = CUBE_DIM_X as usize * comptime![layout.splits as usize];
    let mut resident = Array::<f32>::new(comptime![per_unit as usize]);
    let mut live = 0u32;
    #[unroll]
    for i in 0..per_unit {
        let j = lane + i as usize * stride;
        let mut value = f32::new(MASKED_SCORE);
        if j < n {
            value = score::<F, M>(scores, mask, base + j, masked);
            live += 1;
        }
        resident[i as usize] = value;
    }
    Share {
        resident,
        live,
        base,
        lane,
        stride,
        n,
        streamed_from: per_unit as usize * stride + lane,
    }
}

/// Row maximum (masked entries at [`MASKED_SCORE`]).
#[cube]
fn row_max<F: Float, M: Int>(
    share: &Share,
    scores: &Array<F>,
    mask: &Array<M>,
    reducer: &mut Reducer,
    slot: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) -> f32 {
    let mut best = f32::new(MASKED_SCORE);
    #[unroll]
    for i in 0..layout.per_unit {
        best = f32::max(best, share.resident[i as usize]);
    }
    if comptime![layout.streamed] {
        let mut j = share.streamed_from;
        while j < share.n {
            best = f32::max(best, score::<F, M>(scores, mask, share.base + j, masked));
            j += share.stride;
        }
    }
    reducer.max(best, slot, layout)
}

/// Number of valid entries, at least 1 so that a fully masked row stays finite (n without a
/// mask, with no reduction).
#[cube]
fn valid_count<M: Int>(
    mask: &Array<M>,
    share: &Share,
    reducer: &mut Reducer,
    slot: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) -> f32 {
    let mut count = f32::cast_from(share.n as u32);
    if comptime![masked] {
        let mut local = 0.0f32;
        let mut j = share.lane;
        while j < share.n {
            if mask[share.base + j] != M::new(0) {
                local += 1.0;
            }
            j += share.stride;
        }
        count = f32::max(reducer.sum(local, slot, layout), 1.0);
    }
    count
}

/// Where an iteration's weights exp((min(s_j, ceiling) − reference)·inv_eps) come from.
#[derive(CubeType, Clone, Copy)]
struct Weighting {
    ceiling: f32,
    /// The score the weights are taken relative to: the shift min(row max, ceiling), or the
    /// anchor of anchored weights.
    reference: f32,
    inv_eps: f32,
    /// Whether `weights` holds each resident entry's anchored weight (see [`Anchor`]), from
    /// which this iteration's weight is min(anchored, bound), with no exp.
    anchored: bool,
    /// exp(min(ceiling − anchor, margin)·inv_eps) when anchored.
    bound: f32,
}

/// The weight of resident entry `i` in an iteration (after [`partition`] has run on it).
#[cube]
fn resident_weight(weights: &Array<f32>, i: usize, weighting: Weighting) -> f32 {
    select(
        weighting.anchored,
        f32::min(weights[i], weighting.bound),
        weights[i],
    )
}

/// Σ_j exp((min(s_j, ceiling) − reference)·inv_eps) over the row, and (when `with_above`;
/// else 0, saving a reduction) the part of it from entries above the ceiling. Unless the
/// weights are anchored, the resident entries' weights are left in `weights` (0 past the
/// row's end).
#[cube]
fn partition<F: Float, M: Int>(
    share: &Share,
    weights: &mut Array<f32>,
    scores: &Array<F>,
    mask: &Array<M>,
    weighting: Weighting,
    reducer: &mut Reducer,
    slot: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
    #[comptime] with_above: bool,
) -> (f32, f32) {
    let ceiling = weighting.ceiling;
    let mut total = 0.0f32;
    let mut above = 0.0f32;
    if weighting.anchored {
        #[unroll]
        for i in 0..layout.per_unit {
            let w = f32::min(weights[i as usize], weighting.bound);
            total += w;
            if comptime![with_above] {
                above += select(share.resident[i as usize] > ceiling, w, 0.0);
            }
        }
    } else {
        #[unroll]
        for i in 0..layout.per_unit {
            let s = share.resident[i as usize];
            let w = select(
                i < share.live,
                f32::exp((f32::min(s, ceiling) - weighting.reference) * weighting.inv_eps),
                0.0,
            );
            weights[i as usize] = w;
            total += w;
            if comptime![with_above] {
                above += select(s > ceiling, w, 0.0);
            }
        }
    }
    if comptime![layout.streamed] {
        let mut j = share.streamed_from;
        while j < share.n {
            let s = score::<F, M>(scores, mask, share.base + j, masked);
            let w = f32::exp((f32::min(s, ceiling) - weighting.reference) * weighting.inv_eps);
            total += w;
            if comptime![with_above] {
                above += select(s > ceiling, w, 0.0);
            }
            j += share.stride;
        }
    }
    reducer.sum_pair(
        total,
        above,
        slot,
        layout,
        comptime![if with_above { 2u32 } else { 1u32 }],
    )
}

/// Anchored weights at the constant temperature the schedule ends on: each resident entry's
/// exp((min(s, anchor + margin) − anchor)·inv_eps) is computed once, and an iteration's
/// weight exp((min(s, ceiling) − anchor)·inv_eps) is then min(it, bound), with no exp per
/// entry and iteration. Exact while the shift min(row max, ceiling) stays within `margin` of
/// the anchor (otherwise the weights are re-anchored at the shift), which keeps the row's
/// largest weight within e^±margin/eps of 1.
#[derive(CubeType)]
struct Anchor {
    anchor: f32,
    /// Whether the weights are anchored yet.
    set: bool,
    margin: f32,
    inv_eps: f32,
}

#[cube]
impl Anchor {
    /// The anchored weight of every entry at or above `ceiling`:
    /// exp(min(ceiling − anchor, margin)·inv_eps).
    fn bound(&self, ceiling: f32) -> f32 {
        f32::exp(f32::min(ceiling - self.anchor, self.margin) * self.inv_eps)
    }
}

/// No anchor yet, for updates at the output temperature 1 / `inv_eps_out`.
#[cube]
fn unset_anchor(inv_eps_out: f32) -> Anchor {
    Anchor {
        anchor: 0.0,
        set: false,
        margin: ANCHOR_MARGIN / inv_eps_out,
        inv_eps: inv_eps_out,
    }
}

/// The weighting of an iteration with ceiling `ceiling`: anchored (re-anchoring `weights`
/// first when the shift has moved too far) when `steady`, else relative to the shift.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weighting(
    share: &Share,
    weights: &mut Array<f32>,
    anchor: &mut Anchor,
    ceiling: f32,
    row_max: f32,
    inv_eps: f32,
    steady: bool,
    #[comptime] per_unit: u32,
) -> Weighting {
    let shift = f32::min(row_max, ceiling);
    let mut result = Weighting {
        ceiling,
        reference: shift,
        inv_eps,
        anchored: false,
        bound: 0.0,
    };
    if steady {
        if !anchor.set || f32::abs(shift - anchor.anchor) > anchor.margin {
            anchor.anchor = shift;
            anchor.set = true;
            let top = shift + anchor.margin;
            #[unroll]
            for i in 0..per_unit {
                let s = share.resident[i as usize];
                weights[i as usize] = select(
                    i < share.live,
                    f32::exp((f32::min(s, top) - shift) * anchor.inv_eps),
                    0.0,
                );
            }
        }
        result.reference = anchor.anchor;
        result.anchored = true;
        result.bound = anchor.bound(ceiling);
    }
    result
}

/// Entries a band holds at most (see [`Band`]).
pub(crate) const BAND_CAPACITY: u32 = 1024;

/// Bands a forward launch may try to gather per row.
pub(crate) const FORWARD_BANDS: u32 = 4;

/// Exchange words a split row's band takes in the forward (per band) and in the backward
/// (weights, then scores).
pub(crate) const FORWARD_BAND_WORDS: u32 = FORWARD_BANDS * BAND_CAPACITY;
/// See [`FORWARD_BAND_WORDS`].
pub(crate) const BACKWARD_BAND_WORDS: u32 = 2 * BAND_CAPACITY;

/// Room left around a forward band for the rounding of the thresholds, relative to
/// 1 + |ceiling|.
const BAND_SLACK: f32 = 1.0e-5;

/// Larger than any band's reach.
const NO_LIMIT: f32 = 3.0e38;

/// The entries of a row whose scores lie in (lo, hi], gathered into shared memory: while an
/// update's ceiling c stays in [lo, hi] at the anchored output temperature, every other
/// entry's weight is known without reading it — its anchored weight below the band
/// (s ≤ lo ≤ c), the update's bound above it (s > hi ≥ c) — so one plane runs the update
/// from the band alone, with no barrier. At the output temperature eps the update is
/// a ↦ F(a) = eps(ln k − LSE_j(min(s_j, −a)/eps)) with 0 ≤ F′ ≤ 1, so the ceilings −a_t
/// move monotonically by steps that never grow: after an update at that temperature, the
/// ceilings still to come lie within m steps of the last one, m being the updates left.
#[derive(CubeType)]
struct Band {
    lo: f32,
    hi: f32,
    /// Entries gathered; more than [`BAND_CAPACITY`] when they did not fit (none are).
    size: u32,
    /// Valid entries above the band.
    above: f32,
    /// Σ of the anchored weights of the entries below it.
    below: f32,
}

/// Gathers the row's band (lo, hi] from the anchored `weights` into `band`: the weights, and
/// with `with_scores` the scores after them (at [`BAND_CAPACITY`]). The entries keep the
/// row's order of units (planes, then the cubes of a split row, which post theirs to the
/// exchange words from `region` and read back the whole band), so that every cube of a row
/// sums them in the same order.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gather_band(
    share: &Share,
    weights: &Array<f32>,
    band: &mut SharedMemory<f32>,
    reducer: &mut Reducer,
    lo: f32,
    hi: f32,
    slot: usize,
    region: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] with_scores: bool,
) -> Band {
    let capacity = BAND_CAPACITY as usize;
    let mut counts = Array::<f32>::new(3usize);
    counts[0] = 0.0;
    counts[1] = 0.0;
    counts[2] = 0.0;
    #[unroll]
    for i in 0..layout.per_unit {
        let s = share.resident[i as usize];
        let live = i < share.live;
        let inside = live && s > lo && s <= hi;
        let over = live && s > hi;
        counts[0] += select(inside, 1.0, 0.0);
        counts[1] += select(over, 1.0, 0.0);
        counts[2] += select(inside || over, 0.0, weights[i as usize]);
    }
    let offset = reducer.combine(&mut counts, slot, layout, 3u32, false, true);
    let size = u32::cast_from(counts[0]);
    if size <= BAND_CAPACITY {
        let mut at = u32::cast_from(offset) as usize;
        #[unroll]
        for i in 0..layout.per_unit {
            let s = share.resident[i as usize];
            if i < share.live && s > lo && s <= hi {
                if comptime![layout.splits > 1] {
                    reducer.exchange[region + at]
                        .store(u32::reinterpret(weights[i as usize]) ^ u32::MAX);
                    if comptime![with_scores] {
                        reducer.exchange[region + capacity + at]
                            .store(u32::reinterpret(s) ^ u32::MAX);
                    }
                } else {
                    band[at] = weights[i as usize];
                    if comptime![with_scores] {
                        band[capacity + at] = s;
                    }
                }
                at += 1;
            }
        }
        if comptime![layout.splits > 1] {
            let mut b = UNIT_POS_X as usize;
            while b < size as usize {
                band[b] = polled(&reducer.exchange, region + b);
                if comptime![with_scores] {
                    band[capacity + b] = polled(&reducer.exchange, region + capacity + b);
                }
                b += CUBE_DIM_X as usize;
            }
        }
        sync_cube();
    }
    Band {
        lo,
        hi,
        size,
        above: counts[1],
        below: counts[2],
    }
}

/// The value posted (bit-inverted) to exchange word `at`, once it has been.
#[cube]
fn polled(exchange: &Array<Atomic<u32>>, at: usize) -> f32 {
    let mut bits = 0u32;
    while bits == 0 {
        bits = exchange[at].load();
    }
    f32::reinterpret(bits ^ u32::MAX)
}

/// Band entries each unit of a plane reads before summing them in the forward's updates: the
/// reads of a group overlap, where one at a time each would wait for the last (a band's
/// updates run one after another, so their latency is what they cost).
const BAND_READS: u32 = 8;

/// Over the row, from the band (in one plane): Σ_j min(w_j, bound), and the part from the
/// entries above `ceiling` (with `with_above`; else 0), which are at the bound. `width` is
/// the layout's plane width, for [`plane_fold`]. Without `with_above` and with a known
/// width, each unit reads its entries [`BAND_READS`] at a time (the sums are the same:
/// entries past the band add 0). The backward, which also reads the scores, keeps one read
/// at a time: when one plane ran its updates, groups of 8 weights and 8 scores (with each
/// ceiling read one update ahead) measured slower (H100, 64 × 32768 at 50 iterations,
/// forward and backward 0.215 → 0.235 ms); its updates now run one plane each, side by side.
#[cube]
fn band_sums(
    band: &SharedMemory<f32>,
    found: &Band,
    bound: f32,
    ceiling: f32,
    #[comptime] with_above: bool,
    #[comptime] width: u32,
) -> (f32, f32) {
    let capacity = BAND_CAPACITY as usize;
    let size = found.size as usize;
    let lane = UNIT_POS_PLANE as usize;
    let mut total = 0.0f32;
    let mut over = 0.0f32;
    if comptime![width > 1 && !with_above] {
        // A group spans BAND_READS · width entries, which divides the capacity (width ≤
        // MAX_BUTTERFLY_WIDTH), so a group that starts inside the band reads inside `band`.
        let group = comptime![(BAND_READS * width) as usize];
        let mut start = 0usize;
        while start < size {
            #[unroll]
            for j in 0..BAND_READS {
                let b = start + comptime![(j * width) as usize] + lane;
                total += select(b < size, f32::min(band[b], bound), 0.0);
            }
            start += group;
        }
    } else {
        let mut b = lane;
        while b < size {
            total += f32::min(band[b], bound);
            if comptime![with_above] {
                over += select(band[capacity + b] > ceiling, 1.0, 0.0);
            }
            b += PLANE_DIM as usize;
        }
    }
    let mut above = 0.0f32;
    if comptime![with_above] {
        above = (plane_fold(over, false, width) + found.above) * bound;
    }
    (
        plane_fold(total, false, width) + found.above * bound + found.below,
        above,
    )
}

/// The first exchange word of the row's band region: the regions of all rows, `words` each,
/// end the exchange words.
#[cube]
fn band_region(
    exchange: &Array<Atomic<u32>>,
    rows: u32,
    row: usize,
    #[comptime] words: u32,
) -> usize {
    exchange.len() - (rows as usize - row) * words as usize
}

/// The forward's updates from `t` on, run by the first plane of the cube from the band while
/// the ceiling −a stays in it and within the anchor's margin: returns the last threshold
/// and the next update (other planes return their arguments). Every such update is at the
/// output temperature `eps_out`. `width` is the layout's plane width.
#[cube]
#[allow(clippy::too_many_arguments)]
fn banded_updates(
    band: &SharedMemory<f32>,
    found: &Band,
    anchor: &Anchor,
    thresholds: &mut Array<f32>,
    eps_out: f32,
    a: f32,
    t: usize,
    row: usize,
    lane: usize,
    steps: usize,
    log_k: f32,
    row_max: f32,
    #[comptime] width: u32,
) -> (f32, usize) {
    let mut a = a;
    let mut t = t;
    if PLANE_POS == 0 {
        let mut inside = true;
        while t < steps && inside {
            let ceiling = -a;
            inside = ceiling >= found.lo
                && ceiling <= found.hi
                && f32::abs(f32::min(row_max, ceiling) - anchor.anchor) <= anchor.margin;
            if inside {
                let bound = anchor.bound(ceiling);
                let (total, _) = band_sums(band, found, bound, ceiling, false, width);
                a = eps_out * (log_k - f32::ln(total)) - anchor.anchor;
                if lane == 0 {
                    thresholds[row * steps + t] = a;
                }
                t += 1;
            }
        }
    }
    (a, t)
}

/// How a launch maps rows onto units, fixed when the kernel is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelLayout {
    /// Planes per row's group (1: one plane per row, several rows to a cube).
    pub planes: u32,
    /// Entries of the row each unit holds in registers.
    pub per_unit: u32,
    /// Whether rows are longer than the group holds, the rest being streamed from memory.
    pub streamed: bool,
    /// Rows per cube.
    pub rows_per_cube: u32,
    /// Cubes per row (more than 1: one row to a cube, combining their sums through the
    /// exchange words).
    pub splits: u32,
    /// Capacity of the backward's per-iteration coefficients (streamed rows only).
    pub max_steps: u32,
    /// Whether updates at the output temperature run from a band of the entries near the
    /// thresholds still to come (one row to a cube, held in registers).
    pub banded: bool,
    /// The width of every plane when the device has one width (a power of two; reductions
    /// over a plane are then unrolled), else 0.
    pub plane_width: u32,
}

/// The iterative solver. `schedule` holds eps_1..eps_T then the output temperature;
/// `thresholds` receives a_1..a_T of every row (`[rows, steps]`). A split row's cubes use
/// `exchange` slots 0 (maximum), 1 (valid count) and 1 + t (iteration t), cleared.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub fn coor_descent_forward<F: Float, M: Int>(
    scores: &Array<F>,
    k: &Array<F>,
    mask: &Array<M>,
    schedule: &Array<f32>,
    output: &mut Array<F>,
    thresholds: &mut Array<f32>,
    exchange: Array<Atomic<u32>>,
    rows: u32,
    n: u32,
    steps: u32,
    steady: u32,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) {
    let mut reducer = new_reducer(exchange);
    let (row, lane) = row_and_lane(layout);
    // Groups of a partial last cube have no row; they exit together, so no barrier of a
    // multi-plane group (only those use barriers, one row to a cube) is left waiting.
    if row >= rows as usize {
        terminate!();
    }
    let n = n as usize;
    let steps = steps as usize;
    let share = load_share::<F, M>(scores, mask, row * n, n, lane, layout, masked);
    let mut weights = Array::<f32>::new(comptime![layout.per_unit as usize]);
    let row_max = row_max::<F, M>(&share, scores, mask, &mut reducer, 0, layout, masked);
    let n_valid = valid_count::<M>(mask, &share, &mut reducer, 1, layout, masked);
    let log_k = f32::ln(f32::cast_from(k[row]));
    let mut a = schedule[0] * (log_k - f32::ln(n_valid));
    if lane == 0 {
        thresholds[row * steps] = a;
    }
    let inv_eps_out = 1.0 / schedule[steps];
    let mut anchor = unset_anchor(inv_eps_out);
    let mut band = SharedMemory::<f32>::new(comptime![if layout.banded {
        BAND_CAPACITY as usize
    } else {
        1usize
    }]);
    let mut region = 0usize;
    if comptime![layout.banded && layout.splits > 1] {
        region = band_region(&reducer.exchange, rows, row, FORWARD_BAND_WORDS);
    }
    let mut bands = 0u32;
    let mut reach_limit = f32::new(NO_LIMIT);
    let mut t = 1usize;
    while t < steps {
        let eps = schedule[t];
        let ceiling = -a;
        let weighting = weighting(
            &share,
            &mut weights,
            &mut anchor,
            ceiling,
            row_max,
            1.0 / eps,
            t >= steady as usize,
            layout.per_unit,
        );
        let (total, _above) = partition::<F, M>(
            &share,
            &mut weights,
            scores,
            mask,
            weighting,
            &mut reducer,
            1 + t,
            layout,
            masked,
            false,
        );
        a = eps * (log_k - f32::ln(total)) - weighting.reference;
        if lane == 0 {
            thresholds[row * steps + t] = a;
        }
        t += 1;
        // After an update at the output temperature, run the next ones from a band while
        // two or more are left.
        if comptime![layout.banded] {
            if t > steady as usize && t + 1 < steps && bands < FORWARD_BANDS {
                let next = -a;
                let step = next - ceiling;
                let moves = f32::cast_from((steps - 1 - t) as u32);
                let reach = f32::min(f32::abs(step) * moves, reach_limit);
                let slack = BAND_SLACK * (1.0 + f32::abs(next));
                let found = gather_band(
                    &share,
                    &weights,
                    &mut band,
                    &mut reducer,
                    select(step > 0.0, next - slack, next - reach - slack),
                    select(step > 0.0, next + reach + slack, next + slack),
                    steps + 1 + 3 * bands as usize,
                    region + (bands * BAND_CAPACITY) as usize,
                    layout,
                    false,
                );
                bands += 1;
                if found.size <= BAND_CAPACITY {
                    let (band_a, band_t) = banded_updates(
                        &band,
                        &found,
                        &anchor,
                        thresholds,
                        schedule[steps],
                        a,
                        t,
                        row,
                        lane,
                        steps,
                        log_k,
                        row_max,
                        layout.plane_width,
                    );
                    let (shared_a, shared_t, _) =
                        reducer.broadcast_first_unit(band_a, f32::cast_from(band_t as u32), 0.0);
                    a = shared_a;
                    t = u32::cast_from(shared_t) as usize;
                } else {
                    reach_limit = 0.25 * reach;
                }
            }
        }
    }
    write_output::<F, M>(&share, scores, mask, output, a, inv_eps_out, layout, masked);
}

/// Writes the row's output at threshold `a` and temperature 1 / `inv_eps`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output<F: Float, M: Int>(
    share: &Share,
    scores: &Array<F>,
    mask: &Array<M>,
    output: &mut Array<F>,
    a: f32,
    inv_eps: f32,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) {
    #[unroll]
    for i in 0..layout.per_unit {
        if i < share.live {
            let y = soft_top_k(share.resident[i as usize], a, inv_eps);
            output[share.base + share.lane + i as usize * share.stride] = F::cast_from(y);
        }
    }
    if comptime![layout.streamed] {
        let mut j = share.streamed_from;
        while j < share.n {
            let s = score::<F, M>(scores, mask, share.base + j, masked);
            output[share.base + j] = F::cast_from(soft_top_k(s, a, inv_eps));
            j += share.stride;
        }
    }
}

/// The output for score `s` at threshold `a`: 0 when masked (even in a fully masked row,
/// whose threshold rises to meet the masked scores).
#[cube]
fn soft_top_k(s: f32, a: f32, inv_eps: f32) -> f32 {
    select(
        s > MASKED_SCORE,
        f32::exp(f32::min(s + a, 0.0) * inv_eps),
        0.0,
    )
}

/// The gradient of the output at temperature `inv_eps_out` with respect to a valid score
/// below the last threshold, from the output gradient `g` (0 above it and when masked).
#[cube]
fn output_slope(s: f32, a_last: f32, g: f32, inv_eps_out: f32) -> f32 {
    select(
        s + a_last <= 0.0 && s > MASKED_SCORE,
        g * f32::exp((s + a_last) * inv_eps_out),
        0.0,
    )
}

/// The exact reverse sweep (`docs/soft-top-k.md`) from the thresholds of the forward: gradients with
/// respect to the scores and to k. Resident entries accumulate their gradient in registers
/// during the sweep; for streamed entries `coefficients` (shared, four per iteration and row
/// of the cube) carries each iteration's ā_t/Z_t, ceiling, shift and inverse temperature to
/// a final pass, so their gradient too is written once. A split row's cubes use `exchange`
/// slots 0 (maximum), 1 (ā_T) and 2 + 2(T − t), 3 + 2(T − t) (iteration t), cleared.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub fn coor_descent_backward<F: Float, M: Int>(
    scores: &Array<F>,
    k: &Array<F>,
    mask: &Array<M>,
    schedule: &Array<f32>,
    thresholds: &Array<f32>,
    grad: &Array<F>,
    d_scores: &mut Array<F>,
    d_k: &mut Array<F>,
    exchange: Array<Atomic<u32>>,
    rows: u32,
    n: u32,
    steps: u32,
    steady: u32,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) {
    let mut reducer = new_reducer(exchange);
    let mut coefficients = SharedMemory::<f32>::new(comptime![if layout.streamed {
        (COEFFICIENTS_PER_STEP * layout.max_steps * layout.rows_per_cube) as usize
    } else {
        1usize
    }]);
    // The band's weights and scores, and each update's coefficient (banded layouts only).
    let mut band = SharedMemory::<f32>::new(comptime![if layout.banded {
        2 * BAND_CAPACITY as usize
    } else {
        1usize
    }]);
    let mut band_coefficients = SharedMemory::<f32>::new(comptime![if layout.banded {
        2 * layout.max_steps as usize
    } else {
        1usize
    }]);
    let (row, lane) = row_and_lane(layout);
    // Rows past the end still reach the barriers: they only skip the memory writes.
    let active = row < rows as usize;
    let row = select(active, row, 0usize);
    let n = n as usize;
    let steps = steps as usize;
    let per_step = COEFFICIENTS_PER_STEP as usize;
    let table = UNIT_POS_Y as usize * per_step * layout.max_steps as usize;
    let share = load_share::<F, M>(scores, mask, row * n, n, lane, layout, masked);
    let base = share.base;
    let stride = share.stride;
    let mut weights = Array::<f32>::new(comptime![layout.per_unit as usize]);
    let mut resident_grad = Array::<f32>::new(comptime![layout.per_unit as usize]);
    let row_max = row_max::<F, M>(&share, scores, mask, &mut reducer, 0, layout, masked);
    let a_last = thresholds[row * steps + steps - 1];
    let inv_eps_out = 1.0 / schedule[steps];

    // ā_T = Σ_j g_j ∂y_j/∂a; each entry's own term starts its gradient.
    let mut local = 0.0f32;
    #[unroll]
    for i in 0..layout.per_unit {
        let mut slope = 0.0f32;
        if i < share.live {
            let g = f32::cast_from(grad[base + lane + i as usize * stride]);
            slope = output_slope(share.resident[i as usize], a_last, g, inv_eps_out);
        }
        local += slope;
        resident_grad[i as usize] = slope * inv_eps_out;
    }
    if comptime![layout.streamed] {
        let mut j = share.streamed_from;
        while j < n {
            let s = score::<F, M>(scores, mask, base + j, masked);
            local += output_slope(s, a_last, f32::cast_from(grad[base + j]), inv_eps_out);
            j += stride;
        }
    }
    let mut d_a = reducer.sum(local, 1, layout) * inv_eps_out;
    let mut d_log_k = d_a * schedule[steps - 1];

    // Reverse sweep over t = T..2: a_t depends on a_{t−1} through the softmax at eps_t,
    // p_j = weight_j / Z for the entries below the ceiling.
    let mut anchor = unset_anchor(inv_eps_out);
    let mut t = steps;
    // The updates at the output temperature (0-based steady..T−1) from a band spanning
    // their ceilings, when there are two or more.
    if comptime![layout.banded] {
        if steady >= 1 && steps >= steady as usize + 2 {
            let steady = steady as usize;
            let at = row * steps;
            let mut lowest = f32::new(NO_LIMIT);
            let mut highest = -f32::new(NO_LIMIT);
            let mut u = steady + UNIT_POS_PLANE as usize;
            while u < steps {
                let ceiling = -thresholds[at + u - 1];
                lowest = f32::min(lowest, ceiling);
                highest = f32::max(highest, ceiling);
                u += PLANE_DIM as usize;
            }
            let lo = plane_min(lowest);
            let hi = plane_max(highest);
            // Anchors the weights at the first of these updates.
            weighting(
                &share,
                &mut weights,
                &mut anchor,
                -thresholds[at + steps - 2],
                row_max,
                inv_eps_out,
                true,
                layout.per_unit,
            );
            let r = anchor.anchor;
            if f32::abs(f32::min(row_max, lo) - r) <= anchor.margin
                && f32::abs(f32::min(row_max, hi) - r) <= anchor.margin
            {
                let mut region = 0usize;
                if comptime![layout.splits > 1] {
                    region = band_region(&reducer.exchange, rows, row, BACKWARD_BAND_WORDS);
                }
                let found = gather_band(
                    &share,
                    &weights,
                    &mut band,
                    &mut reducer,
                    lo,
                    hi,
                    2 * steps,
                    region,
                    layout,
                    true,
                );
                if found.size <= BAND_CAPACITY {
                    // Each update's sums over the band depend on its ceiling alone, so the
                    // planes compute them side by side (update u: its total at u, the part
                    // above the ceiling at max_steps + u); then the first unit runs the
                    // sweep's scalars, keeping each update's coefficient ā_t/Z_t at u.
                    // Below the band every update applies, so those entries take their sum.
                    let max_steps = layout.max_steps as usize;
                    let planes = layout.planes as usize;
                    let mut u = steady + PLANE_POS as usize;
                    while u < steps {
                        let ceiling = -thresholds[at + u - 1];
                        let bound = anchor.bound(ceiling);
                        let (total, above) =
                            band_sums(&band, &found, bound, ceiling, true, layout.plane_width);
                        if UNIT_POS_PLANE == 0 {
                            band_coefficients[u] = total;
                            band_coefficients[max_steps + u] = above;
                        }
                        u += planes;
                    }
                    sync_cube();
                    let mut band_d_a = d_a;
                    let mut band_d_log_k = d_log_k;
                    let mut below_coefficient = 0.0f32;
                    if UNIT_POS == 0 {
                        let mut u = steps - 1;
                        while u >= steady {
                            let total = band_coefficients[u];
                            let coefficient = band_d_a / total;
                            band_coefficients[u] = coefficient;
                            below_coefficient += coefficient;
                            band_d_a *= band_coefficients[max_steps + u] / total;
                            band_d_log_k += band_d_a * schedule[u - 1];
                            u -= 1;
                        }
                    }
                    let (shared_d_a, shared_d_log_k, shared_below) =
                        reducer.broadcast_first_unit(band_d_a, band_d_log_k, below_coefficient);
                    d_a = shared_d_a;
                    d_log_k = shared_d_log_k;
                    #[unroll]
                    for i in 0..layout.per_unit {
                        let s = share.resident[i as usize];
                        let mut coefficient = 0.0f32;
                        if s <= lo {
                            coefficient = shared_below;
                        } else if s <= hi {
                            for u in steady..steps {
                                if s <= -thresholds[at + u - 1] {
                                    coefficient += band_coefficients[u];
                                }
                            }
                        }
                        resident_grad[i as usize] -= coefficient * weights[i as usize];
                    }
                    t = steady;
                }
            }
        }
    }
    while t >= 2 {
        let eps = schedule[t - 1];
        let weighting = weighting(
            &share,
            &mut weights,
            &mut anchor,
            -thresholds[row * steps + t - 2],
            row_max,
            1.0 / eps,
            t > steady as usize,
            layout.per_unit,
        );
        let (total, above) = partition::<F, M>(
            &share,
            &mut weights,
            scores,
            mask,
            weighting,
            &mut reducer,
            2 + 2 * (steps - t),
            layout,
            masked,
            true,
        );
        let coefficient = d_a / total;
        #[unroll]
        for i in 0..layout.per_unit {
            if share.resident[i as usize] <= weighting.ceiling {
                resident_grad[i as usize] -=
                    coefficient * resident_weight(&weights, i as usize, weighting);
            }
        }
        if comptime![layout.streamed] {
            if UNIT_POS_X == 0 {
                let at = table + per_step * (t - 2);
                coefficients[at] = coefficient;
                coefficients[at + 1] = weighting.ceiling;
                coefficients[at + 2] = weighting.reference;
                coefficients[at + 3] = weighting.inv_eps;
            }
        }
        // 1 − Σ_below p = Σ_above p, computed directly to avoid the cancellation.
        d_a *= above / total;
        d_log_k += d_a * schedule[t - 2];
        t -= 1;
    }

    if active {
        #[unroll]
        for i in 0..layout.per_unit {
            if i < share.live {
                let s = share.resident[i as usize];
                let ds = select(s > MASKED_SCORE, resident_grad[i as usize], 0.0);
                d_scores[base + lane + i as usize * stride] = F::cast_from(ds);
            }
        }
    }
    if comptime![layout.streamed] {
        sync_cube();
        if active {
            let mut j = share.streamed_from;
            while j < n {
                let s = score::<F, M>(scores, mask, base + j, masked);
                let g = f32::cast_from(grad[base + j]);
                let mut ds = output_slope(s, a_last, g, inv_eps_out) * inv_eps_out;
                if s > MASKED_SCORE {
                    for u in 0..steps - 1 {
                        let at = table + per_step * u;
                        if s <= coefficients[at + 1] {
                            let shift = coefficients[at + 2];
                            ds -= coefficients[at] * f32::exp((s - shift) * coefficients[at + 3]);
                        }
                    }
                }
                d_scores[base + j] = F::cast_from(ds);
                j += stride;
            }
        }
    }
    if active && lane == 0 {
        d_k[row] = F::cast_from(d_log_k / f32::cast_from(k[row]));
    }
}

/// Floor of the Newton step's denominator, which is 0 when every entry is saturated.
const TINY: f32 = 1.0e-30;

/// Minimum over the units of a row's group, of valid scores only (masked entries and slots
/// past the row's end hold [`MASKED_SCORE`]; a row with none gives −MASKED_SCORE).
#[cube]
fn valid_min<F: Float, M: Int>(
    share: &Share,
    scores: &Array<F>,
    mask: &Array<M>,
    reducer: &mut Reducer,
    slot: usize,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) -> f32 {
    // The maximum of the negated valid scores.
    let mut best = f32::new(MASKED_SCORE);
    #[unroll]
    for i in 0..layout.per_unit {
        let s = share.resident[i as usize];
        best = f32::max(best, select(s > MASKED_SCORE, -s, MASKED_SCORE));
    }
    if comptime![layout.streamed] {
        let mut j = share.streamed_from;
        while j < share.n {
            let s = score::<F, M>(scores, mask, share.base + j, masked);
            best = f32::max(best, select(s > MASKED_SCORE, -s, MASKED_SCORE));
            j += share.stride;
        }
    }
    -reducer.max(best, slot, layout)
}

/// The converged solver: the fixed point f(a) = Σ_j exp(min(s_j + a, 0)/eps) = k of every
/// row, by Newton steps on ln f(a) − ln k kept inside the bracket
/// [eps·ln(k/n_valid) − max s, −min s] by bisection (colt5's `converged.rs` describes the
/// method); each row stops on its own once |f/k − 1| ≤ `tolerance` or the bracket has
/// closed to f32 precision, after at most `max_passes` passes. Writes the output, the
/// threshold a of every row (`[rows]`, element `F`) and the passes it took (`[rows]`). A
/// split row's cubes use `exchange` slots 0 (maximum), 1 (minimum), 2 (valid count) and
/// 2p + 1, 2p + 2 (pass p), cleared.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotInf)]
pub fn coor_descent_converged<F: Float, M: Int>(
    scores: &Array<F>,
    k: &Array<F>,
    mask: &Array<M>,
    output: &mut Array<F>,
    thresholds: &mut Array<F>,
    passes: &mut Array<u32>,
    exchange: Array<Atomic<u32>>,
    rows: u32,
    n: u32,
    eps: f32,
    tolerance: f32,
    max_passes: u32,
    #[comptime] layout: KernelLayout,
    #[comptime] masked: bool,
) {
    let mut reducer = new_reducer(exchange);
    let (row, lane) = row_and_lane(layout);
    // As in the forward: groups without a row exit together.
    if row >= rows as usize {
        terminate!();
    }
    let n = n as usize;
    let inv_eps = 1.0 / eps;
    let share = load_share::<F, M>(scores, mask, row * n, n, lane, layout, masked);
    let row_max = row_max::<F, M>(&share, scores, mask, &mut reducer, 0, layout, masked);
    let row_min = valid_min::<F, M>(&share, scores, mask, &mut reducer, 1, layout, masked);
    let n_valid = valid_count::<M>(mask, &share, &mut reducer, 2, layout, masked);
    let k_row = f32::cast_from(k[row]);
    let log_target = f32::ln(f32::min(k_row, n_valid));
    let mut lo = eps * f32::ln(k_row / n_valid) - row_max;
    let mut hi = -row_min;
    // Rows with k ≥ n_valid (or no valid entry, where lo > hi) solve nothing: every valid
    // entry saturates at a = hi.
    let saturated = k_row >= n_valid || lo >= hi;
    let mut a = lo;
    let mut count = 0u32;
    let mut searching = !saturated;
    while searching && count < max_passes {
        count += 1;
        // Σ_j y_j, and the part from entries below saturation (the slope of ln f).
        let mut local_total = 0.0f32;
        let mut local_below = 0.0f32;
        #[unroll]
        for i in 0..layout.per_unit {
            let s = share.resident[i as usize];
            let y = soft_top_k(s, a, inv_eps);
            local_total += y;
            local_below += select(s + a < 0.0, y, 0.0);
        }
        if comptime![layout.streamed] {
            let mut j = share.streamed_from;
            while j < n {
                let s = score::<F, M>(scores, mask, share.base + j, masked);
                let y = soft_top_k(s, a, inv_eps);
                local_total += y;
                local_below += select(s + a < 0.0, y, 0.0);
                j += share.stride;
            }
        }
        let (total, below) = reducer.sum_pair(
            local_total,
            local_below,
            1 + 2 * count as usize,
            layout,
            2u32,
        );
        let log_total = f32::ln(total);
        let residual = f32::abs(f32::exp(log_total - log_target) - 1.0);
        let width = (hi - lo) / (f32::abs(a) + eps);
        searching = residual > tolerance && width > 8.0 * f32::EPSILON;
        if searching {
            let excess = log_total - log_target;
            if excess > 0.0 {
                hi = a;
            } else {
                lo = a;
            }
            // Newton on ln f: (ln f)' = Σ_below y / (eps f).
            let newton = a - excess * total / f32::max(below, TINY) * eps;
            let inside = newton > lo && newton < hi;
            a = select(inside, newton, 0.5 * (lo + hi));
        }
    }
    if saturated {
        a = hi;
    }
    write_output::<F, M>(&share, scores, mask, output, a, inv_eps, layout, masked);
    if lane == 0 {
        thresholds[row] = F::cast_from(a);
        passes[row] = count;
    }
}

/// Sets every word of `words` to 0: the cleared state of the exchange words of split rows.
#[cube(launch_unchecked)]
pub(crate) fn clear_words(words: &mut Array<u32>) {
    if ABSOLUTE_POS < words.len() {
        words[ABSOLUTE_POS] = 0;
    }
}
