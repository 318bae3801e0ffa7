//! `colt5 bench attention`: the fused attention kernels on the GPU — whole attention and
//! the CoLT5 block's local band — forward and backward, for several layouts of rows on
//! units, to set beside PyTorch's SDPA (`bench_block.py`'s dense block).

use anyhow::{bail, Result};

/// Arguments of `colt5 bench attention`.
#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// Sequence lengths (8 heads of 64, batch 1).
    #[arg(long, num_args = 1.., default_values_t = [16384, 65536])]
    seqs: Vec<usize>,
    /// Layouts `FEATURES/ROWS/FORWARD/BACKWARD`: features of a row per unit, rows per
    /// cube, queries per group in the forward, rows per group in the backward (e.g.
    /// `16/64/4/2`), each after the layout the kernels choose for the band, whose outputs
    /// and gradients the others' are compared with.
    #[arg(long, num_args = 1..)]
    layouts: Vec<String>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Whole attention only up to this length (its cost grows as n²).
    #[arg(long, default_value_t = 16384)]
    max_whole: usize,
}

fn parse_layout(text: &str) -> Result<[usize; 4]> {
    let parts: Vec<usize> = text
        .split('/')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    match parts[..] {
        [f, r, a, b] if f > 0 && r > 0 && a > 0 && b > 0 => Ok([f, r, a, b]),
        _ => bail!("invalid layout {text:?}: expected FEATURES/ROWS/FORWARD/BACKWARD, all ≥ 1"),
    }
}

