//! `colt5`: the command-line tool of the colt5 library.

mod backend;
mod bench;
mod bench_attention;
mod bench_block;
mod bench_cd;
mod bench_generate;
mod bench_matmul;
mod demo;
mod generate;
mod model;
mod parity;
mod plot;
mod signals;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Conditional computation for long sequences: the coordinate-descent soft top-k, CoLT5
/// routed layers and the coordinate-descent-attention language model.
#[derive(Parser, Debug)]
#[command(name = "colt5", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Route tokens with the coordinate-descent soft top-k on CPU and report how closely each
    /// solver meets its target count.
    Demo(demo::DemoArgs),
    /// Run every golden case file (PyTorch reference tensors) in a directory against colt5
    /// and report the differences.
    Parity(parity::ParityArgs),
    /// Train a byte-level language model on a text file (or the bundled corpus), with
    /// checkpoints, resumption, a metrics CSV and a loss plot.
    Train(train::TrainArgs),
    /// Generate text from a trained checkpoint.
    Generate(generate::GenerateArgs),
    /// Time training steps or kernels and print markdown tables.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Parity(args) => parity::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Generate(args) => generate::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
