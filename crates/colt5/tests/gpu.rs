//! The models on a CubeCL GPU backend against the CPU implementation: the causal routed
//! attention (keys routed per window among all earlier tokens) and the CoLT5 LM, outputs
//! and parameter gradients, from the same weights; the CD-attention LM's cached decoding.
//!
//! Built with `--features wgpu` (lavapipe in CI) or `--features cuda` (an NVIDIA GPU):
//! `cargo test -p colt5 --features cuda --test gpu`.
#![cfg(any(feature = "cuda", feature = "wgpu"))]

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use colt5::coor_descent::CoorDescentBackend;
use colt5::import::StateDict;
use colt5::lm::{
    next_token_loss, CdTransformerConfig, Colt5Transformer, Colt5TransformerConfig, LanguageModel,
    SamplerConfig,
};
use std::sync::Mutex;

mod common;
use common::{data, normals, relative_error, tensor, Cpu, Gpu};

/// Relative tolerances: a layer's output, the loss, the parameter gradients. CubeCL runs
/// f32 matrix products on CUDA tensor cores in TF32 (10-bit mantissas, ~3e-4 relative), and
/// the perturbed router scores can reorder nearly tied tokens at a routing boundary, which
/// moves the gradients of the few entries involved; lavapipe computes in plain f32.
#[cfg(feature = "cuda")]
const TOLERANCE: (f64, f64, f64) = (2e-3, 1e-4, 5e-2);
#[cfg(not(feature = "cuda"))]
const TOLERANCE: (f64, f64, f64) = (1e-4, 1e-4, 1e-3);

/// A CoLT5 LM with several windows, routed queries, keys among earlier windows and routed
/// feed-forward tokens.
fn config() -> Colt5TransformerConfig {
    Colt5TransformerConfig::new(64, 32, 96, 2)
        .with_window_size(16)
        .with_heads(2)
        .with_dim_head(16)
        .with_num_heavy_tokens_q(Some(8))
        .with_num_heavy_tokens_kv(12)
        .with_num_heavy_ff_tokens(4)
}

/// The CPU model, initialised from a fixed seed. Routing is discontinuous: a router score
/// within rounding of a selection threshold (or of saturating at exactly 1, where ties are
/// broken by position) can be routed on one backend and not on the other, and its token's
/// output then differs at full scale. The CPU solves the soft top-k in f64 and the kernels in
/// f32, so a fresh random model meets such a token in some draws; this seed's model meets
/// none on lavapipe, so the comparison measures the arithmetic.
fn cpu_model() -> Colt5Transformer<Cpu> {
    let device = Default::default();
    let _turn = CPU_RANDOM_NUMBERS.lock().unwrap();
    <Cpu as burn::tensor::backend::Backend>::seed(&device, 5);
    config().init::<Cpu>(&device).unwrap()
}

/// The CPU backend draws its random numbers from one global generator: tests that initialise
/// CPU modules take turns, so that [`cpu_model`]'s seeded draw is not interleaved with others.
static CPU_RANDOM_NUMBERS: Mutex<()> = Mutex::new(());

/// `target` (a freshly built module on another backend) with the weights of `source`,
/// through the state dict the importer reads.
fn transfer<A: Backend, B: Backend, S: Module<A>, T: Module<B>>(source: &S, target: T) -> T {
    StateDict::from_module(source).load_into(target).unwrap()
}

/// Each layer of the LM's block on its own, outputs against the CPU.
fn check_layers(model: &Colt5Transformer<Cpu>, gpu: &Colt5Transformer<Gpu>) {
    let block = &model.layers[0];
    let gpu_block = &gpu.layers[0];
    let gpu_weights = data(gpu_block.attention.light_attn.to_qkv.weight.val());
    let cpu_weights = data(block.attention.light_attn.to_qkv.weight.val());
    assert_eq!(gpu_weights, cpu_weights, "the weights were not transferred");
    let x = tensor::<Cpu, 3>(3, [2, 90, 32]);
    let y = tensor::<Gpu, 3>(3, [2, 90, 32]);
    let light = relative_error(
        &data(
            gpu_block
                .attention
                .light_attn
                .forward(y.clone(), None)
                .unwrap(),
        ),
        &data(block.attention.light_attn.forward(x.clone(), None).unwrap()),
    );
    let attention = relative_error(
        &data(gpu_block.attention.forward(y.clone(), false).unwrap()),
        &data(block.attention.forward(x.clone(), false).unwrap()),
    );
    let feed_forward = relative_error(
        &data(
            gpu_block
                .feed_forward
                .forward(y.narrow(1, 0, 80).reshape([10, 16, 32]), None, None)
                .unwrap(),
        ),
        &data(
            block
                .feed_forward
                .forward(x.narrow(1, 0, 80).reshape([10, 16, 32]), None, None)
                .unwrap(),
        ),
    );
    println!("light attention {light:.2e}, routed attention {attention:.2e}, routed feed-forward {feed_forward:.2e}");
    assert!(light.max(attention).max(feed_forward) < TOLERANCE.0);
}

