//! cuBLAS products on CUDA (`colt5::matmul`) against the CPU: every transpose in f32 (TF32)
//! and bf16, a linear layer's output and gradients through autodiff, and products whose
//! operands were just written (and whose result is read at once) by CubeCL kernels on
//! CubeCL's stream, which catches a missing synchronisation between the two.
//!
//! Needs an NVIDIA GPU and libcublas on `LD_LIBRARY_PATH`:
//! `cargo test -p colt5 --features cuda --test matmul`. The tests send every product to
//! cuBLAS (`COLT5_MATMUL=cublas`; by default only the largest go there).
#![cfg(feature = "cuda")]

use burn::backend::{Autodiff, Cuda, NdArray};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use colt5::matmul::{linear, MatmulBackend};

mod common;
use common::{data, normals, relative_error, tensor};

type Cpu = NdArray<f64>;

/// Every product cuBLAS takes goes to it, whatever its size (set before any product runs:
/// the mode is read once per process).
fn force_cublas() {
    std::env::set_var("COLT5_MATMUL", "cublas");
}

/// `rows × cols` normals from `seed`, rounded to bf16 first where `bf16` (so that both
/// sides multiply the same numbers).
fn values(seed: u64, rows: usize, cols: usize, bf16: bool) -> TensorData {
    let values: Vec<f32> = normals(seed, rows * cols, 1.0)
        .into_iter()
        .map(|v| {
            let v = v as f32;
            if bf16 {
                burn::tensor::bf16::from_f32(v).to_f32()
            } else {
                v
            }
        })
        .collect();
    TensorData::new(values, [rows, cols])
}

/// `op(a)·op(b)` through `MatmulBackend::gemm` on `B`, a CUDA backend, which must take the
/// product.
fn cuda_gemm<B: MatmulBackend>(a: &TensorData, b: &TensorData, transpose: [bool; 2]) -> Vec<f64> {
    let device = Default::default();
    let a = Tensor::<B, 2>::from_data(a.clone(), &device);
    let b = Tensor::<B, 2>::from_data(b.clone(), &device);
    let out = B::gemm(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
        transpose,
    )
    .expect("cuBLAS did not take the product: is libcublas on LD_LIBRARY_PATH?");
    data(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(out)))
}

/// `op(a)·op(b)` in f64 on the CPU.
fn cpu_gemm(a: &TensorData, b: &TensorData, [ta, tb]: [bool; 2]) -> Vec<f64> {
    let device = Default::default();
    let a = Tensor::<Cpu, 2>::from_data(a.clone().convert::<f64>(), &device);
    let b = Tensor::<Cpu, 2>::from_data(b.clone().convert::<f64>(), &device);
    let a = if ta { a.transpose() } else { a };
    let b = if tb { b.transpose() } else { b };
    data(a.matmul(b))
}

#[test]
fn cublas_products_match_the_cpu_for_every_transpose() {
    force_cublas();
    let (m, k, n) = (2048, 512, 1024);
    for transpose in [[false, false], [false, true], [true, false], [true, true]] {
        for bf16 in [false, true] {
            let [ta, tb] = transpose;
            let a = values(1, if ta { k } else { m }, if ta { m } else { k }, bf16);
            let b = values(2, if tb { n } else { k }, if tb { k } else { n }, bf16);
            let expected = cpu_gemm(&a, &b, transpose);
            let (got, tolerance) = if bf16 {
                (
                    cuda_gemm::<Cuda<burn::tensor::bf16>>(&a, &b, transpose),
                    1e-2,
                )
            } else {
                // TF32: operands rounded to 10-bit mantissas, sums in f32.
                (cuda_gemm::<Cuda>(&a, &b, transpose), 5e-3)
            };
            let error = relative_error(&got, &expected);
            println!("transpose {transpose:?}, bf16 {bf16}: relative error {error:.2e}");
            assert!(error < tolerance, "{transpose:?} bf16={bf16}: {error}");
        }
    }
}

#[test]
fn linear_layer_on_cublas_has_the_cpus_output_and_gradients() {
    fn run<B: burn::tensor::backend::AutodiffBackend + MatmulBackend>() -> [Vec<f64>; 4] {
        let x = tensor::<B, 3>(3, [2, 1024, 512]).require_grad();
        let w = tensor::<B, 2>(4, [512, 1024]).require_grad();
        let bias = tensor::<B, 2>(5, [1, 1024]).reshape([1024]).require_grad();
        let g = tensor::<B, 3>(6, [2, 1024, 1024]);
        let out = linear(x.clone(), w.clone(), Some(bias.clone()));
        let grads = (out.clone() * g).sum().backward();
        [
            data(out),
            data(x.grad(&grads).unwrap()),
            data(w.grad(&grads).unwrap()),
            data(bias.grad(&grads).unwrap()),
        ]
    }
    force_cublas();
    let gpu = run::<Autodiff<Cuda>>();
    let cpu = run::<Autodiff<Cpu>>();
    for (name, (got, expected)) in ["output", "dx", "dw", "dbias"]
        .iter()
        .zip(gpu.iter().zip(&cpu))
    {
        let error = relative_error(got, expected);
        println!("{name}: relative error {error:.2e}");
        assert!(error < 5e-3, "{name}: {error}");
    }
}

#[test]
fn products_see_their_operands_producers_and_their_consumers_see_the_product() {
    force_cublas();
    let device = Default::default();
    for seed in 0..4 {
        // Operands written by several CubeCL kernels just before the product (the first
        // large enough to still be running when the product is asked for), the product
        // read at once by another kernel.
        let chain = |x: Tensor<Cuda, 2>| x.mul_scalar(1.5).add_scalar(0.25).tanh().mul_scalar(2.0);
        let a = chain(Tensor::<Cuda, 2>::from_data(
            values(10 + seed, 4096, 1024, false),
            &device,
        ));
        let b = chain(Tensor::<Cuda, 2>::from_data(
            values(20 + seed, 1024, 512, false),
            &device,
        ));
        let out = <Cuda as MatmulBackend>::gemm(
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
            [false, false],
        )
        .expect("cuBLAS did not take the product: is libcublas on LD_LIBRARY_PATH?");
        let out = Tensor::<Cuda, 2>::from_primitive(TensorPrimitive::Float(out));
        let consumed = data(out.clone().mul_scalar(3.0) - out);

        let cpu_chain =
            |x: Tensor<Cpu, 2>| x.mul_scalar(1.5).add_scalar(0.25).tanh().mul_scalar(2.0);
        let a = cpu_chain(Tensor::from_data(
            values(10 + seed, 4096, 1024, false).convert::<f64>(),
            &Default::default(),
        ));
        let b = cpu_chain(Tensor::from_data(
            values(20 + seed, 1024, 512, false).convert::<f64>(),
            &Default::default(),
        ));
        let expected = data(a.matmul(b).mul_scalar(2.0));
        let error = relative_error(&consumed, &expected);
        assert!(error < 5e-3, "seed {seed}: {error}");
    }
}
