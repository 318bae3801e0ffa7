//! `colt5 bench block`: one CoLT5 routed transformer block, and a dense pre-norm block of
//! the same width, timed as the reference's `bench_block.py` times its own.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{
    activation::gelu, backend::AutodiffBackend, backend::Backend, Distribution, Tensor,
};
use colt5::attend::AttendConfig;
use colt5::attention::AttentionInputs;
use colt5::coor_descent::{coor_descent, top_k_indices, CoorDescentBackend, CoorDescentConfig};
use colt5::fused_attention::{fused_attention, AttentionBackend, FusedAttention, Keys};
use colt5::routed::{
    ConditionalRoutedAttentionConfig, ConditionalRoutedFeedForwardConfig,
    ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerBlockConfig,
};
use colt5::router::{CoordinateDescentRouterConfig, RouteOptions, RouterOutput};

use crate::backend::{run_in, BackendKind, Job, Precision};

/// Width, heads and head width of both blocks (bench_block.py's).
const DIM: usize = 512;
const HEADS: usize = 8;
const DIM_HEAD: usize = 64;

/// Arguments of `colt5 bench block`.
#[derive(clap::Args, Debug)]
pub struct BlockArgs {
    /// Sequence lengths (batch 1).
    #[arg(long, num_args = 1.., default_values_t = [4096, 16384, 65536])]
    seqs: Vec<usize>,
    /// Blocks to time.
    #[arg(long, value_enum, num_args = 1.., default_values = ["colt5", "dense"])]
    models: Vec<BlockModel>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Also time each stage of the CoLT5 block on its own (forward and forward+backward),
    /// in a second table: the profile of where the block's time goes.
    #[arg(long)]
    profile: bool,
    /// After timing each block, run one more forward+backward between `cuProfilerStart`
    /// and `cuProfilerStop`, for `ncu --profile-from-start off` (CUDA; per-kernel profile).
    #[arg(long)]
    profiler_range: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendKind,
    /// Element type of the blocks' weights, input and activations (bf16: CUDA only).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

/// The blocks of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum BlockModel {
    /// `ConditionalRoutedTransformerBlock` as bench_block.py builds it: light LocalMHA
    /// (8 × 64, window 128, ff mult 0.5), heavy attention 8 × 64 and ff mult 4, seq/16
    /// heavy tokens for queries, keys/values and the feed-forward, routers of 20
    /// iterations (eps 0.03 from 4, decay 0.7).
    Colt5,
    /// Pre-norm block: x + MHA(LN(x)) (non-causal, full attention), x + FF(LN(x)), GELU,
    /// ff mult 4.
    Dense,
}

/// Runs `colt5 bench block`.
pub fn run(args: &BlockArgs) -> Result<()> {
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(
        args.seqs.iter().all(|&s| s >= 16),
        "--seqs must be at least 16 (a sixteenth of the tokens is routed)"
    );
    run_in(args.backend, args.precision, BlockJob(args))
}

struct BlockJob<'a>(&'a BlockArgs);

impl Job for BlockJob<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend,
    {
        let args = self.0;
        let dtype = args.precision.reference_name();
        println!("device: {:?}, {dtype}", args.backend);
        println!("| model | seq | dtype | fwd ms | f+b ms | fwd MiB | f+b MiB | params (M) |");
        println!("|---|---|---|---|---|---|---|---|");
        let mut profiles = Vec::new();
        for &seq in &args.seqs {
            for &model in &args.models {
                B::seed(device, 0);
                let x =
                    Tensor::<B, 3>::random([1, seq, DIM], Distribution::Normal(0.0, 1.0), device);
                let g =
                    Tensor::<B, 3>::random([1, seq, DIM], Distribution::Normal(0.0, 1.0), device);
                let name = match model {
                    BlockModel::Colt5 => "colt5",
                    BlockModel::Dense => "dense",
                };
                let row = match model {
                    BlockModel::Colt5 => {
                        let block = colt5_block::<B>(seq, device)?;
                        let inference = block.valid();
                        let params = block.num_params();
                        let row = measure::<B>(
                            device,
                            (args.reps, args.profiler_range),
                            params,
                            &x,
                            &g,
                            |x| Ok(inference.forward(x, None)?),
                            |x| Ok(block.forward(x, None)?),
                        );
                        if args.profile {
                            profiles
                                .push((seq, profile::<B>(&block, seq, &x, &g, device, args.reps)?));
                        }
                        row
                    }
                    BlockModel::Dense => {
                        // Without fused attention, full attention keeps heads · n² logits (and
                        // their softmax for the backward): skip lengths where those alone pass
                        // 32 GiB.
                        let logits = HEADS as f64 * (seq as f64).powi(2) * 4.0;
                        if !has_fused_attention::<B>(device) && logits > 32.0 * (1u64 << 30) as f64
                        {
                            println!(
                                "| dense | {seq} | {dtype} | – | – | – | – | – | skipped: {:.0} GiB of logits |",
                                logits / (1u64 << 30) as f64
                            );
                            continue;
                        }
                        let block = DenseBlock::<B>::new(device);
                        let inference = block.valid();
                        let params = block.num_params();
                        measure::<B>(
                            device,
                            (args.reps, args.profiler_range),
                            params,
                            &x,
                            &g,
                            |x| Ok(inference.forward(x)),
                            |x| Ok(block.forward(x)),
                        )
                    }
                };
                match row {
                    Ok(m) => println!(
                        "| {name} | {seq} | {dtype} | {:.2} | {:.2} | {} | {} | {:.2} |",
                        m.forward_ms,
                        m.forward_backward_ms,
                        crate::backend::mib(m.forward_bytes),
                        crate::backend::mib(m.forward_backward_bytes),
                        m.params as f64 / 1e6
                    ),
                    Err(error) => {
                        println!(
                            "| {name} | {seq} | {dtype} | – | – | – | – | – | error: {error:#} |"
                        )
                    }
                }
            }
        }
        for (seq, stages) in profiles {
            println!();
            println!("Stages of the CoLT5 block at {seq} tokens, each timed on its own:");
            println!("| stage | fwd ms (autodiff graph) | f+b ms |");
            println!("|---|---|---|");
            for (stage, forward_ms, forward_backward_ms) in stages {
                let forward_backward = match forward_backward_ms.is_nan() {
                    true => "–".to_string(),
                    false => format!("{forward_backward_ms:.3}"),
                };
                println!("| {stage} | {forward_ms:.3} | {forward_backward} |");
            }
        }
        Ok(())
    }
}

