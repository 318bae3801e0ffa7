//! `colt5 generate`: text from a trained checkpoint, streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use colt5::coor_descent::CoorDescentBackend;
use colt5::lm::{generate, LanguageModel, SamplerConfig};

use crate::backend::{run_on, BackendKind, Job};
use crate::checkpoint;

/// Arguments of `colt5 generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint directory, or a training output directory (its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 512)]
    length: usize,
    /// Sampling temperature (0: always the most likely byte).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the `(1 − filter_thres)·256` most likely bytes.
    #[arg(long, default_value_t = 0.9)]
    filter_thres: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// Runs `colt5 generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    run_on(args.backend, Generation(args))
}

struct Generation<'a>(&'a GenerateArgs);

impl Job for Generation<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend,
    {
        let args = self.0;
        let sampler = SamplerConfig::new()
            .with_temperature(args.temperature)
            .with_filter_thres(args.filter_thres)
            .with_seed(args.seed);
        let mut sampler = sampler.init()?;
        if args.prompt.is_empty() {
            anyhow::bail!("the prompt is empty: give at least one byte of text");
        }
        let path = checkpoint::resolve(&args.checkpoint)?;
        let state = checkpoint::read_state(&path)?;
        let model =
            state.config.model.init::<B>(device).with_context(|| {
                format!("{} holds an invalid model configuration", path.display())
            })?;
        let model = checkpoint::load_model(&path, model, device)?.valid();
        let prompt: Vec<i64> = args.prompt.bytes().map(i64::from).collect();
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(args.prompt.as_bytes())?;
        let mut decoder = model.decoder();
        let mut pending = Vec::new();
        generate(
            decoder.as_mut(),
            &prompt,
            args.length,
            &mut sampler,
            |token| {
                // Bytes are written as soon as they form valid UTF-8 (or cannot).
                pending.push(token as u8);
                if std::str::from_utf8(&pending).is_ok() || pending.len() >= 4 {
                    let _ = stdout.write_all(&pending);
                    let _ = stdout.flush();
                    pending.clear();
                }
            },
        )?;
        stdout.write_all(&pending)?;
        writeln!(stdout)?;
        Ok(())
    }
}
