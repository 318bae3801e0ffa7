//! Training a language model on a byte corpus: the step loop with gradient accumulation and
//! clipping, Adam, validation, samples, `metrics.csv`, verified checkpoints with exact
//! resumption, divergence detection and graceful stops.
//!
//! ```no_run
//! use burn::backend::{Autodiff, NdArray};
//! use colt5::lm::CdTransformerConfig;
//! use colt5::train::{corpus::Corpus, Trainer, TrainingConfig};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let corpus = Corpus::load("input.txt".as_ref())?;
//! let model = CdTransformerConfig::new(256, 128, 128, 2).init::<B>(&device)?;
//! let mut trainer = Trainer::new(model, TrainingConfig::default(), "runs/demo", &device)?;
//! trainer.run(&corpus, &"my run", &mut ())?;
//! println!("test loss {:.3} nats/byte", trainer.evaluate(&corpus.test)?);
//! # Ok::<(), colt5::Error>(())
//! ```
//!
//! The batches of step `s` depend only on the seed and `s`, and a checkpoint holds the
//! weights, the optimizer state and the step, so a run resumed from any checkpoint repeats
//! the losses of an uninterrupted one exactly.

pub mod checkpoint;
pub mod corpus;
mod metrics;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::lm::{generate, next_token_loss, LanguageModel, SamplerConfig};
use crate::optim::{Adam, AdamBackend, AdamConfig};
use checkpoint::State;
use corpus::Corpus;
use metrics::Metrics;

/// How a model is trained. The defaults train a small model in a few minutes on two CPU
/// cores.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Sequences per micro-batch. Default 8.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (their gradients are averaged). Default 1.
    pub grad_accum: usize,
    /// Adam learning rate (the peak of the schedule). Default 2e-3.
    pub lr: f64,
    /// Steps over which the rate rises linearly from `lr / warmup_steps` to `lr`. Default 0
    /// (the reference's constant rate).
    #[serde(default)]
    pub warmup_steps: usize,
    /// After the warm-up, the rate follows a cosine from `lr` down to `final_lr_fraction · lr`
    /// at the last step (`steps`). Default `None`: the rate stays `lr`.
    #[serde(default)]
    pub final_lr_fraction: Option<f64>,
    /// Optimizer steps of the whole run. Default 300.
    pub steps: usize,
    /// Clip the global gradient norm to this (none if absent). Default 0.5.
    pub clip_norm: Option<f64>,
    /// Validation loss every this many steps (and at the last). Default 50.
    pub eval_every: usize,
    /// Validation batches per evaluation (the same ones every time). Default 4.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the last). Default 100.
    pub checkpoint_every: usize,
    /// Checkpoints kept; older ones are deleted. Default 3.
    pub keep_checkpoints: usize,
    /// Seed of the data order and the sampler. Default 0.
    pub seed: u64,
    /// Generate a sample every this many steps (0: never). Default 0.
    pub sample_every: usize,
    /// Bytes per sample. Default 256.
    pub sample_len: usize,
    /// Stop when a loss exceeds this multiple of the lowest of the first training loss and
    /// every validation loss so far; a loss that is not finite always stops. `None` turns
    /// the check off. Default 4.
    #[serde(default = "default_divergence_ratio")]
    pub divergence_ratio: Option<f64>,
}

fn default_divergence_ratio() -> Option<f64> {
    Some(4.0)
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            batch_size: 8,
            grad_accum: 1,
            lr: 2e-3,
            warmup_steps: 0,
            final_lr_fraction: None,
            steps: 300,
            clip_norm: Some(0.5),
            eval_every: 50,
            eval_batches: 4,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            seed: 0,
            sample_every: 0,
            sample_len: 256,
            divergence_ratio: default_divergence_ratio(),
        }
    }
}

impl TrainingConfig {
    /// Rejects values no run can use, naming the field.
    pub fn check(&self) -> crate::Result<()> {
        Error::require_positive(&[
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
            ("eval_batches", self.eval_batches),
            ("checkpoint_every", self.checkpoint_every),
            ("keep_checkpoints", self.keep_checkpoints),
        ])?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", self.lr, "a finite number > 0"));
        }
        if let Some(fraction) = self.final_lr_fraction {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(Error::config(
                    "final_lr_fraction",
                    fraction,
                    "a number in [0, 1]",
                ));
            }
        }
        if let Some(clip) = self.clip_norm {
            if !(clip > 0.0 && clip.is_finite()) {
                return Err(Error::config("clip_norm", clip, "a finite number > 0"));
            }
        }
        if let Some(ratio) = self.divergence_ratio {
            if !(ratio > 1.0 && ratio.is_finite()) {
                return Err(Error::config(
                    "divergence_ratio",
                    ratio,
                    "a finite number > 1",
                ));
            }
        }
        Ok(())
    }
}

