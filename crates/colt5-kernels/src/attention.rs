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
    /// Units sharing one row (a power of two up to 16 that divides `dim_head`).
    pub split: u32,
    /// Rows (queries, or keys for dk/dv) of a cube.
    pub rows: u32,
    /// Rows each group of `split` units holds.
    pub per_unit: u32,
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
    if split > 8 {
        total += plane_shuffle_xor(total, 8u32);
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

/// A query cube's head, first query, and the keys `[start, end)` its queries' bands cover.
#[cube]
fn query_block(band: &BandArgs, #[comptime] layout: AttentionLayout) -> (u32, u32, u32, u32) {
    let (head, first) = cube_rows(layout.rows, band.queries);
    let last = u32::min(first + layout.rows, band.queries) - 1;
    let (start, _) = key_range(first, band, layout.causal, layout.exact);
    let (_, end) = key_range(last, band, layout.causal, layout.exact);
    (head, first, start, end)
}

/// Keys and values `[j0, j0 + tile)` of head `head` into shared memory, with whether each
/// passes the mask (1) or not (0).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_keys<F: Float, M: Int>(
    k: &Array<F>,
    v: &Array<F>,
    mask: &Array<M>,
    keys_tile: &mut SharedMemory<f32>,
    values_tile: &mut SharedMemory<f32>,
    kept: &mut SharedMemory<u32>,
    head: u32,
    j0: u32,
    band: &BandArgs,
    #[comptime] layout: AttentionLayout,
) {
    let tile = comptime![layout.tile];
    let dim = comptime![layout.dim_head];
    load_tile::<F>(k, keys_tile, head, j0, band.keys, 1.0, tile, dim);
    load_tile::<F>(v, values_tile, head, j0, band.keys, 1.0, tile, dim);
    let mut slot = UNIT_POS;
    while slot < tile {
        kept[slot as usize] = u32::cast_from(key_kept::<M>(
            mask,
            head,
            j0 + slot,
            band.keys,
            layout.masked,
        ));
        slot += CUBE_DIM;
    }
}

