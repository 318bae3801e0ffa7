//! Fused attention over a band of keys: softmax(scale·q·kᵀ)·v where query i sees the keys
//! `[lo(i), hi(i))` of a [`Band`] (whole attention, or the windows of local attention, with
//! causal and exact-window limits) and, optionally, a per-head key mask. Nothing of size
//! queries × keys is written: the forward keeps a running maximum and sum per query (the
//! online softmax) and writes the output and each query's log-sum-exp; the backward
//! recomputes the weights from them, once per query for dq and once per key for dk and dv.
//!
//! A query's row is held by `split` adjacent units of one plane, each with `dim_head / split`
//! of its features in registers; their partial dot products meet through plane shuffles.
//! Keys (forward, dq) or queries (dk, dv) stream through shared memory a tile at a time; a
//! cube visits only the tiles its rows' ranges cover, so local attention costs the band, not
//! the square. The arithmetic is f32 whatever the element type.

use cubecl::prelude::*;

use cubecl::server::Handle;

use crate::kernels::cube_index;
use crate::{grid, LaunchError};

/// The running maximum before a query has seen a key: finite, so that no infinity reaches
/// `exp` (the first key seen rescales the empty sum by exp(−∞-like) = 0).
const HIDDEN: f32 = -1.0e30;

/// How the kernels map the problem onto units, fixed when they are compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionLayout {
    /// Features of a query, key or value.
    pub dim_head: u32,
    /// Units sharing one row (a power of two up to 8 that divides `dim_head`).
    pub split: u32,
    /// Rows (queries, or keys for dk/dv) of a cube.
    pub rows: u32,
    /// Keys (forward, dq) or queries (dk, dv) per tile of shared memory.
    pub tile: u32,
    /// Whether a key mask is given.
    pub masked: bool,
    /// Whether query i sees no key after `i + offset`.
    pub causal: bool,
    /// Whether keys are limited to `look_backward`/`look_forward` windows' lengths around
    /// the query instead of whole windows.
    pub exact: bool,
}

/// The band's runtime parameters (see `Band` in lib.rs).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub struct BandArgs {
    /// Queries per head.
    pub queries: u32,
    /// Keys per head.
    pub keys: u32,
    /// Batch × heads.
    pub batch_heads: u32,
    /// Window length.
    pub window: u32,
    /// Windows seen before the query's.
    pub look_backward: u32,
    /// Windows seen after the query's.
    pub look_forward: u32,
    /// Causal offset: query i sees keys up to i + offset.
    pub offset: i32,
    /// Logit scale.
    pub scale: f32,
}

/// The keys `[lo, hi)` query `i` sees (before the key mask).
#[cube]
fn key_range(
    i: u32,
    band: &BandArgs,
    #[comptime] causal: bool,
    #[comptime] exact: bool,
) -> (u32, u32) {
    let window = band.window;
    let own = i / window;
    let mut lo = 0u32;
    if own >= band.look_backward {
        lo = (own - band.look_backward) * window;
    }
    let mut hi = u32::min(band.keys, (own + band.look_forward + 1) * window);
    if causal {
        let end = i32::cast_from(i) + band.offset + 1;
        hi = u32::min(hi, u32::cast_from(i32::max(end, 0)));
    }
    if exact {
        let reach = window * band.look_backward;
        if i > reach {
            lo = u32::max(lo, i - reach);
        }
        if !causal {
            hi = u32::min(hi, i + window * band.look_forward + 1);
        }
    }
    (lo, hi)
}

/// `value` summed over the `split` units of its row.
#[cube]
fn row_sum(value: f32, #[comptime] split: u32) -> f32 {
    let mut total = value;
    if split > 1 {
        total += plane_shuffle_xor(total, 1u32);
    }
    if split > 2 {
        total += plane_shuffle_xor(total, 2u32);
    }
    if split > 4 {
        total += plane_shuffle_xor(total, 4u32);
    }
    total
}