/// The loss and the gradient of each parameter (in module order).
fn run<B: AutodiffBackend + CoorDescentBackend>(
    model: &Colt5Transformer<B>,
    ids: &[i64],
    len: usize,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let device = Default::default();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [2, len]), &device);
    let loss = next_token_loss(model, tokens).unwrap();
    let grads = loss.backward();
    let mut gradients = Vec::new();
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        out: &'a mut Vec<Vec<f64>>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.out
                    .push(g.into_data().convert::<f64>().to_vec::<f64>().unwrap());
            }
        }
    }
    model.visit(&mut Collect::<B> {
        grads: &grads,
        out: &mut gradients,
    });
    let loss = vec![f64::from(loss.into_scalar().elem::<f32>())];
    (loss, gradients)
}

/// One test, so that the seeded draw of the CPU model is the only use of the CPU backend's
/// random numbers in this binary.
#[test]
fn colt5_lm_on_the_gpu_matches_the_cpu() {
    let cpu = cpu_model();
    let gpu = transfer(&cpu, config().init::<Gpu>(&Default::default()).unwrap());
    check_layers(&cpu, &gpu);
    // 2 sequences of 90 tokens (6 windows, the last one partial) and their next tokens.
    let len = 91;
    let ids: Vec<i64> = normals(11, 2 * len, 1.0)
        .iter()
        .map(|v| ((v.abs() * 1e4) as i64) % 64)
        .collect();
    let (loss_cpu, grads_cpu) = run(&cpu, &ids, len);
    let (loss_gpu, grads_gpu) = run(&gpu, &ids, len);
    let loss_error = relative_error(&loss_gpu, &loss_cpu);
    let grad_error = relative_error(&grads_gpu.concat(), &grads_cpu.concat());
    // Each parameter's gradient on its own scale, to tell a rounding drift (every parameter
    // a little) from a token routed differently (a few parameters at full scale).
    for (i, (gpu, cpu)) in grads_gpu.iter().zip(&grads_cpu).enumerate() {
        let error = relative_error(gpu, cpu);
        if error > TOLERANCE.2 / 10.0 {
            println!(
                "parameter {i} ({} entries): gradient {error:.2e}",
                cpu.len()
            );
        }
    }
    println!("loss {loss_cpu:?} vs {loss_gpu:?}: {loss_error:.2e}; gradients {grad_error:.2e}");
    assert!(loss_error < TOLERANCE.1, "loss: {loss_error:.2e}");
    assert!(grad_error < TOLERANCE.2, "gradients: {grad_error:.2e}");
}

/// The CD-attention LM's cached decoder on the GPU (a batch of prompts of different lengths,
/// left-padded, keys and values written in place into preallocated caches, and past
/// `seq_len` the recomputed window) against the CPU model's uncached forward on each row,
/// the logits of every step. The rows grow by the tokens the CPU samples, so both sides see
/// the same sequences; equal logits give equal samples except where TF32 rounding meets a
/// sampling boundary, which the tolerance covers and a token comparison would not.
#[test]
fn cd_lm_cached_decoding_on_the_gpu_matches_the_cpu() {
    let config = CdTransformerConfig::new(64, 32, 24, 2)
        .with_heads(2)
        .with_dim_head(16)
        .with_attn_use_coor_descent(true)
        .with_ff_use_coor_descent(true)
        .with_ff_coor_descent_sparsity_k(16.0)
        .with_attn_null_kv(2)
        .with_learned_sparsity_k(true)
        .with_attn_coor_descent_sparsity_k(3.0);
    let gpu = config.init::<Gpu>(&Default::default()).unwrap();
    let cpu = {
        let _turn = CPU_RANDOM_NUMBERS.lock().unwrap();
        transfer(&gpu, config.init::<Cpu>(&Default::default()).unwrap())
    };
    let mut rows: Vec<Vec<i64>> = vec![
        vec![5],
        (0..14).map(|i| (i * 11 % 64) as i64).collect(),
        vec![9, 1, 40, 2],
    ];
    let mut samplers: Vec<_> = (0..3)
        .map(|r| SamplerConfig::new().with_seed(r).init().unwrap())
        .collect();
    let mut decoder = gpu.decoder();
    let mut worst: f64 = 0.0;
    // 16 steps: the 14-token row passes seq_len = 24 after 10.
    for step in 0..16 {
        let got = decoder.next_logits(&rows).unwrap();
        for (r, row) in rows.iter_mut().enumerate() {
            let window = &row[row.len().saturating_sub(24)..];
            let tokens = Tensor::<Cpu, 2, Int>::from_data(
                TensorData::new(window.to_vec(), [1, window.len()]),
                &Default::default(),
            );
            let logits = data(cpu.forward(tokens).unwrap());
            let want = &logits[logits.len() - 64..];
            let error = relative_error(&got[r], want);
            assert!(error < TOLERANCE.0, "row {r}, step {step}: {error:.2e}");
            worst = worst.max(error);
            row.push(samplers[r].sample(want).unwrap());
        }
    }
    println!("cached GPU decoding against the CPU forward: {worst:.2e}");
}