/// Forward: `out [heads, queries, dim]` and the log-sum-exp of each query's scaled logits
/// (`lse [heads, queries]`, 0 where the query sees no key, whose output is 0). One cube
/// per `rows` queries of a head; each group of `split` units holds `per_unit` queries, so
/// that every key feature read from shared memory serves `per_unit` products.
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
    let per_unit = comptime![layout.per_unit];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first, start, end) = query_block(&band, layout);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let own_first = first + (unit / split) * per_unit;
    let offset = part * part_len;

    let mut own_q = Array::<f32>::new((per_unit * part_len) as usize);
    let mut acc = Array::<f32>::new((per_unit * part_len) as usize);
    let mut lo = Array::<u32>::new(per_unit as usize);
    let mut hi = Array::<u32>::new(per_unit as usize);
    let mut max = Array::<f32>::new(per_unit as usize);
    let mut sum = Array::<f32>::new(per_unit as usize);
    let mut weights = Array::<f32>::new(per_unit as usize);
    #[unroll]
    for r in 0..per_unit {
        let query = u32::min(own_first + r, band.queries - 1);
        let (l, h) = key_range(query, &band, layout.causal, layout.exact);
        lo[r as usize] = l;
        hi[r as usize] = h;
        let at = (head * band.queries + query) as usize * dim as usize + offset as usize;
        #[unroll]
        for d in 0..part_len {
            own_q[(r * part_len + d) as usize] = f32::cast_from(q[at + d as usize]) * band.scale;
            acc[(r * part_len + d) as usize] = 0.0;
        }
        max[r as usize] = f32::new(HIDDEN);
        sum[r as usize] = 0.0;
    }
    let mut keys_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut values_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut kept = SharedMemory::<u32>::new(tile as usize);

    let mut j0 = start;
    while j0 < end {
        load_keys::<F, M>(
            k,
            v,
            mask,
            &mut keys_tile,
            &mut values_tile,
            &mut kept,
            head,
            j0,
            &band,
            layout,
        );
        sync_cube();
        for t in 0..tile {
            #[unroll]
            for r in 0..per_unit {
                weights[r as usize] = 0.0;
            }
            #[unroll]
            for d in 0..part_len {
                let feature = keys_tile[(t * dim + offset + d) as usize];
                #[unroll]
                for r in 0..per_unit {
                    weights[r as usize] += own_q[(r * part_len + d) as usize] * feature;
                }
            }
            let j = j0 + t;
            let kept_j = kept[t as usize] == 1u32;
            #[unroll]
            for r in 0..per_unit {
                let dot = row_sum(weights[r as usize], split);
                let mut p = 0.0f32;
                if kept_j && j >= lo[r as usize] && j < hi[r as usize] {
                    if dot > max[r as usize] {
                        let rescale = f32::exp(max[r as usize] - dot);
                        sum[r as usize] *= rescale;
                        #[unroll]
                        for d in 0..part_len {
                            acc[(r * part_len + d) as usize] *= rescale;
                        }
                        max[r as usize] = dot;
                    }
                    p = f32::exp(dot - max[r as usize]);
                    sum[r as usize] += p;
                }
                weights[r as usize] = p;
            }
            #[unroll]
            for d in 0..part_len {
                let feature = values_tile[(t * dim + offset + d) as usize];
                #[unroll]
                for r in 0..per_unit {
                    acc[(r * part_len + d) as usize] += weights[r as usize] * feature;
                }
            }
        }
        sync_cube();
        j0 += tile;
    }

    #[unroll]
    for r in 0..per_unit {
        let i = own_first + r;
        if i < band.queries {
            let total = sum[r as usize];
            let inverse = select(total > 0.0, 1.0 / total, 0.0);
            let at = (head * band.queries + i) as usize * dim as usize + offset as usize;
            #[unroll]
            for d in 0..part_len {
                out[at + d as usize] = F::cast_from(acc[(r * part_len + d) as usize] * inverse);
            }
            if part == 0 {
                lse[(head * band.queries + i) as usize] =
                    select(total > 0.0, max[r as usize] + f32::ln(total), 0.0);
            }
        }
    }
}