/// Where a cube's rows start and which head they belong to: `(head, first row)`.
#[cube]
fn cube_rows(rows: u32, count: u32) -> (u32, u32) {
    let per_head = count.div_ceil(rows);
    let cube = cube_index() as u32;
    (cube / per_head, (cube % per_head) * rows)
}

/// Copies rows `[first, first + tile)` of head `head` of `source` (`[heads, count, dim]`)
/// into `target` (`[tile, dim]`, f32, times `factor`), zeros past `count`.
#[cube]
fn load_tile<F: Float>(
    source: &Array<F>,
    target: &mut SharedMemory<f32>,
    head: u32,
    first: u32,
    count: u32,
    factor: f32,
    #[comptime] tile: u32,
    #[comptime] dim: u32,
) {
    let mut e = UNIT_POS as usize;
    let units = CUBE_DIM as usize;
    let size = comptime![(tile * dim) as usize];
    while e < size {
        let row = first + (e / dim as usize) as u32;
        let mut value = 0.0f32;
        if row < count {
            let at = (head * count + row) as usize * dim as usize + e % dim as usize;
            value = f32::cast_from(source[at]) * factor;
        }
        target[e] = value;
        e += units;
    }
}

/// Whether key `j` of head `head` passes the mask (always, without one).
#[cube]
fn key_kept<M: Int>(
    mask: &Array<M>,
    head: u32,
    j: u32,
    keys: u32,
    #[comptime] masked: bool,
) -> bool {
    let mut kept = j < keys;
    if masked && kept {
        kept = mask[(head * keys + j) as usize] != M::from_int(0);
    }
    kept
}

/// Forward: `out [heads, queries, dim]` and the log-sum-exp of each query's scaled logits
/// (`lse [heads, queries]`, 0 where the query sees no key, whose output is 0). One cube
/// per `rows` queries of a head.
#[cube(launch_unchecked)]
pub fn attention_forward_rows<F: Float, M: Int>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    mask: &Array<M>,
    out: &mut Array<F>,
    lse: &mut Array<f32>,
    band: BandArgs,
    #[comptime] layout: AttentionLayout,
) {
    let split = comptime![layout.split];
    let part_len = comptime![layout.dim_head / layout.split];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first) = cube_rows(layout.rows, band.queries);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let i = first + unit / split;
    let query = u32::min(i, band.queries - 1);
    let (lo, hi) = key_range(query, &band, layout.causal, layout.exact);
    let last = u32::min(first + layout.rows, band.queries) - 1;
    let (start, _) = key_range(first, &band, layout.causal, layout.exact);
    let (_, end) = key_range(last, &band, layout.causal, layout.exact);

    let offset = part * part_len;
    let row_at = (head * band.queries + query) as usize * dim as usize + offset as usize;
    let mut own_q = Array::<f32>::new(part_len as usize);
    let mut acc = Array::<f32>::new(part_len as usize);
    #[unroll]
    for d in 0..part_len {
        own_q[d as usize] = f32::cast_from(q[row_at + d as usize]) * band.scale;
        acc[d as usize] = 0.0;
    }
    let mut max = f32::new(HIDDEN);
    let mut sum = 0.0f32;
    let mut keys_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut values_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut kept = SharedMemory::<u32>::new(tile as usize);

    let mut j0 = start;
    while j0 < end {
        load_tile::<F>(k, &mut keys_tile, head, j0, band.keys, 1.0, tile, dim);
        load_tile::<F>(v, &mut values_tile, head, j0, band.keys, 1.0, tile, dim);
        if unit < tile {
            kept[unit as usize] = u32::cast_from(key_kept::<M>(
                mask,
                head,
                j0 + unit,
                band.keys,
                layout.masked,
            ));
        }
        sync_cube();
        for t in 0..tile {
            let mut dot = 0.0f32;
            #[unroll]
            for d in 0..part_len {
                dot += own_q[d as usize] * keys_tile[(t * dim + offset + d) as usize];
            }
            dot = row_sum(dot, split);
            let j = j0 + t;
            if j >= lo && j < hi && kept[t as usize] == 1u32 {
                if dot > max {
                    let rescale = f32::exp(max - dot);
                    sum *= rescale;
                    #[unroll]
                    for d in 0..part_len {
                        acc[d as usize] *= rescale;
                    }
                    max = dot;
                }
                let p = f32::exp(dot - max);
                sum += p;
                #[unroll]
                for d in 0..part_len {
                    acc[d as usize] += p * values_tile[(t * dim + offset + d) as usize];
                }
            }
        }
        sync_cube();
        j0 += tile;
    }

    if i < band.queries {
        let inverse = select(sum > 0.0, 1.0 / sum, 0.0);
        #[unroll]
        for d in 0..part_len {
            out[row_at + d as usize] = F::cast_from(acc[d as usize] * inverse);
        }
        if part == 0 {
            lse[(head * band.queries + i) as usize] = select(sum > 0.0, max + f32::ln(sum), 0.0);
        }
    }
}

