//! `colt5 train`: byte-level language modelling with checkpoints, resumption, metrics and a
//! loss plot.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Int, Tensor, TensorData};
use colt5::coor_descent::CoorDescentBackend;
use colt5::lm::{
    generate, next_token_loss, CdTransformerConfig, Colt5TransformerConfig, LanguageModel,
    SamplerConfig,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::{run_on, BackendKind, Job};
use crate::checkpoint::{self, State};
use crate::data::{self, Corpus};
use crate::model::{Lm, ModelConfig, ModelKind};
use crate::plot;

/// Everything that defines a training run.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model and its architecture.
    pub model: ModelConfig,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Clip the global gradient norm to this (none if absent).
    pub clip_norm: Option<f64>,
    /// Validation loss every this many steps.
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Seed of the initialisation and of the data order.
    pub seed: u64,
    /// Print a sample every this many steps (0: only at the end).
    pub sample_every: usize,
    /// Bytes per sample.
    pub sample_len: usize,
}

/// Named starting points for the configuration.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Preset {
    /// A small model that trains in a few minutes on 2 CPU cores.
    Small,
    /// `train.py` of coordinate-descent-attention: dim 512, depth 8, seq 512, attention
    /// k 2, feed-forward k 128, 25 iterations, Adam 1e-4, batch 4 × 4 accumulated, clip
    /// 0.5. Each micro-batch loss is divided by 4 before back-propagation, which is what
    /// the script intended (it scales each gradient by its own loss instead).
    Recipe,
}

impl Preset {
    /// The preset for architecture `kind`. The CoLT5 variants have the sizes of the
    /// coordinate-descent ones (the recipe exists only for the latter; for CoLT5 it is a
    /// model of the same width, depth and length).
    fn config(self, kind: ModelKind) -> TrainConfig {
        match self {
            Preset::Small => TrainConfig {
                model: match kind {
                    ModelKind::CdAttention => ModelConfig::CdAttention(
                        CdTransformerConfig::new(256, 128, 128, 2)
                            .with_heads(4)
                            .with_dim_head(32)
                            .with_attn_use_coor_descent(true)
                            .with_attn_coor_descent_sparsity_k(2.0)
                            .with_coor_descent_iters(15),
                    ),
                    ModelKind::Colt5 => ModelConfig::Colt5(
                        Colt5TransformerConfig::new(256, 128, 128, 2)
                            .with_window_size(32)
                            .with_num_heavy_tokens_kv(32)
                            .with_num_heavy_ff_tokens(8),
                    ),
                },
                batch_size: 8,
                grad_accum: 1,
                lr: 2e-3,
                steps: 300,
                clip_norm: Some(0.5),
                eval_every: 50,
                eval_batches: 4,
                checkpoint_every: 100,
                keep_checkpoints: 3,
                seed: 0,
                sample_every: 0,
                sample_len: 256,
            },
            Preset::Recipe => TrainConfig {
                model: match kind {
                    ModelKind::CdAttention => ModelConfig::CdAttention(
                        CdTransformerConfig::new(256, 512, 512, 8)
                            .with_heads(8)
                            .with_dim_head(64)
                            .with_attn_use_coor_descent(true)
                            .with_ff_use_coor_descent(true)
                            .with_attn_coor_descent_sparsity_k(2.0)
                            .with_ff_coor_descent_sparsity_k(128.0)
                            .with_coor_descent_iters(25),
                    ),
                    ModelKind::Colt5 => ModelConfig::Colt5(
                        Colt5TransformerConfig::new(256, 512, 512, 8)
                            .with_window_size(128)
                            .with_heads(8)
                            .with_dim_head(64)
                            .with_num_heavy_tokens_kv(128)
                            .with_num_heavy_ff_tokens(32),
                    ),
                },
                batch_size: 4,
                grad_accum: 4,
                lr: 1e-4,
                steps: 100_000,
                clip_norm: Some(0.5),
                eval_every: 100,
                eval_batches: 1,
                checkpoint_every: 1000,
                keep_checkpoints: 3,
                seed: 0,
                sample_every: 500,
                sample_len: 512,
            },
        }
    }
}