/// The CoLT5 block of bench_block.py at `seq` tokens.
fn colt5_block<B: Backend>(
    seq: usize,
    device: &B::Device,
) -> Result<ConditionalRoutedTransformerBlock<B>> {
    let heavy = seq / 16;
    let router = CoordinateDescentRouterConfig::new(DIM).with_n_iters(20);
    let attention = ConditionalRoutedAttentionConfig::new(DIM, heavy, heavy)
        .with_light_heads(HEADS)
        .with_light_dim_head(DIM_HEAD)
        .with_light_window_size(128)
        .with_heavy_heads(HEADS)
        .with_heavy_dim_head(DIM_HEAD)
        .with_router(router.clone());
    let feed_forward = ConditionalRoutedFeedForwardConfig::new(DIM, heavy).with_router(router);
    ConditionalRoutedTransformerBlockConfig::new(attention, feed_forward)
        .init(device)
        .context("the CoLT5 block")
}

/// One row of the table.
struct Measured {
    forward_ms: f64,
    forward_backward_ms: f64,
    forward_bytes: Option<u64>,
    forward_backward_bytes: Option<u64>,
    params: usize,
}

/// Times `forward` (`reps` runs each; on the inner backend, no autodiff) and, on autodiff,
/// `forward_backward`'s forward and the backward of sum(out · g); also the device memory
/// each takes beyond what was allocated before; with `profiler_range`, one more
/// forward+backward inside [`crate::backend::profiler_range`].
fn measure<B: AutodiffBackend>(
    device: &B::Device,
    (reps, profiler_range): (usize, bool),
    params: usize,
    x: &Tensor<B, 3>,
    g: &Tensor<B, 3>,
    forward: impl Fn(Tensor<B::InnerBackend, 3>) -> Result<Tensor<B::InnerBackend, 3>>,
    forward_backward: impl Fn(Tensor<B, 3>) -> Result<Tensor<B, 3>>,
) -> Result<Measured> {
    let run_forward = || -> Result<()> {
        drop(forward(x.clone().inner())?);
        Ok(())
    };
    let run_both = || -> Result<()> {
        let input = x.clone().detach().require_grad();
        let out = forward_backward(input)?;
        drop((out * g.clone()).sum().backward());
        Ok(())
    };
    let forward_ms = median_ms::<B>(device, reps, &run_forward)?;
    let forward_backward_ms = median_ms::<B>(device, reps, &run_both)?;
    if profiler_range {
        crate::backend::profiler_range::<B>(device, &run_both)?;
    }
    Ok(Measured {
        forward_ms,
        forward_backward_ms,
        forward_bytes: crate::backend::peak_bytes::<B>(device, &run_forward)?,
        forward_backward_bytes: crate::backend::peak_bytes::<B>(device, &run_both)?,
        params,
    })
}

