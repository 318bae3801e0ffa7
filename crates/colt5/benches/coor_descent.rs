//! CPU timings of the coordinate-descent soft top-k, forward and forward + backward, on the
//! router and attention shapes (k = cols/8, 20 iterations of the router schedule).
//!
//! Run: `cargo bench -p colt5 --bench coor_descent`. Before timing, prints the size of the
//! state each shape keeps for the backward pass.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorPrimitive};
use colt5::coor_descent::{coor_descent, CoorDescentBackend, CoorDescentConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

type Cpu = NdArray<f32>;
type CpuGrad = Autodiff<NdArray<f32>>;

const SHAPES: [(usize, usize); 3] = [(16, 16384), (64, 32768), (8192, 2048)];

fn config() -> CoorDescentConfig {
    // Hot loop: inputs are known to be valid.
    CoorDescentConfig::iterations(20, 0.03, Some(4.0), 0.7).with_validate(false)
}

fn saved_state_bytes(rows: usize, cols: usize) -> usize {
    let device = Default::default();
    let scores = Tensor::<Cpu, 2>::random([rows, cols], Distribution::Normal(0.0, 3.0), &device);
    let k = Tensor::<Cpu, 2>::full([rows, 1], cols as f64 / 8.0, &device);
    let (_, thresholds, _) = Cpu::coor_descent_solve(
        scores.into_primitive().tensor(),
        k.into_primitive().tensor(),
        None,
        &config(),
    );
    let thresholds = Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(thresholds));
    thresholds.shape().num_elements() * std::mem::size_of::<f32>()
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    Cpu::seed(&device, 0);
    for (rows, cols) in SHAPES {
        println!(
            "{rows}x{cols}: state kept for the backward pass = {} bytes",
            saved_state_bytes(rows, cols)
        );
    }
    let mut group = c.benchmark_group("coor_descent_cpu");
    group.sample_size(10);
    for (rows, cols) in SHAPES {
        let k = cols as f64 / 8.0;
        let id = format!("{rows}x{cols}");
        let scores =
            Tensor::<Cpu, 2>::random([rows, cols], Distribution::Normal(0.0, 3.0), &device);
        group.bench_with_input(BenchmarkId::new("forward", &id), &scores, |b, scores| {
            b.iter(|| {
                let y = coor_descent(scores.clone(), k, None, &config()).unwrap();
                y.into_data()
            })
        });
        let scores = Tensor::<CpuGrad, 2>::from_data(scores.into_data(), &device);
        let cotangent =
            Tensor::<CpuGrad, 2>::random([rows, cols], Distribution::Normal(0.0, 1.0), &device);
        group.bench_with_input(
            BenchmarkId::new("forward_backward", &id),
            &scores,
            |b, scores| {
                b.iter(|| {
                    let scores = scores.clone().require_grad();
                    let y = coor_descent(scores.clone(), k, None, &config()).unwrap();
                    let grads = (y * cotangent.clone()).sum().backward();
                    scores.grad(&grads).unwrap().into_data()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
