//! Row-wise work split across the CPU's cores.

/// Splits `rows` rows across threads: `work(first_row, outputs...)` fills each chunk of
/// both outputs (`per_row` entries a row each). Calls whose `cost` (entries touched) is
/// below 2¹⁵ run on the calling thread. Each row is computed by one thread alone, so the
/// results do not depend on the number of threads.
pub(crate) fn parallel_rows<T: Send, U: Send, F>(
    rows: usize,
    per_row: [usize; 2],
    outputs: (&mut [T], &mut [U]),
    cost: usize,
    work: F,
) where
    F: Fn(usize, &mut [T], &mut [U]) + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let threads = if cost < 1 << 15 {
        1
    } else {
        threads.min(rows).max(1)
    };
    let chunk = rows.div_ceil(threads).max(1);
    let (first, second) = outputs;
    std::thread::scope(|scope| {
        let pieces = first
            .chunks_mut(chunk * per_row[0])
            .zip(second.chunks_mut(chunk * per_row[1]));
        for (index, (a, b)) in pieces.enumerate() {
            let work = &work;
            scope.spawn(move || work(index * chunk, a, b));
        }
    });
}