/// Median milliseconds of `work` (each run ends with a device synchronisation) after two
/// warm-up runs.
fn median_ms<B: Backend>(
    device: &B::Device,
    reps: usize,
    work: &dyn Fn() -> Result<()>,
) -> Result<f64> {
    for _ in 0..2 {
        work()?;
    }
    B::sync(device).context("device synchronisation")?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        work()?;
        B::sync(device).context("device synchronisation")?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

/// Each stage of the block on inputs of its shape: (stage, fwd ms, f+b ms).
fn profile<B>(
    block: &ConditionalRoutedTransformerBlock<B>,
    seq: usize,
    x: &Tensor<B, 3>,
    g: &Tensor<B, 3>,
    device: &B::Device,
    reps: usize,
) -> Result<Vec<(&'static str, f64, f64)>>
where
    B: AutodiffBackend + CoorDescentBackend,
    B::InnerBackend: CoorDescentBackend,
{
    let heavy = seq / 16;
    let attn = &block.conditional_attn;
    let ff = &block.conditional_ff;
    let soft_top_k = CoorDescentConfig::iterations(20, 0.03, Some(4.0), 0.7).with_validate(false);
    // Each stage's input and output gradient: the block's input, its first seq/16 tokens
    // (what the heavy branches see), or one router score per token.
    let tokens = (x.clone(), g.clone());
    let routed = (x.clone().narrow(1, 0, heavy), g.clone().narrow(1, 0, heavy));
    let scores = (x.clone().narrow(2, 0, 1), g.clone().narrow(2, 0, 1));
    let routed_tokens = |output: RouterOutput<B>| output.routed_tokens.squeeze_dim::<3>(1);
    type Stage<'a, B> = (
        &'static str,
        (Tensor<B, 3>, Tensor<B, 3>),
        Box<dyn Fn(Tensor<B, 3>) -> Result<Tensor<B, 3>> + 'a>,
    );
    let stages: Vec<Stage<'_, B>> = vec![
        (
            "attention: light local attention",
            tokens.clone(),
            Box::new(|x| Ok(attn.light_attn.forward(x, None)?)),
        ),
        (
            "attention: light local attention's fused kernel alone (q = k = v = x)",
            tokens.clone(),
            Box::new(|x| {
                // The light branch's LocalMha: windows of half the light window (64), one
                // window looked at on either side, the exact band.
                let keys = Keys::Band {
                    window: 64,
                    look_backward: 1,
                    look_forward: 1,
                    exact: true,
                };
                attention_kernel_alone(x, keys)
            }),
        ),
        (
            "attention: query router",
            tokens.clone(),
            Box::new(|x| {
                Ok(routed_tokens(attn.q_router.forward(
                    x,
                    heavy,
                    RouteOptions::default(),
                )?))
            }),
        ),
        (
            "attention: heavy attention (routed tokens)",
            routed.clone(),
            Box::new(|q: Tensor<B, 3>| {
                let context = Some(q.clone().unsqueeze_dim::<4>(1));
                let inputs = AttentionInputs {
                    context,
                    ..Default::default()
                };
                Ok(attn.heavy_attn.forward(q, inputs)?)
            }),
        ),
        (
            "attention: heavy attention's fused kernel alone (q = k = v = routed tokens)",
            routed.clone(),
            Box::new(|x| attention_kernel_alone(x, Keys::All)),
        ),
        (
            "attention: whole layer",
            tokens.clone(),
            Box::new(|x| Ok(attn.forward(x, None)?)),
        ),
        (
            "feed-forward: light",
            tokens.clone(),
            Box::new(|x| Ok(ff.light_ff.forward(x))),
        ),
        (
            "feed-forward: router",
            tokens.clone(),
            Box::new(|x| {
                Ok(routed_tokens(ff.router.forward(
                    x,
                    heavy,
                    RouteOptions::default(),
                )?))
            }),
        ),
        (
            "feed-forward: heavy (routed tokens)",
            routed,
            Box::new(|x| Ok(ff.heavy_ff.forward(x))),
        ),
        (
            "feed-forward: whole layer",
            tokens,
            Box::new(|x| Ok(ff.forward(x, None, None)?)),
        ),
        (
            "soft top-k of one row",
            scores.clone(),
            Box::new(|s: Tensor<B, 3>| {
                Ok(
                    coor_descent(s.swap_dims(1, 2), heavy as f64 * 1.125, None, &soft_top_k)?
                        .swap_dims(1, 2),
                )
            }),
        ),
    ];
    let mut rows = Vec::new();
    for (name, (input, grad), stage) in &stages {
        let forward = || -> Result<()> {
            drop(stage(input.clone().detach())?);
            Ok(())
        };
        let forward_backward = || -> Result<()> {
            let out = stage(input.clone().detach().require_grad())?;
            // Routers return fewer tokens than they take: g is cut to the output's shape.
            let [_, n, d] = out.dims();
            drop(
                (out * grad.clone().narrow(1, 0, n).narrow(2, 0, d))
                    .sum()
                    .backward(),
            );
            Ok(())
        };
        let times = median_ms::<B>(device, reps, &forward)
            .and_then(|f| Ok((f, median_ms::<B>(device, reps, &forward_backward)?)));
        match times {
            Ok((forward_ms, forward_backward_ms)) => {
                rows.push((*name, forward_ms, forward_backward_ms))
            }
            Err(error) => println!("profile stage {name}: {error:#}"),
        }
    }
    let scores = scores.0.inner().reshape([1, seq]);
    let top_k_ms = median_ms::<B>(device, reps, &|| {
        drop(top_k_indices(scores.clone(), heavy)?);
        Ok(())
    })?;
    rows.push((
        "top-k selection of one row (no gradient)",
        top_k_ms,
        f64::NAN,
    ));
    Ok(rows)
}

