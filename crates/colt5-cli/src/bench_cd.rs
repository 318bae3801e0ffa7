//! `colt5 bench cd`: the fused coordinate-descent kernels on the GPU, timed as the
//! reference's `bench_coor_descent.py` times its Triton kernel.

use anyhow::{bail, Result};

/// Arguments of `colt5 bench cd`.
#[derive(clap::Args, Debug)]
pub struct CdArgs {
    /// Shapes `ROWSxCOLS`.
    #[arg(long, num_args = 1.., default_values = ["16x16384", "64x32768", "8192x2048", "32768x1024"])]
    shapes: Vec<String>,
    /// Iteration counts.
    #[arg(long, num_args = 1.., default_values_t = [20, 50])]
    iters: Vec<usize>,
    /// Element types of the scores.
    #[arg(long, value_enum, num_args = 1.., default_values = ["f32", "bf16"])]
    dtypes: Vec<Dtype>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 25)]
    runs: usize,
    /// Also time the converged solver's kernel (eps 0.03, tolerance 1e-6, at most 100
    /// passes) on the same shapes, in a second table: its forward alone (its gradient is
    /// portable tensor code).
    #[arg(long)]
    converged: bool,
}

/// Storage type of the scores (arithmetic is f32).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

fn parse_shape(text: &str) -> Result<(usize, usize)> {
    let parsed = text
        .split_once('x')
        .and_then(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)));
    match parsed {
        Some((rows, cols)) if rows > 0 && cols > 0 => Ok((rows, cols)),
        _ => bail!("invalid shape {text:?}: expected ROWSxCOLS with both at least 1"),
    }
}

