//! `colt5 bench`: throughput tables to set beside the reference's benchmark scripts.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Int, Tensor, TensorData};
use colt5::coor_descent::CoorDescentBackend;
use colt5::lm::{next_token_loss, CdTransformerConfig, Colt5TransformerConfig};
use colt5::optim::AdamConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{run_on, BackendKind, Job};
use crate::model::{Lm, ModelConfig};

/// Arguments of `colt5 bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// Training-step throughput (forward, backward, Adam) of the language models, for the
    /// configurations of the reference's `bench_cpu_lm.py`.
    Lm(LmArgs),
    /// The fused coordinate-descent kernels (forward, forward+backward, memory) on the
    /// GPU, for the shapes of the reference's `bench_coor_descent.py`.
    Cd(crate::bench_cd::CdArgs),
    /// One CoLT5 routed transformer block and a dense block of the same width (forward,
    /// forward+backward, memory) for the configuration of the reference's
    /// `bench_block.py`.
    Block(crate::bench_block::BlockArgs),
    /// The fused attention kernels (whole attention and the CoLT5 block's local band,
    /// forward and backward) on the GPU, for several layouts of rows on units.
    Attention(crate::bench_attention::AttentionArgs),
    /// The CoLT5 block's matrix products under each of CubeCL's matmul strategies (CUDA).
    Matmul(crate::bench_matmul::MatmulArgs),
    /// Generation speed (time to the first token, per-token latency, tokens/s) of the
    /// language models, for the configurations of the reference's `bench_generate.py`.
    Generate(crate::bench_generate::GenerateArgs),
}

/// Language-model configurations of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LmBench {
    /// Coordinate-descent attention: dim 256, depth 4, seq 256, 4 heads of 64, k 2,
    /// 15 iterations.
    SmallCd,
    /// The same model with dense softmax attention.
    SmallDense,
    /// `train.py`'s model: dim 512, depth 8, seq 512, 8 heads, attention k 2, feed-forward
    /// k 128, 25 iterations.
    RecipeCd,
    /// A CoLT5 LM of the small sizes: dim 256, depth 4, seq 256, 4 heads of 64, window 64.
    SmallColt5,
    /// The long-context CoLT5 LM: dim 512, depth 1, the model's defaults otherwise (window
    /// 64, 4 heads of 32, 64 heavy keys/values and 16 heavy feed-forward tokens per
    /// window); sequences of 4 096 tokens unless `--seq-len` says otherwise.
    Colt5,
    /// `colt5 train --preset small`'s coordinate-descent-attention LM: dim 128, depth 2,
    /// seq 64, 4 heads of 32, k 2, 15 iterations.
    Small,
}

impl LmBench {
    /// The configuration's model.
    pub fn config(self) -> ModelConfig {
        let small = || {
            CdTransformerConfig::new(256, 256, 256, 4)
                .with_dim_head(64)
                .with_heads(4)
        };
        match self {
            LmBench::SmallCd => ModelConfig::CdAttention(
                small()
                    .with_attn_use_coor_descent(true)
                    .with_attn_coor_descent_sparsity_k(2.0)
                    .with_coor_descent_iters(15),
            ),
            LmBench::SmallDense => ModelConfig::CdAttention(small()),
            LmBench::RecipeCd => ModelConfig::CdAttention(
                CdTransformerConfig::new(256, 512, 512, 8)
                    .with_dim_head(64)
                    .with_heads(8)
                    .with_attn_use_coor_descent(true)
                    .with_ff_use_coor_descent(true)
                    .with_attn_coor_descent_sparsity_k(2.0)
                    .with_ff_coor_descent_sparsity_k(128.0)
                    .with_coor_descent_iters(25),
            ),
            LmBench::SmallColt5 => ModelConfig::Colt5(
                Colt5TransformerConfig::new(256, 256, 256, 4)
                    .with_heads(4)
                    .with_dim_head(64)
                    .with_window_size(64)
                    .with_num_heavy_tokens_kv(64)
                    .with_num_heavy_ff_tokens(16),
            ),
            LmBench::Colt5 => ModelConfig::Colt5(Colt5TransformerConfig::new(256, 512, 4096, 1)),
            LmBench::Small => {
                crate::train::Preset::Small
                    .config(crate::model::ModelKind::CdAttention)
                    .model
            }
        }
    }
}