/// Backward, queries' side: `dq` and each query's `delta = Σ dout·out` (which
/// [`attention_backward_keys`] reads). One cube per `rows` queries of a head.
#[cube(launch_unchecked)]
pub fn attention_backward_queries<F: Float, M: Int>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    mask: &Array<M>,
    out: &Array<F>,
    lse: &Array<f32>,
    grad: &Array<F>,
    dq: &mut Array<F>,
    delta: &mut Array<f32>,
    band: BandArgs,
    #[comptime] layout: AttentionLayout,
) {
    let split = comptime![layout.split];
    let part_len = comptime![layout.dim_head / layout.split];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first) = cube_rows(layout.rows, band.queries);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let i = first + unit / split;
    let query = u32::min(i, band.queries - 1);
    let (lo, hi) = key_range(query, &band, layout.causal, layout.exact);
    let last = u32::min(first + layout.rows, band.queries) - 1;
    let (start, _) = key_range(first, &band, layout.causal, layout.exact);
    let (_, end) = key_range(last, &band, layout.causal, layout.exact);

    let offset = part * part_len;
    let row_at = (head * band.queries + query) as usize * dim as usize + offset as usize;
    let mut own_q = Array::<f32>::new(part_len as usize);
    let mut own_grad = Array::<f32>::new(part_len as usize);
    let mut acc = Array::<f32>::new(part_len as usize);
    let mut own_delta = 0.0f32;
    #[unroll]
    for d in 0..part_len {
        own_q[d as usize] = f32::cast_from(q[row_at + d as usize]) * band.scale;
        own_grad[d as usize] = f32::cast_from(grad[row_at + d as usize]);
        own_delta += own_grad[d as usize] * f32::cast_from(out[row_at + d as usize]);
        acc[d as usize] = 0.0;
    }
    own_delta = row_sum(own_delta, split);
    let own_lse = lse[(head * band.queries + query) as usize];
    let mut keys_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut values_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut kept = SharedMemory::<u32>::new(tile as usize);

    let mut j0 = start;
    while j0 < end {
        load_tile::<F>(k, &mut keys_tile, head, j0, band.keys, 1.0, tile, dim);
        load_tile::<F>(v, &mut values_tile, head, j0, band.keys, 1.0, tile, dim);
        if unit < tile {
            kept[unit as usize] = u32::cast_from(key_kept::<M>(
                mask,
                head,
                j0 + unit,
                band.keys,
                layout.masked,
            ));
        }
        sync_cube();
        for t in 0..tile {
            let mut dot = 0.0f32;
            let mut grad_dot = 0.0f32;
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                dot += own_q[d as usize] * keys_tile[at];
                grad_dot += own_grad[d as usize] * values_tile[at];
            }
            dot = row_sum(dot, split);
            grad_dot = row_sum(grad_dot, split);
            let j = j0 + t;
            let seen = j >= lo && j < hi && kept[t as usize] == 1u32;
            let p = select(seen, f32::exp(dot - own_lse), 0.0);
            let d_logit = p * (grad_dot - own_delta);
            #[unroll]
            for d in 0..part_len {
                acc[d as usize] += d_logit * keys_tile[(t * dim + offset + d) as usize];
            }
        }
        sync_cube();
        j0 += tile;
    }

    if i < band.queries {
        #[unroll]
        for d in 0..part_len {
            dq[row_at + d as usize] = F::cast_from(acc[d as usize] * band.scale);
        }
        if part == 0 {
            delta[(head * band.queries + i) as usize] = own_delta;
        }
    }
}

