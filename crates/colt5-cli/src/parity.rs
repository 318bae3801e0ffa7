//! `colt5 parity DIR`: checks colt5 against reference tensors, one line per case file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use colt5::golden::{case_files, Case};
use colt5::parity::{run_case, Outcome, Precision};

/// Arguments of `colt5 parity`.
#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Directory of golden case files (`*.safetensors`, format colt5-golden-v1).
    dir: PathBuf,
    /// Floating-point precision to run colt5 in (tolerances follow it).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F64)]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    F64,
    F32,
}

/// Runs every case; the exit code is non-zero if any case failed or is unsupported.
pub fn run(args: &ParityArgs) -> anyhow::Result<ExitCode> {
    let precision = match args.precision {
        PrecisionArg::F64 => Precision::F64,
        PrecisionArg::F32 => Precision::F32,
    };
    let files = case_files(&args.dir).context("listing golden cases")?;
    if files.is_empty() {
        anyhow::bail!("{}: no *.safetensors case files", args.dir.display());
    }
    let (mut passed, mut failed, mut unsupported) = (0, 0, 0);
    for file in &files {
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let outcome = Case::load(file).and_then(|case| {
            let outcome = run_case(&case, precision)?;
            Ok((case.module, outcome))
        });
        match outcome {
            Ok((module, Outcome::Compared(comparisons))) => {
                let ok = comparisons.iter().all(|c| c.ok());
                let details: Vec<String> = comparisons
                    .iter()
                    .map(|c| {
                        format!(
                            "{} abs {:.2e} rel {:.2e}{}",
                            c.name,
                            c.max_abs,
                            c.relative,
                            if c.ok() { "" } else { " (over tolerance)" }
                        )
                    })
                    .collect();
                println!(
                    "{name}  {module}  {}  {}",
                    details.join(", "),
                    if ok { "ok" } else { "FAIL" }
                );
                if ok {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Ok((module, Outcome::Unsupported)) => {
                println!("{name}  {module}  unsupported");
                unsupported += 1;
            }
            Err(error) => {
                println!("{name}  FAIL  {error}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {unsupported} unsupported");
    Ok(if failed + unsupported == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