/// The fused attention on `x` (`[1, n, heads · dim_head]`) as queries, keys and values:
/// the kernels' share of an attention stage.
fn attention_kernel_alone<B: AttentionBackend>(
    x: Tensor<B, 3>,
    keys: Keys,
) -> Result<Tensor<B, 3>> {
    let [batch, n, _] = x.dims();
    let heads = x.reshape([batch, n, HEADS, DIM_HEAD]).swap_dims(1, 2);
    let spec = FusedAttention {
        keys,
        causal: false,
        scale: (DIM_HEAD as f64).powf(-0.5),
    };
    let out = fused_attention(heads.clone(), heads.clone(), heads, None, &spec)
        .context("this backend has no fused attention")?;
    Ok(out.swap_dims(1, 2).reshape([batch, n, HEADS * DIM_HEAD]))
}

/// Whether the backend attends without materialising the logits.
fn has_fused_attention<B: AttentionBackend>(device: &B::Device) -> bool {
    let probe = Tensor::<B, 4>::zeros([1, 1, 1, DIM_HEAD], device);
    let spec = FusedAttention {
        keys: Keys::All,
        causal: false,
        scale: 1.0,
    };
    fused_attention(probe.clone(), probe.clone(), probe, None, &spec).is_some()
}

/// x + MHA(LN(x)), then x + FF(LN(x)): bench_block.py's `DenseBlock`.
#[derive(Module, Debug)]
struct DenseBlock<B: Backend> {
    norm1: LayerNorm<B>,
    norm2: LayerNorm<B>,
    to_qkv: Linear<B>,
    to_out: Linear<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
}

impl<B: AttentionBackend> DenseBlock<B> {
    fn new(device: &B::Device) -> Self {
        let inner = HEADS * DIM_HEAD;
        DenseBlock {
            norm1: LayerNormConfig::new(DIM).init(device),
            norm2: LayerNormConfig::new(DIM).init(device),
            to_qkv: LinearConfig::new(DIM, 3 * inner)
                .with_bias(false)
                .init(device),
            to_out: LinearConfig::new(inner, DIM).with_bias(false).init(device),
            ff_in: LinearConfig::new(DIM, 4 * DIM).init(device),
            ff_out: LinearConfig::new(4 * DIM, DIM).init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, n, _] = x.dims();
        let qkv = self
            .to_qkv
            .forward(self.norm1.forward(x.clone()))
            .reshape([batch, n, 3, HEADS, DIM_HEAD]);
        let part = |i| {
            qkv.clone()
                .narrow(2, i, 1)
                .reshape([batch, n, HEADS, DIM_HEAD])
                .swap_dims(1, 2)
        };
        let out = AttendConfig::new()
            .init()
            .forward(part(0), part(1), part(2), None)
            .expect("q, k and v of one shape");
        let x = x + self
            .to_out
            .forward(out.swap_dims(1, 2).reshape([batch, n, HEADS * DIM_HEAD]));
        let hidden = gelu(self.ff_in.forward(self.norm2.forward(x.clone())));
        x + self.ff_out.forward(hidden)
    }
}

/// Checks the CoLT5 block's configuration on CPU at a small length (the command's logic).
#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    #[test]
    fn the_benchmark_blocks_run_and_time_on_cpu() {
        type B = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let x = Tensor::<B, 3>::random([1, 256, DIM], Distribution::Normal(0.0, 1.0), &device);
        let block = colt5_block::<B>(256, &device).unwrap();
        let inference = block.valid();
        let m = measure::<B>(
            &device,
            (1, false),
            block.num_params(),
            &x,
            &x,
            |x| Ok(inference.forward(x, None)?),
            |x| Ok(block.forward(x, None)?),
        )
        .unwrap();
        assert!(m.forward_ms > 0.0 && m.forward_backward_ms > 0.0);
        assert!(m.params > 3_000_000);
        let dense = DenseBlock::<B>::new(&device);
        assert_eq!(dense.forward(x).dims(), [1, 256, DIM]);
    }
}