/// The first query in `[0, queries)` whose key range ends after key `j` (`queries` if none).
#[cube]
fn first_query_after(
    j: u32,
    band: &BandArgs,
    #[comptime] causal: bool,
    #[comptime] exact: bool,
) -> u32 {
    let mut low = 0u32;
    let mut high = band.queries;
    while low < high {
        let middle = (low + high) / 2;
        let (_, hi) = key_range(middle, band, causal, exact);
        if hi > j {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    low
}

/// How many queries' key ranges start at or before key `j`.
#[cube]
fn queries_starting_by(
    j: u32,
    band: &BandArgs,
    #[comptime] causal: bool,
    #[comptime] exact: bool,
) -> u32 {
    let mut low = 0u32;
    let mut high = band.queries;
    while low < high {
        let middle = (low + high) / 2;
        let (lo, _) = key_range(middle, band, causal, exact);
        if lo <= j {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

/// Backward, keys' side: `dk` and `dv`. One cube per `rows` keys of a head; it visits the
/// queries whose ranges reach its keys (ranges are monotone in the query, so these form
/// one stretch, found by bisection).
#[cube(launch_unchecked)]
pub fn attention_backward_keys<F: Float, M: Int>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    mask: &Array<M>,
    lse: &Array<f32>,
    grad: &Array<F>,
    delta: &Array<f32>,
    dk: &mut Array<F>,
    dv: &mut Array<F>,
    band: BandArgs,
    #[comptime] layout: AttentionLayout,
) {
    let split = comptime![layout.split];
    let part_len = comptime![layout.dim_head / layout.split];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first) = cube_rows(layout.rows, band.keys);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let j = first + unit / split;
    let key = u32::min(j, band.keys - 1);
    let last = u32::min(first + layout.rows, band.keys) - 1;
    let start = first_query_after(first, &band, layout.causal, layout.exact);
    let end = queries_starting_by(last, &band, layout.causal, layout.exact);
    let own_kept = key_kept::<M>(mask, head, j, band.keys, layout.masked);

    let offset = part * part_len;
    let row_at = (head * band.keys + key) as usize * dim as usize + offset as usize;
    let mut own_k = Array::<f32>::new(part_len as usize);
    let mut own_v = Array::<f32>::new(part_len as usize);
    let mut acc_k = Array::<f32>::new(part_len as usize);
    let mut acc_v = Array::<f32>::new(part_len as usize);
    #[unroll]
    for d in 0..part_len {
        own_k[d as usize] = f32::cast_from(k[row_at + d as usize]);
        own_v[d as usize] = f32::cast_from(v[row_at + d as usize]);
        acc_k[d as usize] = 0.0;
        acc_v[d as usize] = 0.0;
    }
    let mut queries_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut grads_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    // Per query of the tile: lse, delta, and the key range.
    let mut lse_tile = SharedMemory::<f32>::new(tile as usize);
    let mut delta_tile = SharedMemory::<f32>::new(tile as usize);
    let mut lo_tile = SharedMemory::<u32>::new(tile as usize);
    let mut hi_tile = SharedMemory::<u32>::new(tile as usize);

    let mut i0 = start;
    while i0 < end {
        load_tile::<F>(
            q,
            &mut queries_tile,
            head,
            i0,
            band.queries,
            band.scale,
            tile,
            dim,
        );
        load_tile::<F>(
            grad,
            &mut grads_tile,
            head,
            i0,
            band.queries,
            1.0,
            tile,
            dim,
        );
        if unit < tile {
            let i = i0 + unit;
            let query = u32::min(i, band.queries - 1);
            let (lo, hi) = key_range(query, &band, layout.causal, layout.exact);
            let at = (head * band.queries + query) as usize;
            lse_tile[unit as usize] = lse[at];
            delta_tile[unit as usize] = delta[at];
            lo_tile[unit as usize] = lo;
            // Queries past the end see nothing.
            hi_tile[unit as usize] = select(i < band.queries, hi, 0u32);
        }
        sync_cube();
        for t in 0..tile {
            let mut dot = 0.0f32;
            let mut grad_dot = 0.0f32;
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                dot += queries_tile[at] * own_k[d as usize];
                grad_dot += grads_tile[at] * own_v[d as usize];
            }
            dot = row_sum(dot, split);
            grad_dot = row_sum(grad_dot, split);
            let seen = own_kept && j >= lo_tile[t as usize] && j < hi_tile[t as usize];
            let p = select(seen, f32::exp(dot - lse_tile[t as usize]), 0.0);
            let d_logit = p * (grad_dot - delta_tile[t as usize]);
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                acc_v[d as usize] += p * grads_tile[at];
                acc_k[d as usize] += d_logit * queries_tile[at];
            }
        }
        sync_cube();
        i0 += tile;
    }

    if j < band.keys {
        #[unroll]
        for d in 0..part_len {
            dk[row_at + d as usize] = F::cast_from(acc_k[d as usize]);
            dv[row_at + d as usize] = F::cast_from(acc_v[d as usize]);
        }
    }
}

/// Which keys each query sees: query i, in window `i / window`, sees the keys of windows
/// `look_backward` before to `look_forward` after its own (clipped to the keys); with
/// `exact`, only those within `window·look_backward` before and `window·look_forward`
/// after it; with `causal_offset = Some(c)`, none after `i + c`. The ranges must not
/// decrease with i (all of these do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Band {
    /// Window length (≥ 1).
    pub window: usize,
    /// Windows seen before the query's.
    pub look_backward: usize,
    /// Windows seen after the query's.
    pub look_forward: usize,
    /// Query i sees no key after `i + offset`.
    pub causal_offset: Option<i64>,
    /// Limit the band to the windows' lengths around the query.
    pub exact: bool,
}

