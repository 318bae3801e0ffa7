//! `colt5 demo`: the router's soft top-k on random scores, on CPU.

use std::process::ExitCode;
use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use clap::Args;
use colt5::coor_descent::{coor_descent_with_stats, CoorDescentConfig, Solver};

type Cpu = NdArray<f32>;

/// Arguments of `colt5 demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Sequences in the batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens to route per sequence (the coordinate descent targets 9/8 of this, as the
    /// router's `fetch_k_ratio`).
    #[arg(long, default_value_t = 512)]
    route: usize,
    /// Random seed of the scores.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Solves one batch of router scores with the reference schedule and with the converged
/// solver, and prints how each meets k and how its hard top-k compares with the scores'.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.batch > 0 && args.tokens > 0,
        "--batch and --tokens must be positive"
    );
    anyhow::ensure!(
        args.route > 0 && args.route <= args.tokens,
        "--route must be between 1 and --tokens ({})",
        args.tokens
    );
    let device = Default::default();
    Cpu::seed(&device, args.seed);
    let scores = Tensor::<Cpu, 2>::random(
        [args.batch, args.tokens],
        Distribution::Normal(0.0, 3.0),
        &device,
    );
    let k = (args.route as f64 * 9.0 / 8.0).min(args.tokens as f64);
    println!(
        "routing {} of {} tokens in {} sequences: soft top-k with k = {k}, scores ~ 3·N(0, 1)",
        args.route, args.tokens, args.batch
    );
    let hard = scores.clone().topk_with_indices(args.route, 1).1;
    let solvers = [
        (
            "reference schedule (20 iterations, eps 0.03 from 4, decay 0.7)",
            CoorDescentConfig::iterations(20, 0.03, Some(4.0), 0.7),
        ),
        (
            "converged solver (eps 0.03)",
            CoorDescentConfig::new()
                .with_eps(0.03)
                .with_solver(Solver::converged()),
        ),
    ];
    for (name, config) in solvers {
        let start = Instant::now();
        let (y, stats) = coor_descent_with_stats(scores.clone(), k, None, &config)?;
        let sums: Vec<f32> = y
            .clone()
            .sum_dim(1)
            .into_data()
            .to_vec()
            .unwrap_or_default();
        let elapsed = start.elapsed();
        let worst = sums
            .iter()
            .fold(0.0f64, |m, &s| m.max((s as f64 - k).abs() / k));
        let routed = y.topk_with_indices(args.route, 1).1;
        let agreement = overlap(&routed, &hard);
        println!("{name}:");
        println!(
            "  {} passes, {:.1} ms; row sums {:?}; worst |Σy − k|/k = {worst:.2e}",
            stats.passes,
            elapsed.as_secs_f64() * 1e3,
            sums.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>()
        );
        println!(
            "  its top-{} agrees with the scores' hard top-{}: {:.2}% (entries tied at y = 1 come in arbitrary order)",
            args.route,
            args.route,
            agreement * 100.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The fraction of selected indices the two selections share, over all rows.
fn overlap(a: &Tensor<Cpu, 2, burn::tensor::Int>, b: &Tensor<Cpu, 2, burn::tensor::Int>) -> f64 {
    let [rows, count] = a.dims();
    let a: Vec<i64> = a.to_data().convert::<i64>().to_vec().unwrap_or_default();
    let b: Vec<i64> = b.to_data().convert::<i64>().to_vec().unwrap_or_default();
    let shared: usize = a
        .chunks(count)
        .zip(b.chunks(count))
        .map(|(ra, rb)| ra.iter().filter(|i| rb.contains(i)).count())
        .sum();
    shared as f64 / (rows * count) as f64
}