impl TrainingConfig {
    /// The learning rate of optimizer step `step` (1-based): the linear warm-up, then the
    /// cosine decay if `final_lr_fraction` is set.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let Some(fraction) = self.final_lr_fraction else {
            return self.lr;
        };
        let decay_steps = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (fraction + (1.0 - fraction) * cosine)
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step, counted from 1.
    pub step: usize,
    /// The run's last step.
    pub steps: usize,
    /// The mean training loss of the step's micro-batches, in nats per token.
    pub train_loss: f64,
    /// Training tokens per second of this step.
    pub tokens_per_second: f64,
    /// Seconds since this process started training.
    pub elapsed_seconds: f64,
}

/// Receives what the training loop does, for progress bars and logs; every method has a
/// default that does nothing. `()` observes nothing.
pub trait Observer {
    /// After every optimizer step.
    fn on_step(&mut self, _report: &StepReport) {}
    /// After a validation, with its loss in nats per token.
    fn on_validation(&mut self, _report: &StepReport, _loss: f64) {}
    /// After a checkpoint is written.
    fn on_checkpoint(&mut self, _step: usize, _path: &Path) {}
    /// A generated sample (every `sample_every` steps).
    fn on_sample(&mut self, _step: usize, _text: &str) {}
    /// Asked after every step: `true` stops training there, after a checkpoint.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

impl Observer for () {}

/// How [`Trainer::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Every step ran.
    Completed,
    /// The observer asked to stop; a checkpoint of this step was written.
    Stopped {
        /// The last step taken.
        step: usize,
    },
}

/// The optimizer every run uses: Adam ([`AdamConfig`]'s defaults), one fused operation per
/// parameter tensor and step.
pub type TrainOptimizer<B, M> = OptimizerAdaptor<Adam, M, B>;

/// A model, its optimizer state and where the run writes, advanced by [`Trainer::run`].
pub struct Trainer<B: AutodiffBackend, M: AutodiffModule<B>>
where
    B::InnerBackend: AdamBackend,
{
    model: M,
    optimizer: TrainOptimizer<B, M>,
    step: usize,
    config: TrainingConfig,
    out: PathBuf,
    device: B::Device,
}