impl Band {
    /// Every query sees every key (before `causal_offset`, if any).
    pub fn full(queries: usize, keys: usize, causal_offset: Option<i64>) -> Self {
        Band {
            window: queries.max(keys).max(1),
            look_backward: 0,
            look_forward: 0,
            causal_offset,
            exact: false,
        }
    }

    /// The keys `[lo, hi)` query `i` of `keys` sees, as the kernels compute them.
    pub fn key_range(&self, i: usize, keys: usize) -> (usize, usize) {
        let own = i / self.window;
        let mut lo = own.saturating_sub(self.look_backward) * self.window;
        let mut hi = keys.min((own + self.look_forward + 1) * self.window);
        if let Some(offset) = self.causal_offset {
            hi = hi.min((i as i64 + offset + 1).max(0) as usize);
        }
        if self.exact {
            lo = lo.max(i.saturating_sub(self.window * self.look_backward));
            if self.causal_offset.is_none() {
                hi = hi.min(i + self.window * self.look_forward + 1);
            }
        }
        (lo, hi.max(lo))
    }
}

/// The shape of one attention call: `q [batch_heads, queries, dim_head]`, `k, v
/// [batch_heads, keys, dim_head]`, all contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch × heads.
    pub batch_heads: usize,
    /// Queries per head.
    pub queries: usize,
    /// Keys per head.
    pub keys: usize,
    /// Features per head.
    pub dim_head: usize,
}

