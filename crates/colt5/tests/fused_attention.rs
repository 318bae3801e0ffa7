//! The fused attention kernels (CubeCL backends) against the materialised attention of the
//! CPU backend: local attention over every kind of band and whole attention with key masks,
//! causal offsets and queries that see nothing; outputs and gradients.
//!
//! Built with `--features wgpu` (lavapipe in CI) or `--features cuda` (an NVIDIA GPU):
//! `cargo test -p colt5 --features cuda --test fused_attention`.
#![cfg(any(feature = "cuda", feature = "wgpu"))]

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Tensor, TensorData};
use colt5::attend::AttendConfig;
use colt5::fused_attention::{fused_attention, FusedAttention, Keys};
use colt5::import::StateDict;
use colt5::local_attention::{LocalMha, LocalMhaConfig};

mod common;
use common::{data, relative_error, tensor, Cpu, Gpu};

/// Relative tolerance of outputs and gradients: CubeCL's f32 matrix products run in TF32
/// on CUDA (the projections around the attention); lavapipe computes in plain f32.
#[cfg(feature = "cuda")]
const TOLERANCE: f64 = 2e-3;
#[cfg(not(feature = "cuda"))]
const TOLERANCE: f64 = 1e-4;

/// The output, then the gradients of `sum(out · g)` with respect to `leaves`.
fn output_and_gradients<B: AutodiffBackend, const D: usize>(
    out: Tensor<B, D>,
    leaves: &[Tensor<B, D>],
) -> Vec<Vec<f64>> {
    let g = tensor::<B, D>(99, out.dims());
    let grads = (out.clone() * g).sum().backward();
    let mut all = vec![data(out)];
    all.extend(leaves.iter().map(|leaf| data(leaf.grad(&grads).unwrap())));
    all
}

fn assert_close(name: &str, gpu: &[Vec<f64>], cpu: &[Vec<f64>]) {
    for (part, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        let error = relative_error(a, b);
        println!("{name}, part {part}: {error:.2e}");
        assert!(error < TOLERANCE, "{name}, part {part}: {error:.2e}");
    }
}

/// The output and the gradients of the input and both projections.
fn run_local<B: AutodiffBackend + colt5::fused_attention::AttentionBackend>(
    layer: &LocalMha<B>,
    x: Tensor<B, 3>,
) -> Vec<Vec<f64>> {
    let x = x.require_grad();
    let out = layer.forward(x.clone(), None).unwrap();
    let g = tensor::<B, 3>(99, out.dims());
    let grads = (out.clone() * g).sum().backward();
    vec![
        data(out),
        data(x.grad(&grads).unwrap()),
        data(layer.to_qkv.weight.val().grad(&grads).unwrap()),
        data(layer.to_out.weight.val().grad(&grads).unwrap()),
    ]
}

#[test]
fn local_attention_matches_the_cpu() {
    // Causal or not, exact band or whole windows, one or two windows looked back; 40 tokens
    // in windows of 16 (the last one padded).
    for (causal, exact, look_backward, dim_head) in [
        (false, true, 1, 16),
        (false, false, 1, 16),
        (true, true, 1, 16),
        (true, false, 2, 16),
        (false, true, 2, 64),
    ] {
        let config = LocalMhaConfig::new(32, 16)
            .with_heads(2)
            .with_dim_head(dim_head)
            .with_causal(causal)
            .with_exact_windowsize(exact)
            .with_look_backward(look_backward);
        let cpu = config.init::<Cpu>(&Default::default()).unwrap();
        let gpu = StateDict::from_module(&cpu)
            .load_into(config.init::<Gpu>(&Default::default()).unwrap())
            .unwrap();
        let expected = run_local(&cpu, tensor::<Cpu, 3>(1, [2, 40, 32]));
        let actual = run_local(&gpu, tensor::<Gpu, 3>(1, [2, 40, 32]));
        let name =
            format!("local causal {causal} exact {exact} back {look_backward} dim_head {dim_head}");
        assert_close(&name, &actual, &expected);
    }
}

/// q, k, v and the key mask (`[batch, 1, 1, keys]`: batch 0 sees keys 2.., batch 1 none
/// when `hide_all`) on backend `B`.
fn attend_inputs<B: Backend>(
    shape: [usize; 4],
    keys: usize,
    hide_all: bool,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>) {
    let [batch, heads, queries, dim_head] = shape;
    let q = tensor::<B, 4>(2, [batch, heads, queries, dim_head]);
    let k = tensor::<B, 4>(3, [batch, heads, keys, dim_head]);
    let v = tensor::<B, 4>(4, [batch, heads, keys, dim_head]);
    let visible: Vec<bool> = (0..batch * keys)
        .map(|at| {
            let (b, j) = (at / keys, at % keys);
            if b == 0 {
                j >= 2
            } else {
                !hide_all && j % 3 != 1
            }
        })
        .collect();
    let mask = Tensor::from_data(
        TensorData::new(visible, [batch, 1, 1, keys]),
        &Default::default(),
    );
    (q, k, v, mask)
}

fn run_attend<B: AutodiffBackend + colt5::fused_attention::AttentionBackend>(
    causal: bool,
    masked: bool,
    shape: [usize; 4],
    keys: usize,
) -> Vec<Vec<f64>> {
    let (q, k, v, mask) = attend_inputs::<B>(shape, keys, causal);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = AttendConfig::new()
        .with_causal(causal)
        .init()
        .forward(q.clone(), k.clone(), v.clone(), masked.then_some(mask))
        .unwrap();
    output_and_gradients(out, &[q, k, v])
}

#[test]
fn whole_attention_matches_the_cpu() {
    // Fewer and more queries than keys (causal: the first queries of the longer side see
    // nothing), with and without a key mask, head widths across the kernels' row splits.
    for (causal, masked, queries, keys, dim_head) in [
        (false, false, 7, 11, 16),
        (false, true, 7, 11, 16),
        (true, false, 13, 9, 16),
        (true, true, 7, 11, 64),
        (false, true, 70, 45, 48),
        (true, false, 33, 100, 128),
    ] {
        let shape = [2, 3, queries, dim_head];
        let expected = run_attend::<Cpu>(causal, masked, shape, keys);
        let actual = run_attend::<Gpu>(causal, masked, shape, keys);
        let name = format!("attend causal {causal} masked {masked} {queries}×{keys}×{dim_head}");
        assert_close(&name, &actual, &expected);
    }
}

#[test]
fn the_cpu_backend_has_no_fused_attention() {
    let q = tensor::<Cpu, 4>(1, [1, 1, 4, 8]);
    let spec = FusedAttention {
        keys: Keys::All,
        causal: false,
        scale: 1.0,
    };
    assert!(fused_attention(q.clone(), q.clone(), q, None, &spec).is_none());
}