impl<B, M> Trainer<B, M>
where
    B: AutodiffBackend,
    B::InnerBackend: AdamBackend,
    M: AutodiffModule<B> + LanguageModel<B> + Clone,
    M::InnerModule: LanguageModel<B::InnerBackend>,
{
    /// A run from step 0 writing checkpoints and `metrics.csv` into `out` (created), which
    /// must hold no checkpoints yet.
    pub fn new(
        model: M,
        config: TrainingConfig,
        out: impl Into<PathBuf>,
        device: &B::Device,
    ) -> crate::Result<Self> {
        let out = out.into();
        if !checkpoint::list(&out)?.is_empty() {
            return Err(Error::Format {
                path: out.display().to_string(),
                message: "already holds checkpoints: resume from them or choose another \
                          directory"
                    .into(),
            });
        }
        Trainer::start(model, config, out, device, 0)
    }

    /// A run continuing from `checkpoint` (verified, e.g. by [`checkpoint::newest_good`]):
    /// `model` is built from the checkpoint's configuration and receives its weights; the
    /// optimizer state and step are restored. `out` is the run's directory.
    pub fn resume(
        model: M,
        checkpoint: &Path,
        step: usize,
        config: TrainingConfig,
        out: impl Into<PathBuf>,
        device: &B::Device,
    ) -> crate::Result<Self> {
        let model = checkpoint::load_model(checkpoint, model)?;
        let mut trainer = Trainer::start(model, config, out.into(), device, step)?;
        trainer.optimizer =
            checkpoint::load_optimizer(checkpoint, trainer.optimizer.clone(), device)?;
        Ok(trainer)
    }

    fn start(
        model: M,
        config: TrainingConfig,
        out: PathBuf,
        device: &B::Device,
        step: usize,
    ) -> crate::Result<Self> {
        config.check()?;
        std::fs::create_dir_all(&out).map_err(|e| Error::Io {
            path: out.display().to_string(),
            message: format!("cannot create the output directory: {e}"),
        })?;
        Ok(Trainer {
            model,
            optimizer: AdamConfig::new().init::<B, M>(),
            step,
            config,
            out,
            device: device.clone(),
        })
    }

    /// The model as trained so far.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// Trains from the current step to `config.steps` on `corpus`, validating, sampling
    /// and checkpointing as configured. `run_config` is stored in each checkpoint's
    /// `state.json` (whatever the caller needs to rebuild the model when resuming).
    ///
    /// A checkpoint is written only once the loss of its weights has been seen to be sane
    /// (at the next step, or by the final validation), so after [`Error::Diverged`] the
    /// newest checkpoint holds good weights.
    pub fn run<C: Serialize>(
        &mut self,
        corpus: &Corpus,
        run_config: &C,
        observer: &mut dyn Observer,
    ) -> crate::Result<Finish> {
        let config = self.config.clone();
        let seq_len = self.model.seq_len();
        corpus.check(seq_len + 1)?;
        if self.model.num_tokens() < 256 {
            return Err(Error::config(
                "num_tokens",
                self.model.num_tokens(),
                "256 for a byte-level model",
            ));
        }
        let metrics_path = self.out.join("metrics.csv");
        let mut metrics = Metrics::open(&metrics_path, self.step)?;
        let mut guard = DivergenceGuard::new(config.divergence_ratio);
        let mut pending: Option<(usize, M, TrainOptimizer<B, M>)> = None;
        let tokens_per_step = (config.batch_size * config.grad_accum * seq_len) as f64;
        let started = Instant::now();
        while self.step < config.steps {
            let step = self.step + 1;
            let step_started = Instant::now();
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(step as u64);
            let mut accumulator = GradientsAccumulator::new();
            let mut train_loss = 0.0;
            for _ in 0..config.grad_accum {
                let tokens = batch::<B>(&corpus.train, &config, seq_len, &mut rng, &self.device);
                let loss =
                    next_token_loss(&self.model, tokens)?.div_scalar(config.grad_accum as f64);
                train_loss += loss.clone().into_scalar().elem::<f64>();
                let grads = GradientsParams::from_grads(loss.backward(), &self.model);
                accumulator.accumulate(&self.model, grads);
            }
            guard.check(step, train_loss)?;
            // The weights of the pending checkpoint produced this sane loss.
            if let Some((at, model, optimizer)) = pending.take() {
                self.save(at, run_config, &model, &optimizer, observer)?;
            }
            let mut grads = accumulator.grads();
            if let Some(max_norm) = config.clip_norm {
                clip_global_norm(&self.model, &mut grads, max_norm);
            }
            self.model = self
                .optimizer
                .step(config.lr_at(step), self.model.clone(), grads);
            self.step = step;
            let report = StepReport {
                step,
                steps: config.steps,
                train_loss,
                tokens_per_second: tokens_per_step / step_started.elapsed().as_secs_f64(),
                elapsed_seconds: started.elapsed().as_secs_f64(),
            };
            metrics.write(
                step,
                "train",
                train_loss,
                report.tokens_per_second,
                report.elapsed_seconds,
            )?;
            observer.on_step(&report);
            let last = step == config.steps;
            let validated = step % config.eval_every == 0 || last;
            if validated {
                let valid = self.evaluate(&corpus.valid)?;
                guard.check(step, valid)?;
                guard.validated(valid);
                metrics.write(
                    step,
                    "valid",
                    valid,
                    report.tokens_per_second,
                    report.elapsed_seconds,
                )?;
                observer.on_validation(&report, valid);
            }
            let stop = !last && observer.stop_requested();
            if last || stop || (validated && step % config.checkpoint_every == 0) {
                self.save(step, run_config, &self.model, &self.optimizer, observer)?;
            } else if step % config.checkpoint_every == 0 {
                pending = Some((step, self.model.clone(), self.optimizer.clone()));
            }
            if config.sample_every > 0 && step % config.sample_every == 0 {
                let text = self.sample(corpus.prompt())?;
                observer.on_sample(step, &text);
            }
            if stop {
                return Ok(Finish::Stopped { step });
            }
        }
        Ok(Finish::Completed)
    }

    fn save<C: Serialize>(
        &self,
        step: usize,
        run_config: &C,
        model: &M,
        optimizer: &TrainOptimizer<B, M>,
        observer: &mut dyn Observer,
    ) -> crate::Result<()> {
        let state = State {
            step,
            config: run_config,
        };
        let path = checkpoint::save(
            &self.out,
            &state,
            model,
            optimizer,
            self.config.keep_checkpoints,
        )?;
        observer.on_checkpoint(step, &path);
        Ok(())
    }

    /// The mean loss, in nats per token, over `eval_batches` batches of `bytes` (the same
    /// batches at every call).
    pub fn evaluate(&self, bytes: &[u8]) -> crate::Result<f64> {
        let model = self.model.valid();
        let seq_len = self.model.seq_len();
        if bytes.len() < seq_len + 1 {
            return Err(Error::config(
                "evaluation text length",
                bytes.len(),
                format!("at least seq_len + 1 = {} bytes", seq_len + 1),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(u64::MAX);
        let mut total = 0.0;
        for _ in 0..self.config.eval_batches {
            let tokens =
                batch::<B::InnerBackend>(bytes, &self.config, seq_len, &mut rng, &self.device);
            total += next_token_loss(&model, tokens)?.into_scalar().elem::<f64>();
        }
        Ok(total / self.config.eval_batches as f64)
    }

    /// `prompt` followed by `sample_len` generated bytes, as text (invalid UTF-8 replaced).
    pub fn sample(&self, prompt: &[u8]) -> crate::Result<String> {
        let model = self.model.valid();
        let prompt: Vec<i64> = prompt.iter().map(|&b| i64::from(b)).collect();
        let mut sampler = SamplerConfig::new().with_seed(self.config.seed).init()?;
        let mut decoder = model.decoder();
        let new = generate(
            decoder.as_mut(),
            &prompt,
            self.config.sample_len,
            &mut sampler,
            |_| {},
        )?;
        let text: Vec<u8> = prompt.iter().chain(&new).map(|&t| t as u8).collect();
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}

/// Tracks the losses a run has seen and rejects one that diverged.
struct DivergenceGuard {
    ratio: Option<f64>,
    reference: Option<f64>,
}

impl DivergenceGuard {
    fn new(ratio: Option<f64>) -> Self {
        DivergenceGuard {
            ratio,
            reference: None,
        }
    }

    fn check(&mut self, step: usize, loss: f64) -> crate::Result<()> {
        let Some(ratio) = self.ratio else {
            return Ok(());
        };
        if !loss.is_finite() {
            return Err(Error::Diverged {
                step,
                loss,
                limit: None,
            });
        }
        let reference = *self.reference.get_or_insert(loss);
        let limit = ratio * reference;
        if loss > limit {
            return Err(Error::Diverged {
                step,
                loss,
                limit: Some(limit),
            });
        }
        Ok(())
    }

    fn validated(&mut self, loss: f64) {
        self.reference = Some(self.reference.map_or(loss, |r| r.min(loss)));
    }
}

/// A micro-batch of `seq_len + 1` byte windows.
fn batch<B: burn::tensor::backend::Backend>(
    bytes: &[u8],
    config: &TrainingConfig,
    seq_len: usize,
    rng: &mut ChaCha8Rng,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids = corpus::sample(bytes, config.batch_size, seq_len + 1, rng);
    Tensor::from_data(
        TensorData::new(ids, [config.batch_size, seq_len + 1]),
        device,
    )
}

/// Scales every gradient by `min(1, max_norm / ‖g‖)`, ‖g‖ the norm of all of them together
/// (PyTorch's `clip_grad_norm_`; burn's clipping is per tensor). Returns ‖g‖.
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

#[cfg(test)]
mod tests {
    use super::TrainingConfig;

    #[test]
    fn the_rate_warms_up_linearly_then_follows_the_cosine_to_its_floor() {
        let config = TrainingConfig {
            lr: 1e-2,
            steps: 110,
            warmup_steps: 10,
            final_lr_fraction: Some(0.1),
            ..TrainingConfig::default()
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        close(config.lr_at(1), 1e-3);
        close(config.lr_at(10), 1e-2);
        close(config.lr_at(60), 1e-2 * (0.1 + 0.9 * 0.5));
        close(config.lr_at(110), 1e-3);
        close(config.lr_at(200), 1e-3);
        let constant = TrainingConfig::default();
        close(constant.lr_at(1), constant.lr);
        close(constant.lr_at(1000), constant.lr);
        assert!(TrainingConfig {
            final_lr_fraction: Some(1.5),
            ..TrainingConfig::default()
        }
        .check()
        .is_err());
    }
}