/// Runs `colt5 bench cd` on the runtime this build has.
pub fn run(args: &CdArgs) -> Result<()> {
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    gpu::run(args, &shapes)
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
mod gpu {
    pub fn run(_args: &super::CdArgs, _shapes: &[(usize, usize)]) -> anyhow::Result<()> {
        anyhow::bail!(
            "`colt5 bench cd` times the GPU kernels: rebuild with `--features cuda` (or `wgpu`)"
        )
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu {
    use std::time::Instant;

    use anyhow::{Context, Result};
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};
    use colt5::coor_descent::{coor_descent, CoorDescentConfig, Solver};
    use colt5_kernels::{Convergence, Inputs, Rows, Schedule};
    use cubecl::prelude::*;
    use cubecl::server::Handle;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::{CdArgs, Dtype};

    #[cfg(feature = "cuda")]
    type Gpu = cubecl::cuda::CudaRuntime;
    #[cfg(not(feature = "cuda"))]
    type Gpu = cubecl::wgpu::WgpuRuntime;

    /// The router's schedule: eps 0.03 from 4, decaying by 0.7.
    fn router_config(iters: usize) -> CoorDescentConfig {
        CoorDescentConfig::iterations(iters, 0.03, Some(4.0), 0.7)
    }

    /// The converged solver timed by `--converged`.
    const CONVERGENCE: Convergence = Convergence {
        eps: 0.03,
        tolerance: 1e-6,
        max_passes: 100,
    };

    fn converged_config() -> CoorDescentConfig {
        CoorDescentConfig::new()
            .with_eps(CONVERGENCE.eps as f64)
            .with_solver(Solver::Converged {
                tolerance: CONVERGENCE.tolerance as f64,
                max_passes: CONVERGENCE.max_passes as usize,
            })
    }

    fn schedule(iters: usize) -> Schedule {
        let temperatures = router_config(iters).temperatures();
        Schedule::from_temperatures(&temperatures.expect("an iterative solver"))
    }

    fn sync(client: &ComputeClient<Gpu>) -> Result<()> {
        cubecl::future::block_on(client.sync())
            .map_err(|e| anyhow::anyhow!("device synchronisation failed: {e:?}"))
    }

    /// Calls timed together between two device synchronisations; their mean is one run, so
    /// the cost of a synchronisation (measured at 0.1 to 0.2 ms on an H100, memory
    /// bookkeeping included) is not charged to a call: the figure is a call's time in a
    /// stream of calls, as a model's layers issue them.
    const CALLS_PER_RUN: usize = 50;

    /// Median milliseconds per call of `work` over `runs` runs after a warm-up.
    fn median_ms(
        client: &ComputeClient<Gpu>,
        runs: usize,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..3 {
            work()?;
        }
        sync(client)?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            for _ in 0..CALLS_PER_RUN {
                work()?;
            }
            sync(client)?;
            times.push(started.elapsed().as_secs_f64() * 1e3 / CALLS_PER_RUN as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[runs / 2])
    }

    fn bytes_in_use(client: &ComputeClient<Gpu>) -> Result<u64> {
        sync(client)?;
        Ok(client
            .memory_usage()
            .map_err(|e| anyhow::anyhow!("memory usage: {e:?}"))?
            .bytes_in_use)
    }

    fn upload<F: CubeElement + Float>(client: &ComputeClient<Gpu>, values: &[f32]) -> Handle {
        let converted: Vec<F> = values.iter().map(|&v| F::new(v)).collect();
        client.create_from_slice(F::as_bytes(&converted))
    }

    pub fn run(args: &CdArgs, shapes: &[(usize, usize)]) -> Result<()> {
        #[cfg(feature = "cuda")]
        crate::backend::configure_kernel_caches();
        let device = Default::default();
        let client = Gpu::client(&device);
        println!(
            "| rows x cols | dtype | iters | fwd ms | fwd+bwd ms | extra MiB (fwd+bwd) | saved for bwd MiB | elements/s (fwd) | error out / grad |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for &iters in &args.iters {
            for &(rows, cols) in shapes {
                for &dtype in &args.dtypes {
                    let line = match dtype {
                        Dtype::F32 => measure::<f32>(&client, args, rows, cols, iters),
                        Dtype::F16 => measure::<half::f16>(&client, args, rows, cols, iters),
                        Dtype::Bf16 => measure::<half::bf16>(&client, args, rows, cols, iters),
                    }
                    .with_context(|| format!("{rows}x{cols} {dtype:?} {iters} iterations"))?;
                    println!(
                        "| {rows}x{cols} | {} | {iters} | {line} |",
                        format!("{dtype:?}").to_lowercase()
                    );
                }
            }
        }
        if args.converged {
            println!();
            println!("| rows x cols | dtype | passes (most of any row) | fwd ms | error out |");
            println!("|---|---|---|---|---|");
            for &(rows, cols) in shapes {
                for &dtype in &args.dtypes {
                    let line = match dtype {
                        Dtype::F32 => measure_converged::<f32>(&client, args, rows, cols),
                        Dtype::F16 => measure_converged::<half::f16>(&client, args, rows, cols),
                        Dtype::Bf16 => measure_converged::<half::bf16>(&client, args, rows, cols),
                    }
                    .with_context(|| format!("{rows}x{cols} {dtype:?} converged"))?;
                    println!(
                        "| {rows}x{cols} | {} | {line} |",
                        format!("{dtype:?}").to_lowercase()
                    );
                }
            }
        }
        Ok(())
    }

    /// Rows of each shape checked against the f64 CPU implementation.
    const CHECKED_ROWS: usize = 4;

    /// Errors of a kernel's output and (given the output gradient `g` and the kernel's score
    /// gradient) score gradient, max |a − b| / max |b| on the first [`CHECKED_ROWS`] rows,
    /// against the f64 CPU implementation of `config` given the same inputs rounded to `F`:
    /// what remains is the kernels' arithmetic and the rounding of their results to `F`.
    fn errors<F: CubeElement + Float>(
        client: &ComputeClient<Gpu>,
        (scores, output): (&[f32], Handle),
        gradient: Option<(&[f32], Handle)>,
        cols: usize,
        config: &CoorDescentConfig,
    ) -> Result<(f64, Option<f64>)>
    where
        f32: From<F>,
    {
        type Cpu = Autodiff<NdArray<f64>>;
        let rows = (scores.len() / cols).min(CHECKED_ROWS);
        let round = |values: &[f32]| -> Vec<f64> {
            values[..rows * cols]
                .iter()
                .map(|&v| f32::from(F::new(v)) as f64)
                .collect()
        };
        let read = |handle: Handle| -> Result<Vec<f64>> {
            let bytes = client
                .read_one(handle)
                .map_err(|e| anyhow::anyhow!("reading a result back: {e:?}"))?;
            Ok(F::from_bytes(&bytes)[..rows * cols]
                .iter()
                .map(|&v| f32::from(v) as f64)
                .collect())
        };
        let device = Default::default();
        let tensor =
            |values| Tensor::<Cpu, 2>::from_data(TensorData::new(values, [rows, cols]), &device);
        let scores = tensor(round(scores)).require_grad();
        let k = f32::from(F::new(cols as f32 / 8.0)) as f64;
        let y = coor_descent(scores.clone(), k, None, config)?;
        let values = |t: Tensor<NdArray<f64>, 2>| t.into_data().to_vec::<f64>().expect("f64 data");
        let output_error = relative_error(&read(output)?, &values(y.clone().inner()));
        let gradient_error = match gradient {
            Some((grad, d_scores)) => {
                let grads = (y * tensor(round(grad))).sum().backward();
                let expected = values(scores.grad(&grads).context("no gradient for the scores")?);
                Some(relative_error(&read(d_scores)?, &expected))
            }
            None => None,
        };
        Ok((output_error, gradient_error))
    }

    /// max |a − b| / max |b|.
    fn relative_error(a: &[f64], b: &[f64]) -> f64 {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        diff / b.iter().map(|y| y.abs()).fold(f64::MIN_POSITIVE, f64::max)
    }

    /// The scores (3·randn) and an output gradient (randn) of a shape, the same every run.
    fn random_inputs(rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut normal = |scale: f32| -> Vec<f32> {
            use rand::Rng;
            (0..rows * cols)
                .map(|_| {
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                    scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        };
        let scores = normal(3.0);
        (scores, normal(1.0))
    }

    fn measure<F: CubeElement + Float>(
        client: &ComputeClient<Gpu>,
        args: &CdArgs,
        rows: usize,
        cols: usize,
        iters: usize,
    ) -> Result<String>
    where
        f32: From<F>,
    {
        let (scores_host, grad_host) = random_inputs(rows, cols);
        let scores = upload::<F>(client, &scores_host);
        let grad = upload::<F>(client, &grad_host);
        let k = upload::<F>(client, &vec![cols as f32 / 8.0; rows]);
        let schedule = schedule(iters);
        let inputs = Inputs {
            scores: &scores,
            k: &k,
            mask: None,
            shape: Rows { rows, n: cols },
        };
        let forward = || colt5_kernels::forward::<Gpu, F, u8>(client, &inputs, &schedule);
        let forward_ms = median_ms(client, args.runs, || {
            forward()?;
            Ok(())
        })?;
        let both_ms = median_ms(client, args.runs, || {
            let (_, thresholds) = forward()?;
            colt5_kernels::backward::<Gpu, F, u8>(client, &inputs, &schedule, &thresholds, &grad)?;
            Ok(())
        })?;
        // Everything the two launches allocate, held at once: output, thresholds, both
        // gradients and the schedule copies.
        let before = bytes_in_use(client)?;
        let (output, thresholds) = forward()?;
        let gradients =
            colt5_kernels::backward::<Gpu, F, u8>(client, &inputs, &schedule, &thresholds, &grad)?;
        let extra = bytes_in_use(client)?.saturating_sub(before);
        let (output_error, gradient_error) = errors::<F>(
            client,
            (&scores_host, output),
            Some((&grad_host, gradients.0)),
            cols,
            &router_config(iters),
        )?;
        drop(thresholds);
        let mib = |bytes: f64| bytes / (1 << 20) as f64;
        Ok(format!(
            "{forward_ms:.3} | {both_ms:.3} | {:.1} | {:.2} | {:.2e} | {output_error:.1e} / {:.1e}",
            mib(extra as f64),
            mib((rows * iters * 4) as f64),
            (rows * cols * iters) as f64 / (forward_ms * 1e-3),
            gradient_error.unwrap_or(f64::NAN),
        ))
    }

    /// The converged solver's kernel on one shape: the most passes any row took, the median
    /// milliseconds per call and the output's error.
    fn measure_converged<F: CubeElement + Float>(
        client: &ComputeClient<Gpu>,
        args: &CdArgs,
        rows: usize,
        cols: usize,
    ) -> Result<String>
    where
        f32: From<F>,
    {
        let (scores_host, _) = random_inputs(rows, cols);
        let scores = upload::<F>(client, &scores_host);
        let k = upload::<F>(client, &vec![cols as f32 / 8.0; rows]);
        let inputs = Inputs {
            scores: &scores,
            k: &k,
            mask: None,
            shape: Rows { rows, n: cols },
        };
        let solve = || colt5_kernels::converged::<Gpu, F, u8>(client, &inputs, CONVERGENCE);
        let ms = median_ms(client, args.runs, || {
            solve()?;
            Ok(())
        })?;
        let (output, _, passes) = solve()?;
        let passes = client
            .read_one(passes)
            .map_err(|e| anyhow::anyhow!("reading the passes back: {e:?}"))?;
        let most = u32::from_bytes(&passes).iter().copied().max().unwrap_or(0);
        let (output_error, _) = errors::<F>(
            client,
            (&scores_host, output),
            None,
            cols,
            &converged_config(),
        )?;
        Ok(format!("{most} | {ms:.3} | {output_error:.1e}"))
    }
}