/// The inputs of one attention call (element `F`), with an optional key mask
/// `[batch_heads, keys]` (element `M`, nonzero = visible).
pub struct AttentionInputs<'a> {
    /// Queries.
    pub q: &'a Handle,
    /// Keys.
    pub k: &'a Handle,
    /// Values.
    pub v: &'a Handle,
    /// The key mask, if any.
    pub mask: Option<&'a Handle>,
    /// Their shape.
    pub shape: AttentionShape,
    /// Which keys each query sees.
    pub band: Band,
    /// The logits' scale.
    pub scale: f32,
}

/// The largest `dim_head` the kernels take.
pub const MAX_DIM_HEAD: usize = 256;
/// Features of a row each unit holds, at most.
const FEATURES_PER_UNIT: usize = 32;
/// Rows of a cube.
const ROWS_PER_CUBE: usize = 64;

/// A checked launch: layout, grid and arguments.
struct AttentionLaunch<R: Runtime> {
    layout: AttentionLayout,
    units: u32,
    /// The mask (a one-element placeholder without one) and its length.
    mask: (Handle, usize),
    runtime: std::marker::PhantomData<R>,
}

impl<R: Runtime> AttentionLaunch<R> {
    fn new<M: CubePrimitive>(
        client: &ComputeClient<R>,
        inputs: &AttentionInputs,
    ) -> Result<Self, LaunchError> {
        let AttentionShape {
            batch_heads,
            queries,
            keys,
            dim_head,
        } = inputs.shape;
        if batch_heads == 0 || queries == 0 || keys == 0 || inputs.band.window == 0 {
            return Err(LaunchError::Attention(inputs.shape));
        }
        let split = dim_head.div_ceil(FEATURES_PER_UNIT).next_power_of_two();
        let too_long = |n: usize| n > i32::MAX as usize / 4;
        if dim_head == 0
            || dim_head > MAX_DIM_HEAD
            || dim_head % split != 0
            || too_long(
                queries.max(keys).max(inputs.band.window)
                    * (inputs.band.look_backward + inputs.band.look_forward + 2),
            )
        {
            return Err(LaunchError::Attention(inputs.shape));
        }
        let hardware = &client.properties().hardware;
        let max_units = hardware.max_units_per_cube as usize;
        let rows = (max_units / split).min(ROWS_PER_CUBE);
        // Two tiles of f32 features and four words per tile row must fit shared memory.
        let tile = [32usize, 16, 8]
            .into_iter()
            .find(|&tile| {
                tile <= rows && 4 * tile * (2 * dim_head + 4) <= hardware.max_shared_memory_size
            })
            .ok_or(LaunchError::SharedMemory {
                bytes: 4 * 8 * (2 * dim_head + 4),
                available: hardware.max_shared_memory_size,
            })?;
        let mask = match inputs.mask {
            Some(mask) => (mask.clone(), batch_heads * keys),
            None => (client.empty(M::type_size()), 1),
        };
        Ok(AttentionLaunch {
            layout: AttentionLayout {
                dim_head: dim_head as u32,
                split: split as u32,
                rows: rows as u32,
                tile: tile as u32,
                masked: inputs.mask.is_some(),
                causal: inputs.band.causal_offset.is_some(),
                exact: inputs.band.exact,
            },
            units: (rows * split) as u32,
            mask,
            runtime: std::marker::PhantomData,
        })
    }

    fn mask(&self) -> ArrayArg<R> {
        // The length is that of the mask given or of the placeholder allocated.
        unsafe { ArrayArg::from_raw_parts(self.mask.0.clone(), self.mask.1) }
    }

    fn band(&self, inputs: &AttentionInputs) -> BandArgsLaunch<R> {
        let shape = inputs.shape;
        let band = inputs.band;
        BandArgsLaunch::new(
            shape.queries as u32,
            shape.keys as u32,
            shape.batch_heads as u32,
            band.window as u32,
            band.look_backward as u32,
            band.look_forward as u32,
            band.causal_offset.unwrap_or(0) as i32,
            inputs.scale,
        )
    }