/// The fused layer norm and RMSNorm kernels against the CPU's tensor operations: outputs and
/// the gradients of the input, the gain and the bias, on rows of odd lengths, several
/// thousand rows (the gain's gradient summed in chunks), and an RMSNorm row of zeros (its
/// norm below eps, where the scale is constant).
#[test]
fn fused_norms_on_the_gpu_match_the_cpu() {
    use burn::module::Param;
    use colt5::norm::{LayerNormConfig, RmsNormConfig};
    fn gradients<B: AutodiffBackend + CoorDescentBackend>(
        shape: [usize; 3],
        rms: bool,
    ) -> Vec<Vec<f64>> {
        let device = Default::default();
        let dim = shape[2];
        let mut x = tensor::<B, 3>(31, shape);
        if rms {
            // A row of zeros: its norm is below eps.
            x = x.slice_assign([0..1, 0..1, 0..dim], Tensor::zeros([1, 1, dim], &device));
        }
        let x = x.require_grad();
        let g = tensor::<B, 3>(32, shape);
        let gamma = Param::from_tensor(tensor::<B, 1>(33, [dim]).add_scalar(1.0));
        let (out, parameters) = if rms {
            let mut norm = RmsNormConfig::new(dim).init::<B>(&device);
            norm.gamma = gamma;
            (norm.forward(x.clone()), vec![norm.gamma.val()])
        } else {
            let mut norm = LayerNormConfig::new(dim).init::<B>(&device);
            norm.gamma = gamma;
            norm.beta = Some(Param::from_tensor(tensor::<B, 1>(34, [dim])));
            let parameters = vec![norm.gamma.val(), norm.beta.as_ref().unwrap().val()];
            (norm.forward(x.clone()), parameters)
        };
        let grads = (out.clone() * g).sum().backward();
        let mut values = vec![data(out), data(x.grad(&grads).unwrap())];
        values.extend(parameters.iter().map(|p| data(p.grad(&grads).unwrap())));
        values
    }
    for shape in [[2, 3, 7], [1, 5, 600], [2, 2304, 64]] {
        for rms in [false, true] {
            let (gpu, cpu) = (gradients::<Gpu>(shape, rms), gradients::<Cpu>(shape, rms));
            for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
                let error = relative_error(a, b);
                let name = ["output", "input gradient", "gain gradient", "bias gradient"][i];
                println!("{shape:?}, rms {rms}: {name} {error:.2e}");
                assert!(error < 1e-4, "{shape:?}, rms {rms}: {name} {error:.2e}");
            }
        }
    }
}

/// The fused Adam step on the GPU against burn's Adam on the CPU: weights after three steps
/// from the same weights at a rising learning rate. The loss, sum(w² · c), has the same
/// gradient 2·w·c on both sides (no matrix product, whose TF32 rounding on CUDA would flip
/// the sign of Adam's update where a gradient is near 0).
#[test]
fn fused_adam_on_the_gpu_matches_burns_adam_on_the_cpu() {
    use burn::module::Param;
    use burn::optim::{GradientsParams, Optimizer};
    #[derive(Module, Debug)]
    struct Weights<B: Backend> {
        w: Param<Tensor<B, 2>>,
    }
    fn train<B: AutodiffBackend>(mut optimizer: impl Optimizer<Weights<B>, B>) -> Vec<f64> {
        let mut weights = Weights {
            w: Param::from_tensor(tensor::<B, 2>(41, [300, 70])),
        };
        let c = tensor::<B, 2>(42, [300, 70]);
        for step in 0..3 {
            let loss = (weights.w.val().powf_scalar(2.0) * c.clone()).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &weights);
            weights = optimizer.step(1e-2 * (step + 1) as f64, weights, grads);
        }
        data(weights.w.val())
    }
    let gpu = train::<Gpu>(colt5::optim::AdamConfig::new().init());
    let cpu = train::<Cpu>(burn::optim::AdamConfig::new().init());
    let error = relative_error(&gpu, &cpu);
    println!("fused Adam on the GPU against burn's on the CPU: {error:.2e}");
    assert!(error < 1e-5, "{error:.2e}");
}