/// Backward, queries' side: `dq` and each query's `delta = Σ dout·out` (which
/// [`attention_backward_keys`] reads). One cube per `rows` queries of a head, `per_unit`
/// queries to each group of `split` units.
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
    let per_unit = comptime![layout.per_unit];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first, start, end) = query_block(&band, layout);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let own_first = first + (unit / split) * per_unit;
    let offset = part * part_len;

    let mut own_q = Array::<f32>::new((per_unit * part_len) as usize);
    let mut own_grad = Array::<f32>::new((per_unit * part_len) as usize);
    let mut acc = Array::<f32>::new((per_unit * part_len) as usize);
    let mut lo = Array::<u32>::new(per_unit as usize);
    let mut hi = Array::<u32>::new(per_unit as usize);
    let mut own_lse = Array::<f32>::new(per_unit as usize);
    let mut own_delta = Array::<f32>::new(per_unit as usize);
    let mut dots = Array::<f32>::new(per_unit as usize);
    let mut grad_dots = Array::<f32>::new(per_unit as usize);
    #[unroll]
    for r in 0..per_unit {
        let query = u32::min(own_first + r, band.queries - 1);
        let (l, h) = key_range(query, &band, layout.causal, layout.exact);
        lo[r as usize] = l;
        hi[r as usize] = h;
        let at = (head * band.queries + query) as usize * dim as usize + offset as usize;
        let mut partial = 0.0f32;
        #[unroll]
        for d in 0..part_len {
            let g = f32::cast_from(grad[at + d as usize]);
            own_q[(r * part_len + d) as usize] = f32::cast_from(q[at + d as usize]) * band.scale;
            own_grad[(r * part_len + d) as usize] = g;
            partial += g * f32::cast_from(out[at + d as usize]);
            acc[(r * part_len + d) as usize] = 0.0;
        }
        own_delta[r as usize] = row_sum(partial, split);
        own_lse[r as usize] = lse[(head * band.queries + query) as usize];
    }
    let mut keys_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut values_tile = SharedMemory::<f32>::new((tile * dim) as usize);
    let mut kept = SharedMemory::<u32>::new(tile as usize);

    let mut j0 = start;
    while j0 < end {
        load_keys::<F, M>(
            k,
            v,
            mask,
            &mut keys_tile,
            &mut values_tile,
            &mut kept,
            head,
            j0,
            &band,
            layout,
        );
        sync_cube();
        for t in 0..tile {
            #[unroll]
            for r in 0..per_unit {
                dots[r as usize] = 0.0;
                grad_dots[r as usize] = 0.0;
            }
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                let key_feature = keys_tile[at];
                let value_feature = values_tile[at];
                #[unroll]
                for r in 0..per_unit {
                    dots[r as usize] += own_q[(r * part_len + d) as usize] * key_feature;
                    grad_dots[r as usize] += own_grad[(r * part_len + d) as usize] * value_feature;
                }
            }
            let j = j0 + t;
            let kept_j = kept[t as usize] == 1u32;
            #[unroll]
            for r in 0..per_unit {
                let dot = row_sum(dots[r as usize], split);
                let grad_dot = row_sum(grad_dots[r as usize], split);
                let seen = kept_j && j >= lo[r as usize] && j < hi[r as usize];
                let p = select(seen, f32::exp(dot - own_lse[r as usize]), 0.0);
                dots[r as usize] = p * (grad_dot - own_delta[r as usize]);
            }
            #[unroll]
            for d in 0..part_len {
                let feature = keys_tile[(t * dim + offset + d) as usize];
                #[unroll]
                for r in 0..per_unit {
                    acc[(r * part_len + d) as usize] += dots[r as usize] * feature;
                }
            }
        }
        sync_cube();
        j0 += tile;
    }

    #[unroll]
    for r in 0..per_unit {
        let i = own_first + r;
        if i < band.queries {
            let at = (head * band.queries + i) as usize * dim as usize + offset as usize;
            #[unroll]
            for d in 0..part_len {
                dq[at + d as usize] = F::cast_from(acc[(r * part_len + d) as usize] * band.scale);
            }
            if part == 0 {
                delta[(head * band.queries + i) as usize] = own_delta[r as usize];
            }
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

/// Backward, keys' side: `dk` and `dv`. One cube per `rows` keys of a head, `per_unit` keys
/// to each group of `split` units; it visits the queries whose ranges reach its keys
/// (ranges are monotone in the query, so these form one stretch, found by bisection).
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
    let per_unit = comptime![layout.per_unit];
    let dim = comptime![layout.dim_head];
    let tile = comptime![layout.tile];
    let (head, first) = cube_rows(layout.rows, band.keys);
    if head >= band.batch_heads {
        terminate!();
    }
    let unit = UNIT_POS;
    let part = unit % split;
    let own_first = first + (unit / split) * per_unit;
    let last = u32::min(first + layout.rows, band.keys) - 1;
    let start = first_query_after(first, &band, layout.causal, layout.exact);
    let end = queries_starting_by(last, &band, layout.causal, layout.exact);
    let offset = part * part_len;

    let mut own_k = Array::<f32>::new((per_unit * part_len) as usize);
    let mut own_v = Array::<f32>::new((per_unit * part_len) as usize);
    let mut acc_k = Array::<f32>::new((per_unit * part_len) as usize);
    let mut acc_v = Array::<f32>::new((per_unit * part_len) as usize);
    let mut own_kept = Array::<u32>::new(per_unit as usize);
    let mut dots = Array::<f32>::new(per_unit as usize);
    let mut grad_dots = Array::<f32>::new(per_unit as usize);
    #[unroll]
    for r in 0..per_unit {
        let j = own_first + r;
        let key = u32::min(j, band.keys - 1);
        own_kept[r as usize] =
            u32::cast_from(key_kept::<M>(mask, head, j, band.keys, layout.masked));
        let at = (head * band.keys + key) as usize * dim as usize + offset as usize;
        #[unroll]
        for d in 0..part_len {
            own_k[(r * part_len + d) as usize] = f32::cast_from(k[at + d as usize]);
            own_v[(r * part_len + d) as usize] = f32::cast_from(v[at + d as usize]);
            acc_k[(r * part_len + d) as usize] = 0.0;
            acc_v[(r * part_len + d) as usize] = 0.0;
        }
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
        let mut slot = unit;
        while slot < tile {
            let i = i0 + slot;
            let query = u32::min(i, band.queries - 1);
            let (lo, hi) = key_range(query, &band, layout.causal, layout.exact);
            let at = (head * band.queries + query) as usize;
            lse_tile[slot as usize] = lse[at];
            delta_tile[slot as usize] = delta[at];
            lo_tile[slot as usize] = lo;
            // Queries past the end see nothing.
            hi_tile[slot as usize] = select(i < band.queries, hi, 0u32);
            slot += CUBE_DIM;
        }
        sync_cube();
        for t in 0..tile {
            #[unroll]
            for r in 0..per_unit {
                dots[r as usize] = 0.0;
                grad_dots[r as usize] = 0.0;
            }
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                let query_feature = queries_tile[at];
                let grad_feature = grads_tile[at];
                #[unroll]
                for r in 0..per_unit {
                    dots[r as usize] += query_feature * own_k[(r * part_len + d) as usize];
                    grad_dots[r as usize] += grad_feature * own_v[(r * part_len + d) as usize];
                }
            }
            let lo = lo_tile[t as usize];
            let hi = hi_tile[t as usize];
            let query_lse = lse_tile[t as usize];
            let query_delta = delta_tile[t as usize];
            #[unroll]
            for r in 0..per_unit {
                let j = own_first + r;
                let dot = row_sum(dots[r as usize], split);
                let grad_dot = row_sum(grad_dots[r as usize], split);
                let seen = own_kept[r as usize] == 1u32 && j >= lo && j < hi;
                let p = select(seen, f32::exp(dot - query_lse), 0.0);
                dots[r as usize] = p;
                grad_dots[r as usize] = p * (grad_dot - query_delta);
            }
            #[unroll]
            for d in 0..part_len {
                let at = (t * dim + offset + d) as usize;
                let query_feature = queries_tile[at];
                let grad_feature = grads_tile[at];
                #[unroll]
                for r in 0..per_unit {
                    acc_v[(r * part_len + d) as usize] += dots[r as usize] * grad_feature;
                    acc_k[(r * part_len + d) as usize] += grad_dots[r as usize] * query_feature;
                }
            }
        }
        sync_cube();
        i0 += tile;
    }

    #[unroll]
    for r in 0..per_unit {
        let j = own_first + r;
        if j < band.keys {
            let at = (head * band.keys + j) as usize * dim as usize + offset as usize;
            #[unroll]
            for d in 0..part_len {
                dk[at + d as usize] = F::cast_from(acc_k[(r * part_len + d) as usize]);
                dv[at + d as usize] = F::cast_from(acc_v[(r * part_len + d) as usize]);
            }
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
    /// How rows map onto units.
    pub tuning: AttentionTuning,
}

/// How the kernels spread rows over units. The default (32 features of a row per unit,
/// 64 rows per cube, one row per group of units) was within 10 % of the fastest of ten
/// layouts on the local band on an H200, where more rows per group (fewer reads of shared
/// memory per product, more shuffles and registers) won only in some cases; see
/// [`AttentionTuning::for_band`] for whole attention (`colt5 bench attention --layouts …`
/// times them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionTuning {
    /// Features of a row each unit holds (a row's units are rounded to a power of two).
    pub features_per_unit: usize,
    /// Rows (queries, or keys for dk/dv) of a cube.
    pub rows_per_cube: usize,
    /// Queries each group of units holds in the forward: every key feature read from
    /// shared memory serves that many products.
    pub forward_rows_per_unit: u32,
    /// Queries (dq) or keys (dk, dv) each group holds in the backward.
    pub backward_rows_per_unit: u32,
}

impl AttentionTuning {
    /// The measured layout for `band` over `keys` keys: [`Default`] for local bands; for
    /// whole attention (one window holding every key), cubes of 128 queries, two to a group
    /// in the forward, which ran its forward 1.33× and its backward 1.14× faster on an H200
    /// at 16 384 tokens and lost on the local band.
    pub fn for_band(band: &Band, keys: usize) -> Self {
        let whole = band.window >= keys && band.look_backward == 0 && band.look_forward == 0;
        if whole {
            AttentionTuning {
                rows_per_cube: 128,
                forward_rows_per_unit: 2,
                ..Default::default()
            }
        } else {
            Default::default()
        }
    }
}

impl Default for AttentionTuning {
    fn default() -> Self {
        AttentionTuning {
            features_per_unit: 32,
            rows_per_cube: 64,
            forward_rows_per_unit: 1,
            backward_rows_per_unit: 1,
        }
    }
}

/// The largest `dim_head` the kernels take.
pub const MAX_DIM_HEAD: usize = 256;

/// A checked launch: layout, grid and arguments.
struct AttentionLaunch<R: Runtime> {
    /// The layout, with `per_unit` set by each kernel's launch.
    layout: AttentionLayout,
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
        let hardware = &client.properties().hardware;
        // A row's units must lie in one plane.
        let tuning = inputs.tuning;
        let split = dim_head
            .div_ceil(tuning.features_per_unit.max(1))
            .next_power_of_two();
        if split > 16 || split > hardware.plane_size_min as usize {
            return Err(LaunchError::Attention(inputs.shape));
        }
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
        let max_units = hardware.max_units_per_cube as usize;
        // A multiple of every kernel's rows per unit, so that no group reaches past its cube.
        let per_unit = tuning
            .forward_rows_per_unit
            .max(tuning.backward_rows_per_unit)
            .max(1) as usize;
        let rows = (max_units / split).min(tuning.rows_per_cube) / per_unit * per_unit;
        if rows == 0 || tuning.forward_rows_per_unit == 0 || tuning.backward_rows_per_unit == 0 {
            return Err(LaunchError::Attention(inputs.shape));
        }
        // Two tiles of f32 features and four words per tile row must fit shared memory.
        let tile = [32usize, 16, 8]
            .into_iter()
            .find(|&tile| 4 * tile * (2 * dim_head + 4) <= hardware.max_shared_memory_size)
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
                per_unit: 1,
                tile: tile as u32,
                masked: inputs.mask.is_some(),
                causal: inputs.band.causal_offset.is_some(),
                exact: inputs.band.exact,
            },
            mask,
            runtime: std::marker::PhantomData,
        })
    }

    /// The layout with `per_unit` rows to each group of units, and the units of a cube.
    fn layout(&self, per_unit: u32) -> (AttentionLayout, CubeDim) {
        let layout = AttentionLayout {
            per_unit,
            ..self.layout
        };
        let units = layout.rows.div_ceil(per_unit) * layout.split;
        (layout, CubeDim::new_1d(units))
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
    let (layout, units) = launch.layout(inputs.tuning.forward_rows_per_unit);
    unsafe {
        attention_forward_rows::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, queries),
            units,
            ArrayArg::from_raw_parts(inputs.q.clone(), q_len),
            ArrayArg::from_raw_parts(inputs.k.clone(), kv_len),
            ArrayArg::from_raw_parts(inputs.v.clone(), kv_len),
            launch.mask(),
            ArrayArg::from_raw_parts(out.clone(), q_len),
            ArrayArg::from_raw_parts(lse.clone(), batch_heads * queries),
            launch.band(inputs),
            layout,
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
    let (layout, units) = launch.layout(inputs.tuning.backward_rows_per_unit);
    unsafe {
        let array = |handle: &Handle, len| ArrayArg::from_raw_parts(handle.clone(), len);
        attention_backward_queries::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, queries),
            units,
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
            layout,
        );
        attention_backward_keys::launch_unchecked::<F, M, R>(
            client,
            launch.cubes(inputs, keys),
            units,
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
            layout,
        );
    }
    Ok((dq, dk, dv))
}