/// Arguments of `colt5 train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Text to model, plain or gzip (`.gz`); a file named `enwik8` or `enwik8.gz` is split
    /// 90M/5M/5M bytes, any other 90 %/5 %/5 %. Default: the bundled corpus (Shakespeare).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory for checkpoints, `metrics.csv` and `loss.png`.
    #[arg(long, default_value = "runs/colt5")]
    out: PathBuf,
    /// Starting configuration.
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    /// Architecture of the preset (a config file names its own; they must agree).
    /// Default: cd-attention.
    #[arg(long, value_enum)]
    model: Option<ModelKind>,
    /// A configuration file (TOML or JSON, the fields of `config.json` in a checkpoint)
    /// replacing the preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the newest checkpoint in `--out` (its configuration is used; `--steps`
    /// may extend it).
    #[arg(long)]
    resume: bool,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches accumulated per step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Adam learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Training sequence length (and the model's longest sequence).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Model width.
    #[arg(long)]
    dim: Option<usize>,
    /// Number of blocks.
    #[arg(long)]
    depth: Option<usize>,
    /// Validation every N steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Seed of initialisation and data order.
    #[arg(long)]
    seed: Option<u64>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut config = match &self.config {
            Some(path) => read_config(path)?,
            None => self
                .preset
                .config(self.model.unwrap_or(ModelKind::CdAttention)),
        };
        if let Some(kind) = self.model {
            if kind != config.model.kind() {
                bail!(
                    "--model {kind:?} disagrees with the config file's model kind {:?}",
                    config.model.kind()
                );
            }
        }
        let set = |target: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *target = v;
            }
        };
        set(&mut config.steps, self.steps);
        set(&mut config.batch_size, self.batch_size);
        set(&mut config.grad_accum, self.grad_accum);
        let sizes = config.model.sizes();
        set(sizes.seq_len, self.seq_len);
        set(sizes.dim, self.dim);
        set(sizes.depth, self.depth);
        set(&mut config.eval_every, self.eval_every);
        set(&mut config.checkpoint_every, self.checkpoint_every);
        if let Some(lr) = self.lr {
            config.lr = lr;
        }
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        Ok(config)
    }
}

fn read_config(path: &Path) -> Result<TrainConfig> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let parsed = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml::from_str(&text).map_err(anyhow::Error::from),
        _ => serde_json::from_str(&text).map_err(anyhow::Error::from),
    };
    parsed.with_context(|| format!("invalid config file {}", path.display()))
}

impl TrainConfig {
    /// Rejects values no run can use, naming the field.
    pub fn check(&self) -> Result<()> {
        let mut model = self.model.clone();
        let sizes = model.sizes();
        for (name, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
            ("eval_batches", self.eval_batches),
            ("checkpoint_every", self.checkpoint_every),
            ("keep_checkpoints", self.keep_checkpoints),
            ("model.seq_len", *sizes.seq_len),
            ("model.dim", *sizes.dim),
            ("model.depth", *sizes.depth),
        ] {
            if value == 0 {
                bail!("invalid config value: {name} = 0 (must be at least 1)");
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!(
                "invalid config value: lr = {} (must be a finite number > 0)",
                self.lr
            );
        }
        if let Some(clip) = self.clip_norm {
            if !(clip > 0.0 && clip.is_finite()) {
                bail!("invalid config value: clip_norm = {clip} (must be > 0)");
            }
        }
        if *sizes.num_tokens != 256 {
            bail!(
                "invalid config value: model.num_tokens = {} (byte-level models need 256)",
                sizes.num_tokens
            );
        }
        Ok(())
    }
}

/// Runs `colt5 train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    run_on(args.backend, Training(args))
}

struct Training<'a>(&'a TrainArgs);

impl Job for Training<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend,
    {
        train::<B>(self.0, device)
    }
}