    /// Cubes for `count` rows per head.
    fn cubes(&self, inputs: &AttentionInputs, count: usize) -> CubeCount {
        grid(inputs.shape.batch_heads * count.div_ceil(self.layout.rows as usize))
    }
}

/// Fused attention forward: the output (`[batch_heads, queries, dim_head]`, element `F`)
/// and each query's log-sum-exp of its scaled logits (`[batch_heads, queries]`, f32), which
/// [`attention_backward`] takes. Errors on empty shapes, `dim_head` above
/// [`MAX_DIM_HEAD`] or not a multiple of its row split, and devices with too little
/// shared memory.
pub fn attention_forward<R: Runtime, F: Float + CubeElement, M: Int + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &AttentionInputs,
) -> Result<(Handle, Handle), LaunchError> {
    let launch = AttentionLaunch::<R>::new::<M>(client, inputs)?;
    let AttentionShape {
        batch_heads,
        queries,
        keys,
        dim_head,
    } = inputs.shape;
    let q_len = batch_heads * queries * dim_head;
    let kv_len = batch_heads * keys * dim_head;
    let out = client.empty(q_len * F::type_size());
    let lse = client.empty(batch_heads * queries * 4);
    unsafe {
        attention_forward_rows::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, queries),
            CubeDim::new_1d(launch.units),
            ArrayArg::from_raw_parts(inputs.q.clone(), q_len),
            ArrayArg::from_raw_parts(inputs.k.clone(), kv_len),
            ArrayArg::from_raw_parts(inputs.v.clone(), kv_len),
            launch.mask(),
            ArrayArg::from_raw_parts(out.clone(), q_len),
            ArrayArg::from_raw_parts(lse.clone(), batch_heads * queries),
            launch.band(inputs),
            launch.layout,
        );
    }
    Ok((out, lse))
}

/// Fused attention backward: `(dq, dk, dv)` (element `F`, shaped as q, k, v) given the
/// forward's output and log-sum-exp and the output's gradient `grad`.
pub fn attention_backward<R: Runtime, F: Float + CubeElement, M: Int + CubeElement>(
    client: &ComputeClient<R>,
    inputs: &AttentionInputs,
    out: &Handle,
    lse: &Handle,
    grad: &Handle,
) -> Result<(Handle, Handle, Handle), LaunchError> {
    let launch = AttentionLaunch::<R>::new::<M>(client, inputs)?;
    let AttentionShape {
        batch_heads,
        queries,
        keys,
        dim_head,
    } = inputs.shape;
    let q_len = batch_heads * queries * dim_head;
    let kv_len = batch_heads * keys * dim_head;
    let rows = batch_heads * queries;
    let dq = client.empty(q_len * F::type_size());
    let dk = client.empty(kv_len * F::type_size());
    let dv = client.empty(kv_len * F::type_size());
    let delta = client.empty(rows * 4);
    unsafe {
        let array = |handle: &Handle, len| ArrayArg::from_raw_parts(handle.clone(), len);
        attention_backward_queries::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, queries),
            CubeDim::new_1d(launch.units),
            array(inputs.q, q_len),
            array(inputs.k, kv_len),
            array(inputs.v, kv_len),
            launch.mask(),
            array(out, q_len),
            array(lse, rows),
            array(grad, q_len),
            array(&dq, q_len),
            array(&delta, rows),
            launch.band(inputs),
            launch.layout,
        );
        attention_backward_keys::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, keys),
            CubeDim::new_1d(launch.units),
            array(inputs.q, q_len),
            array(inputs.k, kv_len),
            array(inputs.v, kv_len),
            launch.mask(),
            array(lse, rows),
            array(grad, q_len),
            array(&delta, rows),
            array(&dk, kv_len),
            array(&dv, kv_len),
            launch.band(inputs),
            launch.layout,
        );
    }
    Ok((dq, dk, dv))
}