/// The routed block in bf16 on CUDA (weights, activations and matrix products in bf16) against
/// the f32 CPU block with the same weights: its output and the gradient of sum(out · g) with
/// respect to its input, row by row. bf16 keeps 8 bits of mantissa (3.9e-3 relative per
/// rounding); a row agrees when it is within 4e-2 of the output's scale. A router score that
/// bf16 moves across the selection threshold routes its token differently, which changes that
/// token's row (and those it attends to) at full scale: at most a tenth of the rows may do so.
#[cfg(feature = "cuda")]
#[test]
fn bf16_routed_block_on_cuda_matches_the_f32_cpu_block() {
    use colt5::routed::{
        ConditionalRoutedAttentionConfig, ConditionalRoutedFeedForwardConfig,
        ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerBlockConfig,
    };
    type Bf16 = burn::backend::Autodiff<burn::backend::Cuda<burn::tensor::bf16>>;
    fn block<B: CoorDescentBackend>() -> ConditionalRoutedTransformerBlock<B> {
        let attention = ConditionalRoutedAttentionConfig::new(64, 32, 32)
            .with_light_heads(2)
            .with_light_dim_head(32)
            .with_light_window_size(32)
            .with_heavy_heads(2)
            .with_heavy_dim_head(32);
        let feed_forward = ConditionalRoutedFeedForwardConfig::new(64, 32);
        ConditionalRoutedTransformerBlockConfig::new(attention, feed_forward)
            .init(&Default::default())
            .unwrap()
    }
    fn output_and_input_gradient<B: AutodiffBackend + CoorDescentBackend>(
        block: &ConditionalRoutedTransformerBlock<B>,
    ) -> (Vec<f64>, Vec<f64>) {
        let x = tensor::<B, 3>(21, [2, 256, 64]).require_grad();
        let g = tensor::<B, 3>(22, [2, 256, 64]);
        let out = block.forward(x.clone(), None).unwrap();
        let grads = (out.clone() * g).sum().backward();
        (data(out), data(x.grad(&grads).unwrap()))
    }
    /// The share of 64-wide rows of `a` off `b` by more than `tolerance` of b's scale, and
    /// the largest error among the others.
    fn rows_off(a: &[f64], b: &[f64], tolerance: f64) -> (f64, f64) {
        assert!(a.iter().all(|v| v.is_finite()), "non-finite bf16 output");
        let scale = b.iter().map(|v| v.abs()).fold(1e-6, f64::max);
        let errors: Vec<f64> = a
            .chunks(64)
            .zip(b.chunks(64))
            .map(|(x, y)| {
                x.iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max)
                    / scale
            })
            .collect();
        let off = errors.iter().filter(|&&e| e > tolerance).count();
        let worst_kept = errors
            .iter()
            .copied()
            .filter(|&e| e <= tolerance)
            .fold(0.0, f64::max);
        (off as f64 / errors.len() as f64, worst_kept)
    }
    let device = Default::default();
    <Cpu as burn::tensor::backend::Backend>::seed(&device, 3);
    let cpu = {
        let _turn = CPU_RANDOM_NUMBERS.lock().unwrap();
        block::<Cpu>()
    };
    let bf16 = StateDict::from_module(&cpu)
        .load_into(block::<Bf16>())
        .unwrap();
    let (out_cpu, dx_cpu) = output_and_input_gradient(&cpu);
    let (out_bf16, dx_bf16) = output_and_input_gradient(&bf16);
    let (out_off, out_worst) = rows_off(&out_bf16, &out_cpu, 4e-2);
    let (dx_off, dx_worst) = rows_off(&dx_bf16, &dx_cpu, 4e-2);
    println!(
        "bf16 block: outputs {:.1} % of rows off, the rest ≤ {out_worst:.2e}; input gradients \
         {:.1} % off, the rest ≤ {dx_worst:.2e}",
        100.0 * out_off,
        100.0 * dx_off
    );
    assert!(out_off <= 0.1 && dx_off <= 0.1);
}
