//! `colt5 bench generate`: decoding speed of the language models, to set beside the
//! reference's `bench_generate.py`.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use colt5::coor_descent::CoorDescentBackend;
use colt5::lm::{generate_batch, LanguageModel, SamplerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{run_on, BackendKind, Job};
use crate::bench::LmBench;
use crate::model::Lm;

/// Arguments of `colt5 bench generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Configurations to time (random weights: speed only).
    #[arg(long, value_enum, num_args = 1.., default_values = ["small", "small-cd", "recipe-cd", "small-colt5"])]
    configs: Vec<LmBench>,
    /// Prompt lengths (random tokens), one row each.
    #[arg(long, num_args = 1.., default_values_t = [1, 256])]
    prompt_len: Vec<usize>,
    /// Batch sizes (rows decoded together), one row of the table each.
    #[arg(long, num_args = 1.., default_values_t = [1, 8])]
    batch: Vec<usize>,
    /// Tokens generated per row.
    #[arg(long, default_value_t = 512)]
    length: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// Runs `colt5 bench generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    anyhow::ensure!(args.length > 0, "--length must be at least 1");
    anyhow::ensure!(
        args.prompt_len.iter().all(|&p| p > 0),
        "--prompt-len must be at least 1"
    );
    anyhow::ensure!(
        args.batch.iter().all(|&b| b > 0),
        "--batch must be at least 1"
    );
    run_on(args.backend, GenerateJob(args))
}

struct GenerateJob<'a>(&'a GenerateArgs);

impl Job for GenerateJob<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend,
    {
        let args = self.0;
        println!(
            "| config | seq_len | batch | prompt | new tokens per row | warm-up run s | first token ms | per-step ms (median) | per-step ms (p99) | tokens/s (all rows) | {:?} |",
            args.backend
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for &bench in &args.configs {
            let config = bench.config();
            B::seed(device, 0);
            let model: Lm<B> = config.init(device).context("benchmark model")?;
            let model = model.valid();
            for (&batch, &prompt_len) in args
                .batch
                .iter()
                .flat_map(|b| args.prompt_len.iter().map(move |p| (b, p)))
            {
                let timing = time_generation(&model, batch, prompt_len, args.length)?;
                let mut sorted = timing.per_token_ms.clone();
                sorted.sort_by(f64::total_cmp);
                let quantile = |q: f64| {
                    sorted
                        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                        .copied()
                        .unwrap_or(f64::NAN)
                };
                println!(
                    "| {} | {} | {batch} | {prompt_len} | {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.1} | |",
                    clap::ValueEnum::to_possible_value(&bench)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default(),
                    model.seq_len(),
                    args.length,
                    timing.warm_up_s,
                    timing.first_ms,
                    quantile(0.5),
                    quantile(0.99),
                    (batch * args.length) as f64 / timing.total_s,
                );
            }
        }
        Ok(())
    }
}

/// Times of one generation: the warm-up run before it (the same generation, compiling
/// kernels on a GPU), the first step (the prompts' forward pass and a draw), each later
/// step, and the whole.
struct Timing {
    warm_up_s: f64,
    first_ms: f64,
    per_token_ms: Vec<f64>,
    total_s: f64,
}

/// Generates `length` tokens after `batch` random prompts of `prompt_len` tokens, timing
/// each step. The step's tokens are read back to the host before the next, so the times
/// include the device's work.
fn time_generation<B: CoorDescentBackend>(
    model: &Lm<B>,
    batch: usize,
    prompt_len: usize,
    length: usize,
) -> Result<Timing> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<i64>> = (0..batch)
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.random_range(0..model.num_tokens() as i64))
                .collect()
        })
        .collect();
    let samplers = |seed: u64| -> Result<Vec<_>> {
        (0..batch as u64)
            .map(|row| Ok(SamplerConfig::new().with_seed(seed + row).init()?))
            .collect()
    };
    // Warm-up over the same length: GPU kernels specialised to the key count (the soft
    // top-k's layout grows with the row) are compiled for every length the timed run meets.
    let warm_up = Instant::now();
    generate_batch(
        model.decoder().as_mut(),
        &prompts,
        length,
        &mut samplers(0)?,
        |_, _| (),
    )?;
    let warm_up_s = warm_up.elapsed().as_secs_f64();
    let mut decoder = model.decoder();
    let started = Instant::now();
    let mut last = started;
    let mut times = Vec::with_capacity(length);
    generate_batch(
        decoder.as_mut(),
        &prompts,
        length,
        &mut samplers(0)?,
        |row, _| {
            if row + 1 == batch {
                let now = Instant::now();
                times.push((now - last).as_secs_f64() * 1e3);
                last = now;
            }
        },
    )?;
    let total_s = started.elapsed().as_secs_f64();
    let first_ms = times.first().copied().unwrap_or(f64::NAN);
    Ok(Timing {
        warm_up_s,
        first_ms,
        per_token_ms: times.into_iter().skip(1).collect(),
        total_s,
    })
}