#[derive(clap::Args, Debug)]
struct LmArgs {
    /// Configurations to time.
    #[arg(long, value_enum, num_args = 1.., default_values = ["small-cd", "small-dense", "recipe-cd", "small-colt5"])]
    configs: Vec<LmBench>,
    /// Timed steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Sequence lengths to time each configuration at (one row each), instead of its own.
    #[arg(long, num_args = 1..)]
    seq_len: Vec<usize>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// Runs `colt5 bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.what {
        BenchCommand::Lm(args) => run_on(args.backend, LmJob(args)),
        BenchCommand::Cd(args) => crate::bench_cd::run(args),
        BenchCommand::Block(args) => crate::bench_block::run(args),
        BenchCommand::Attention(args) => crate::bench_attention::run(args),
        BenchCommand::Matmul(args) => crate::bench_matmul::run(args),
        BenchCommand::Generate(args) => crate::bench_generate::run(args),
    }
}

struct LmJob<'a>(&'a LmArgs);

impl Job for LmJob<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend,
    {
        let args = self.0;
        anyhow::ensure!(
            args.steps > 0 && args.batch > 0,
            "--steps and --batch must be at least 1"
        );
        println!(
            "| config | batch x seq | s/step | tokens/s | MiB | {:?}, {} cores |",
            args.backend,
            cores()
        );
        println!("|---|---|---|---|---|---|");
        for &bench in &args.configs {
            let lengths = match args.seq_len.is_empty() {
                true => vec![bench.config().seq_len()],
                false => args.seq_len.clone(),
            };
            for seq_len in lengths {
                anyhow::ensure!(seq_len > 0, "--seq-len must be at least 1");
                let mut config = bench.config();
                *config.sizes().seq_len = seq_len;
                let (seconds, bytes) = time_steps::<B>(&config, args, device)?;
                println!(
                    "| {} | {}x{seq_len} | {seconds:.3} | {:.0} | {} | |",
                    clap::ValueEnum::to_possible_value(&bench)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default(),
                    args.batch,
                    (args.batch * seq_len) as f64 / seconds,
                    crate::backend::mib(bytes),
                );
            }
        }
        Ok(())
    }
}

/// Seconds per training step of `config` (forward, backward, Adam) on random tokens, and
/// the device memory one step takes beyond the model and optimizer state (CUDA).
fn time_steps<B>(
    config: &ModelConfig,
    args: &LmArgs,
    device: &B::Device,
) -> Result<(f64, Option<u64>)>
where
    B: AutodiffBackend + CoorDescentBackend,
    B::InnerBackend: CoorDescentBackend,
{
    let seq_len = config.seq_len();
    config.ensure_trainable::<B>(args.batch, device)?;
    B::seed(device, 0);
    let model: Lm<B> = config.init(device).context("benchmark model")?;
    let mut optimizer = AdamConfig::new().init::<B, Lm<B>>();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<i64> = (0..args.batch * (seq_len + 1))
        .map(|_| rng.random_range(0..256))
        .collect();
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [args.batch, seq_len + 1]), device);
    let mut step = |model: Lm<B>| -> Result<Lm<B>> {
        let loss = next_token_loss(&model, tokens.clone())?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = optimizer.step(2e-4, model, grads);
        // Wait for the device: the step is over when its parameters are.
        B::sync(device).context("device synchronisation")?;
        Ok(model)
    };
    let mut model = step(model)?;
    let started = Instant::now();
    for _ in 0..args.steps {
        model = step(model)?;
    }
    let seconds = started.elapsed().as_secs_f64() / args.steps as f64;
    let bytes = crate::backend::peak_bytes::<B>(device, &|| {
        let loss = next_token_loss(&model, tokens.clone())?;
        drop(GradientsParams::from_grads(loss.backward(), &model));
        Ok(())
    })?;
    Ok((seconds, bytes))
}

/// Cores available to the process (the CPU backend's thread count).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}