fn train<B>(args: &TrainArgs, device: &B::Device) -> Result<()>
where
    B: AutodiffBackend + CoorDescentBackend,
    B::InnerBackend: CoorDescentBackend,
{
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    let (config, resume_from) = if args.resume {
        let checkpoint = checkpoint::resolve(&args.out)?;
        let mut state = checkpoint::read_state(&checkpoint)?;
        if let Some(steps) = args.steps {
            state.config.steps = steps;
        }
        (state.config, Some((state.step, checkpoint)))
    } else {
        if !checkpoint::list(&args.out)?.is_empty() {
            bail!(
                "{} already holds checkpoints: pass --resume to continue, or choose another --out",
                args.out.display()
            );
        }
        (args.config()?, None)
    };
    config.check()?;
    let corpus = Corpus::load(args.data.as_deref())?;
    corpus.check(config.model.seq_len() + 1)?;

    B::seed(device, config.seed);
    let mut model = config
        .model
        .init::<B>(device)
        .context("invalid model configuration")?;
    let mut optimizer = AdamConfig::new().init::<B, Lm<B>>();
    let mut start = 0;
    if let Some((step, checkpoint)) = &resume_from {
        model = checkpoint::load_model(checkpoint, model, device)?;
        optimizer = checkpoint::load_optimizer(checkpoint, optimizer, device)?;
        start = *step;
        tracing::info!("resuming from {} (step {step})", checkpoint.display());
    }
    let metrics_path = args.out.join("metrics.csv");
    let mut metrics = Metrics::open(&metrics_path, start)?;
    tracing::info!(
        "training on {} ({} training bytes, unigram entropy {:.3} nats/byte), {} parameters",
        corpus.name,
        corpus.train.len(),
        data::unigram_entropy(&corpus.train),
        model.num_params()
    );

    let tokens_per_step = config.batch_size * config.grad_accum * config.model.seq_len();
    let progress = ProgressBar::new(config.steps as u64).with_position(start as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    let started = Instant::now();
    for step in start + 1..=config.steps {
        let step_started = Instant::now();
        // The batches of a step depend only on the seed and the step, so a resumed run sees
        // the same data as an uninterrupted one.
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(step as u64);
        let mut accumulator = GradientsAccumulator::new();
        let mut train_loss = 0.0;
        for _ in 0..config.grad_accum {
            let tokens = batch::<B>(&corpus.train, &config, &mut rng, device);
            let loss = next_token_loss(&model, tokens)?.div_scalar(config.grad_accum as f64);
            train_loss += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        if let Some(max_norm) = config.clip_norm {
            clip_global_norm(&model, &mut grads, max_norm);
        }
        model = optimizer.step(config.lr, model, grads);
        let tokens_per_second = tokens_per_step as f64 / step_started.elapsed().as_secs_f64();
        let elapsed = started.elapsed().as_secs_f64();
        metrics.write(step, "train", train_loss, tokens_per_second, elapsed)?;
        progress.set_message(format!(
            "loss {train_loss:.3}  {tokens_per_second:.0} tok/s"
        ));
        progress.inc(1);

        if step % config.eval_every == 0 || step == config.steps {
            let valid = validation_loss(&model.valid(), &corpus.valid, &config, device)?;
            metrics.write(step, "valid", valid, tokens_per_second, elapsed)?;
            progress.suspend(|| {
                tracing::info!(
                    "step {step}: train loss {train_loss:.4}, validation loss {valid:.4} \
                     nats/byte ({:.3} bits/byte), {tokens_per_second:.0} tokens/s",
                    valid / std::f64::consts::LN_2
                )
            });
            plot::loss_curves(&metrics_path, &args.out.join("loss.png"))?;
        }
        if step % config.checkpoint_every == 0 || step == config.steps {
            let state = State {
                step,
                config: config.clone(),
            };
            checkpoint::save(
                &args.out,
                &state,
                &model,
                &optimizer,
                config.keep_checkpoints,
            )?;
        }
        if config.sample_every > 0 && step % config.sample_every == 0 {
            let text = sample_text(&model.valid(), &corpus.valid, &config)?;
            progress.suspend(|| tracing::info!("sample at step {step}:\n{text}"));
        }
    }
    progress.finish_and_clear();
    let test = validation_loss(&model.valid(), &corpus.test, &config, device)?;
    tracing::info!(
        "test loss {test:.4} nats/byte ({:.3} bits/byte)",
        test / std::f64::consts::LN_2
    );
    println!("{}", sample_text(&model.valid(), &corpus.valid, &config)?);
    Ok(())
}

/// A micro-batch of `seq_len + 1` byte windows.
fn batch<B: burn::tensor::backend::Backend>(
    bytes: &[u8],
    config: &TrainConfig,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let len = config.model.seq_len() + 1;
    let ids = data::sample(bytes, config.batch_size, len, rng);
    Tensor::from_data(TensorData::new(ids, [config.batch_size, len]), device)
}

/// The mean loss over the same `eval_batches` validation batches at every evaluation.
fn validation_loss<B: CoorDescentBackend>(
    model: &Lm<B>,
    bytes: &[u8],
    config: &TrainConfig,
    device: &B::Device,
) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(u64::MAX);
    let mut total = 0.0;
    for _ in 0..config.eval_batches {
        let tokens = batch::<B>(bytes, config, &mut rng, device);
        total += next_token_loss(model, tokens)?.into_scalar().elem::<f64>();
    }
    Ok(total / config.eval_batches as f64)
}

/// `sample_len` bytes generated after a prompt from the start of the validation text.
fn sample_text<B: CoorDescentBackend>(
    model: &Lm<B>,
    bytes: &[u8],
    config: &TrainConfig,
) -> Result<String> {
    let prompt: Vec<i64> = bytes[..bytes.len().min(64)]
        .iter()
        .map(|&b| i64::from(b))
        .collect();
    let mut sampler = SamplerConfig::new().with_seed(config.seed).init()?;
    let mut decoder = model.decoder();
    let new = generate(
        decoder.as_mut(),
        &prompt,
        config.sample_len,
        &mut sampler,
        |_| {},
    )?;
    let mut text: Vec<u8> = prompt.iter().map(|&t| t as u8).collect();
    text.extend(new.iter().map(|&t| t as u8));
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Scales every gradient by `min(1, max_norm / ‖g‖)`, ‖g‖ the norm of all of them together
/// (PyTorch's `clip_grad_norm_`; burn's clipping is per tensor).
fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    // Summed on the device, read back once.
    struct SquaredNorm<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let squares = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squares,
                    None => squares,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let id: ParamId = param.id;
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
                self.grads.register(id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut norm = SquaredNorm::<B> { grads, total: None };
    model.visit(&mut norm);
    let total = norm
        .total
        .map_or(0.0, |t| t.into_scalar().elem::<f64>())
        .sqrt();
    if total > max_norm {
        model.visit(&mut Scale {
            grads,
            factor: max_norm / (total + 1e-6),
        });
    }
    total
}

/// `metrics.csv`: one row per training step and per validation.
struct Metrics {
    file: fs::File,
}

impl Metrics {
    /// Opens the file for appending, first dropping rows after `step` (written after the
    /// checkpoint a resumed run starts from).
    fn open(path: &Path, step: usize) -> Result<Metrics> {
        let header = "step,split,loss,tokens_per_second,elapsed_seconds";
        let kept: Vec<String> = match fs::read_to_string(path) {
            Ok(text) if step > 0 => text
                .lines()
                .skip(1)
                .filter(|line| {
                    line.split(',')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|s| s <= step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file =
            fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(file, "{header}")?;
        for line in kept {
            writeln!(file, "{line}")?;
        }
        Ok(Metrics { file })
    }

    fn write(
        &mut self,
        step: usize,
        split: &str,
        loss: f64,
        tokens_per_second: f64,
        elapsed: f64,
    ) -> Result<()> {
        writeln!(
            self.file,
            "{step},{split},{loss:.6},{tokens_per_second:.1},{elapsed:.2}"
        )?;
        Ok(())
    }
}
