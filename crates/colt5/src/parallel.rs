//! Row-wise work split across the CPU's cores.

/// Splits `rows` rows across threads: `work(first_row, outputs)` fills one chunk of rows of
/// every output (`per_row[i]` entries a row in output i, at least 1). Calls whose `cost`
/// (entries touched) is below 2¹⁵ run on one thread. Each row is computed by one thread
/// alone, so the results do not depend on the number of threads.
pub(crate) fn parallel_rows<T: Send, const N: usize, F>(
    rows: usize,
    per_row: [usize; N],
    outputs: [&mut [T]; N],
    cost: usize,
    work: F,
) where
    F: Fn(usize, [&mut [T]; N]) + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let threads = if cost < 1 << 15 {
        1
    } else {
        threads.min(rows).max(1)
    };
    let chunk = rows.div_ceil(threads).max(1);
    let mut pieces: Vec<_> = outputs
        .into_iter()
        .zip(per_row)
        .map(|(output, per_row)| output.chunks_mut(chunk * per_row))
        .collect();
    std::thread::scope(|scope| {
        for index in 0..rows.div_ceil(chunk) {
            let chunks: [&mut [T]; N] =
                std::array::from_fn(|i| pieces[i].next().expect("one chunk per output"));
            let work = &work;
            scope.spawn(move || work(index * chunk, chunks));
        }
    });
}