/// Runs `colt5 bench attention` on the runtime this build has.
pub fn run(args: &AttentionArgs) -> Result<()> {
    let layouts = args
        .layouts
        .iter()
        .map(|s| parse_layout(s))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    gpu::run(args, &layouts)
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
mod gpu {
    pub fn run(_args: &super::AttentionArgs, _layouts: &[[usize; 4]]) -> anyhow::Result<()> {
        anyhow::bail!(
            "`colt5 bench attention` times the GPU kernels: rebuild with `--features cuda` (or `wgpu`)"
        )
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu {
    use std::time::Instant;

    use anyhow::{anyhow, Result};
    use colt5_kernels::{AttentionInputs, AttentionShape, AttentionTuning, Band};
    use cubecl::prelude::*;
    use cubecl::server::Handle;

    use super::AttentionArgs;

    #[cfg(feature = "cuda")]
    type Gpu = cubecl::cuda::CudaRuntime;
    #[cfg(not(feature = "cuda"))]
    type Gpu = cubecl::wgpu::WgpuRuntime;

    const HEADS: usize = 8;
    const DIM_HEAD: usize = 64;

    fn sync(client: &ComputeClient<Gpu>) -> Result<()> {
        cubecl::future::block_on(client.sync())
            .map_err(|e| anyhow!("device synchronisation failed: {e:?}"))
    }

    /// Median milliseconds of `work` over `runs` runs after a warm-up call.
    fn median_ms(
        client: &ComputeClient<Gpu>,
        runs: usize,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        work()?;
        sync(client)?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            work()?;
            sync(client)?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[runs / 2])
    }

    /// Deterministic values in [-1, 1).
    fn upload(client: &ComputeClient<Gpu>, count: usize, seed: u32) -> Handle {
        let values: Vec<f32> = (0..count as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect();
        client.create_from_slice(f32::as_bytes(&values))
    }

    fn read(client: &ComputeClient<Gpu>, handle: &Handle) -> Result<Vec<f32>> {
        let bytes = client
            .read_one(handle.clone())
            .map_err(|e| anyhow!("reading back from the device: {e:?}"))?;
        Ok(f32::from_bytes(&bytes).to_vec())
    }

    pub fn run(args: &AttentionArgs, layouts: &[[usize; 4]]) -> Result<()> {
        #[cfg(feature = "cuda")]
        crate::backend::configure_kernel_caches();
        let device = Default::default();
        let client = Gpu::client(&device);
        let tunings: Vec<AttentionTuning> = layouts
            .iter()
            .map(|&[f, r, a, b]| AttentionTuning {
                features_per_unit: f,
                rows_per_cube: r,
                forward_rows_per_unit: a as u32,
                backward_rows_per_unit: b as u32,
            })
            .collect();
        println!("{HEADS} heads of {DIM_HEAD}, batch 1, f32");
        println!("| keys | seq | layout | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | max |Δ| vs chosen |");
        println!("|---|---|---|---|---|---|---|---|");
        for &seq in &args.seqs {
            // The CoLT5 block's light attention: windows of 64, one on either side, exact.
            let local = Band {
                window: 64,
                look_backward: 1,
                look_forward: 1,
                causal_offset: None,
                exact: true,
            };
            let mut bands = vec![("local band", local)];
            if seq <= args.max_whole {
                bands.push(("all", Band::full(seq, seq, None)));
            }
            let len = HEADS * seq * DIM_HEAD;
            let (q, k, v, g) = (
                upload(&client, len, 1),
                upload(&client, len, 2),
                upload(&client, len, 3),
                upload(&client, len, 4),
            );
            for (name, band) in bands {
                let pairs: usize = (0..seq)
                    .map(|i| {
                        let (lo, hi) = band.key_range(i, seq);
                        hi - lo
                    })
                    .sum();
                // Two products of 2·d flops per visible pair, per head; the backward's useful
                // work is five such products (2.5× the forward), as flash-attention
                // benchmarks count it (the kernels recompute two more).
                let forward_flops = (4 * HEADS * DIM_HEAD * pairs) as f64;
                let mut reference = None;
                let chosen = AttentionTuning::for_band(&band, seq);
                for &tuning in std::iter::once(&chosen).chain(&tunings) {
                    let inputs = AttentionInputs {
                        q: &q,
                        k: &k,
                        v: &v,
                        mask: None,
                        shape: AttentionShape {
                            batch_heads: HEADS,
                            queries: seq,
                            keys: seq,
                            dim_head: DIM_HEAD,
                        },
                        band,
                        scale: (DIM_HEAD as f64).powf(-0.5) as f32,
                        tuning,
                    };
                    let launch_error = |e| anyhow!("{e}");
                    let (out, lse) =
                        colt5_kernels::attention_forward::<Gpu, f32, u8>(&client, &inputs)
                            .map_err(launch_error)?;
                    let (dq, dk, dv) = colt5_kernels::attention_backward::<Gpu, f32, u8>(
                        &client, &inputs, &out, &lse, &g,
                    )
                    .map_err(launch_error)?;
                    // Every output, against the chosen layout's (the tests check that one
                    // against the CPU).
                    let results = [&out, &dq, &dk, &dv]
                        .into_iter()
                        .map(|handle| read(&client, handle))
                        .collect::<Result<Vec<_>>>()?;
                    let difference = match &reference {
                        None => {
                            reference = Some(results);
                            0.0
                        }
                        Some(expected) => results
                            .iter()
                            .zip(expected)
                            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                            .fold(0.0f32, f32::max),
                    };
                    let forward = median_ms(&client, args.runs, || {
                        colt5_kernels::attention_forward::<Gpu, f32, u8>(&client, &inputs)
                            .map(drop)
                            .map_err(launch_error)
                    })?;
                    let backward = median_ms(&client, args.runs, || {
                        colt5_kernels::attention_backward::<Gpu, f32, u8>(
                            &client, &inputs, &out, &lse, &g,
                        )
                        .map(drop)
                        .map_err(launch_error)
                    })?;
                    println!(
                        "| {name} | {seq} | {}/{}/{}/{} | {forward:.3} | {backward:.3} | {:.1} | {:.1} | {difference:.1e} |",
                        tuning.features_per_unit,
                        tuning.rows_per_cube,
                        tuning.forward_rows_per_unit,
                        tuning.backward_rows_per_unit,
                        forward_flops / forward / 1e9,
                        2.5 * forward_flops / backward / 1e9,
                    );
                }
            }
        }
        Ok(())
    }
}
