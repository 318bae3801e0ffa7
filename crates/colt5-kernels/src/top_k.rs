//! Top-k selection on the device: the positions of the k largest entries of every row, in
//! descending order of value, one cube per row.
//!
//! A row's values map to unsigned keys of the same order (the float's bits with the sign
//! folded in), and a radix select over the keys' four bytes, most significant first, finds
//! the k-th largest key T: each pass counts the entries that match the bytes found so far in
//! a 256-bin histogram in shared memory and keeps the bin where the count from the top
//! reaches k. The entries above T and the first ones equal to T (in position order) are then
//! gathered into shared memory, each unit its own contiguous stretch of the row, at offsets
//! from prefix sums of the units' counts, and each selected entry's rank among them (larger
//! value first, lower position first among equal values) is where its position is written.
//! The row is read five times and nothing but the output is written: no sort, no host
//! round trip.

use cubecl::prelude::*;

use crate::kernels::cube_index;

/// Bins of one radix pass (one byte of the key).
const BINS: usize = 256;

/// The unsigned key of `value`: larger floats give larger keys (negative floats have their
/// bits inverted, non-negative ones their sign bit set).
#[cube]
fn ordered_key<F: Float>(value: F) -> u32 {
    let bits = u32::reinterpret(f32::cast_from(value));
    if bits >= 0x8000_0000u32 {
        !bits
    } else {
        bits | 0x8000_0000u32
    }
}

/// Exclusive prefix sum of `values[0..count]` in place, by unit 0; returns nothing, the
/// cube synchronises after.
#[cube]
fn exclusive_scan(values: &mut SharedMemory<u32>, count: usize) {
    if UNIT_POS == 0 {
        let mut total = 0u32;
        for i in 0usize..count {
            let value = values[i];
            values[i] = total;
            total += value;
        }
    }
    sync_cube();
}

/// Writes to `indices[row · k ..][..k]` the positions of the `k` largest of the `n` values
/// of each row (`values` row-major, one cube per row), largest first, the lower position
/// first among equal values. Unit u takes entries `[u · stretch, (u + 1) · stretch)` of
/// the row for the gathering (`stretch · units ≥ n`). `capacity` ≥ k bounds the selection
/// kept in shared memory; the cube has at most `max_units` units.
#[cube(launch_unchecked)]
pub fn top_k_rows<F: Float, I: Int>(
    values: &Array<F>,
    indices: &mut Array<I>,
    rows: u32,
    n: u32,
    k: u32,
    stretch: u32,
    #[comptime] capacity: u32,
    #[comptime] max_units: u32,
) {
    let row = cube_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = n as usize;
    let k = k as usize;
    let units = CUBE_DIM_X as usize;
    let unit = UNIT_POS_X as usize;
    let base = row * n;

    // Radix select of the k-th largest key, a byte per pass.
    let histogram = SharedMemory::<Atomic<u32>>::new(BINS);
    let mut found = SharedMemory::<u32>::new(2usize);
    let mut prefix = 0u32;
    let mut remaining = k as u32;
    for pass in 0..4u32 {
        let shift = 24u32 - 8u32 * pass;
        // The bytes found so far, above this pass's byte.
        let mut matched = 0u32;
        if pass > 0 {
            matched = u32::MAX << (shift + 8u32);
        }
        let mut bin = unit;
        while bin < BINS {
            histogram[bin].store(0u32);
            bin += units;
        }
        sync_cube();
        let mut i = unit;
        while i < n {
            let key = ordered_key::<F>(values[base + i]);
            if key & matched == prefix {
                histogram[((key >> shift) & 255u32) as usize].fetch_add(1u32);
            }
            i += units;
        }
        sync_cube();
        if unit == 0usize {
            // The bin in which the count from the top reaches `remaining`.
            let mut above = 0u32;
            let mut chosen = 0u32;
            let mut searching = true;
            let mut from_top = 0usize;
            while searching && from_top < BINS {
                let b = BINS - 1usize - from_top;
                let count = histogram[b].load();
                if above + count >= remaining {
                    chosen = b as u32;
                    searching = false;
                } else {
                    above += count;
                }
                from_top += 1usize;
            }
            found[0usize] = prefix | (chosen << shift);
            found[1usize] = remaining - above;
        }
        sync_cube();
        prefix = found[0usize];
        remaining = found[1usize];
        sync_cube();
    }
    let threshold = prefix;
    // Entries above the threshold (k − remaining of them) come first, then `remaining`
    // entries equal to it, the first ones in position order.
    let above_count = k as u32 - remaining;

    // Each unit's contiguous stretch of the row and its counts of entries above and at the
    // threshold.
    let stretch = stretch as usize;
    let mut start = unit * stretch;
    if start > n {
        start = n;
    }
    let mut end = start + stretch;
    if end > n {
        end = n;
    }
    let mut above_offsets = SharedMemory::<u32>::new(comptime![max_units as usize]);
    let mut tie_offsets = SharedMemory::<u32>::new(comptime![max_units as usize]);
    let mut above = 0u32;
    let mut ties = 0u32;
    for i in start..end {
        let key = ordered_key::<F>(values[base + i]);
        if key > threshold {
            above += 1u32;
        } else if key == threshold {
            ties += 1u32;
        }
    }
    above_offsets[unit] = above;
    tie_offsets[unit] = ties;
    sync_cube();
    exclusive_scan(&mut above_offsets, units);
    exclusive_scan(&mut tie_offsets, units);

    let mut keys = SharedMemory::<u32>::new(comptime![capacity as usize]);
    let mut positions = SharedMemory::<u32>::new(comptime![capacity as usize]);
    let mut slot_above = above_offsets[unit];
    let mut tie = tie_offsets[unit];
    for i in start..end {
        let key = ordered_key::<F>(values[base + i]);
        if key > threshold {
            keys[slot_above as usize] = key;
            positions[slot_above as usize] = i as u32;
            slot_above += 1u32;
        } else if key == threshold {
            if tie < remaining {
                let slot = (above_count + tie) as usize;
                keys[slot] = key;
                positions[slot] = i as u32;
            }
            tie += 1u32;
        }
    }
    sync_cube();

    // Rank of each selected entry: larger key first, lower position first among equal keys.
    let mut j = unit;
    while j < k {
        let key = keys[j];
        let position = positions[j];
        let mut rank = 0usize;
        for m in 0usize..k {
            let other = keys[m];
            if other > key || (other == key && positions[m] < position) {
                rank += 1usize;
            }
        }
        indices[row * k + rank] = I::cast_from(position);
        j += units;
    }
}
