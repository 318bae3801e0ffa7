//! `colt5 bench matmul`: the matrix products of the CoLT5 block (forward, input gradient,
//! weight gradient) under each of CubeCL's matmul strategies and on cuBLAS (as
//! `colt5::matmul` runs them), against the one burn picks.

use anyhow::Result;

use crate::backend::Precision;

/// Arguments of `colt5 bench matmul`.
#[derive(clap::Args, Debug)]
pub struct MatmulArgs {
    /// Tokens of the block's sequence (the products' long dimension).
    #[arg(long, default_value_t = 65536)]
    tokens: usize,
    /// Timed runs per strategy and shape (the median is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Element type of the operands and the output.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

/// One product `[batch, m, k] · [batch or 1, k, n]` of the block, with operands given
/// transposed where the layer's backward takes them so.
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug)]
struct Product {
    name: &'static str,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    /// The left operand is stored `[batch, k, m]` (a weight gradient's xᵀ).
    lhs_transposed: bool,
    /// The right operand is stored `[n, k]` (an input gradient's Wᵀ).
    rhs_transposed: bool,
    /// The right operand is one matrix shared by every batch (a weight).
    rhs_shared: bool,
}

/// The products of the light branches (every token) and of the heavy feed-forward (a
/// sixteenth of them) at `tokens` tokens, as `crate::linear` feeds them to burn: tokens in
/// chunks of 2 048.
#[cfg(feature = "cuda")]
fn products(tokens: usize) -> Vec<Product> {
    let chunk = 2048;
    let linear = |name, rows: usize, d_in, d_out| {
        let (batch, m) = (rows / chunk, chunk);
        [
            Product {
                name,
                batch,
                m,
                k: d_in,
                n: d_out,
                lhs_transposed: false,
                rhs_transposed: false,
                rhs_shared: true,
            },
            Product {
                name: "  its input gradient dy·Wᵀ",
                batch,
                m,
                k: d_out,
                n: d_in,
                lhs_transposed: false,
                rhs_transposed: true,
                rhs_shared: true,
            },
            Product {
                name: "  its weight gradient xᵀ·dy (per chunk)",
                batch,
                m: d_in,
                k: m,
                n: d_out,
                lhs_transposed: true,
                rhs_transposed: false,
                rhs_shared: false,
            },
        ]
    };
    let mut all = Vec::new();
    all.extend(linear("light qkv x·W (512 → 1 536)", tokens, 512, 1536));
    all.extend(linear("light out (512 → 512)", tokens, 512, 512));
    all.extend(linear("light ff in (512 → 256)", tokens, 512, 256));
    if tokens / 16 >= chunk {
        all.extend(linear("heavy ff in (512 → 2 048)", tokens / 16, 512, 2048));
    }
    all.push(Product {
        name: "light qkv x·W unchunked",
        batch: 1,
        m: tokens,
        k: 512,
        n: 1536,
        lhs_transposed: false,
        rhs_transposed: false,
        rhs_shared: true,
    });
    all
}

/// Runs `colt5 bench matmul`.
pub fn run(args: &MatmulArgs) -> Result<()> {
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(
        args.tokens >= 2048 && args.tokens % 2048 == 0,
        "--tokens must be a multiple of 2 048"
    );
    cuda::run(args)
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn run(_args: &super::MatmulArgs) -> anyhow::Result<()> {
        anyhow::bail!("`colt5 bench matmul` times CUDA kernels: rebuild with `--features cuda`")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use anyhow::{Context, Result};
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Distribution, Tensor, TensorPrimitive};
    use burn_cubecl::kernel::matmul::init_matmul_output;
    use burn_cubecl::tensor::CubeTensor;
    use colt5::matmul::MatmulBackend;
    use cubecl::cuda::CudaRuntime;
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::{launch_ref, Strategy};
    use cubek::std::InputBinding;

    use super::{products, MatmulArgs, Product};
    use crate::backend::Precision;

    /// The strategies tried, each with its inferred blueprint.
    fn strategies() -> Vec<Strategy> {
        vec![
            Strategy::SimpleCyclicCmma(Default::default()),
            Strategy::SimpleCyclicMma(Default::default()),
            Strategy::SimpleStridedMma(Default::default()),
            Strategy::SimpleTilewiseMma(Default::default()),
            Strategy::SimpleAsyncCyclicMma(Default::default()),
            Strategy::SimpleAsyncStridedMma(Default::default()),
            Strategy::SimpleTmaCmma(Default::default()),
            Strategy::SimpleTmaMma(Default::default()),
            Strategy::DoubleCyclicCmma(Default::default()),
            Strategy::DoubleCyclicMma(Default::default()),
            Strategy::DoubleTilewiseMma(Default::default()),
            Strategy::DoubleHybridMma(Default::default()),
            Strategy::DoubleAsyncCyclicMma(Default::default()),
            Strategy::DoubleAsyncStridedMma(Default::default()),
            Strategy::DoubleTmaCmma(Default::default()),
            Strategy::DoubleTmaMma(Default::default()),
            Strategy::SpecializedCyclicMma(Default::default()),
            Strategy::SpecializedStridedMma(Default::default()),
            Strategy::SpecializedTmaCmma(Default::default()),
            Strategy::SpecializedTmaMma(Default::default()),
            Strategy::OrderedDoubleCmma(Default::default()),
            Strategy::OrderedDoubleMma(Default::default()),
            Strategy::SimpleUnit(Default::default()),
            Strategy::DoubleUnit(Default::default()),
        ]
    }

    pub fn run(args: &MatmulArgs) -> Result<()> {
        crate::backend::configure_kernel_caches();
        match args.precision {
            Precision::F32 => run_in::<Cuda>(args),
            Precision::Bf16 => run_in::<Cuda<burn::tensor::bf16>>(args),
        }
    }

    fn primitive<B: Backend<FloatTensorPrimitive = CubeTensor<CudaRuntime>>>(
        t: Tensor<B, 3>,
    ) -> CubeTensor<CudaRuntime> {
        match t.into_primitive() {
            TensorPrimitive::Float(t) => t,
            TensorPrimitive::QFloat(_) => unreachable!("float tensors"),
        }
    }

    fn run_in<B>(args: &MatmulArgs) -> Result<()>
    where
        B: MatmulBackend<Device = CudaDevice, FloatTensorPrimitive = CubeTensor<CudaRuntime>>,
    {
        let device = CudaDevice::default();
        println!(
            "{} tokens, {}; ms are medians of {} runs; error is max |C − C_burn| / max |C_burn|",
            args.tokens,
            args.precision.reference_name(),
            args.reps
        );
        println!("| product | batch × m × k × n | strategy | ms | TFLOP/s | error |");
        println!("|---|---|---|---|---|---|");
        for product in products(args.tokens) {
            let Product { batch, m, k, n, .. } = product;
            let normal = Distribution::Normal(0.0, 1.0);
            let lhs = match product.lhs_transposed {
                true => Tensor::<B, 3>::random([batch, k, m], normal, &device).swap_dims(1, 2),
                false => Tensor::<B, 3>::random([batch, m, k], normal, &device),
            };
            let rhs_batch = if product.rhs_shared { 1 } else { batch };
            let rhs = match product.rhs_transposed {
                true => Tensor::<B, 3>::random([rhs_batch, n, k], normal, &device).swap_dims(1, 2),
                false => Tensor::<B, 3>::random([rhs_batch, k, n], normal, &device),
            };
            let flops = 2.0 * (batch * m * k * n) as f64;
            let shape = format!("{batch} × {m} × {k} × {n}");
            let expected = lhs.clone().matmul(rhs.clone());
            let burn_ms = median_ms::<B>(&device, args.reps, &|| {
                drop(lhs.clone().matmul(rhs.clone()));
            })?;
            println!(
                "| {} | {shape} | burn's (`lhs.matmul(rhs)`) | {burn_ms:.3} | {:.1} | 0 |",
                product.name,
                flops / burn_ms / 1e9
            );
            match cublas_row(&product, &lhs, &rhs, &expected, &device, args.reps)? {
                Some((ms, error)) => println!(
                    "| | | cuBLAS (`colt5::matmul`, unchunked) | {ms:.3} | {:.1} | {error:.1e} |",
                    flops / ms / 1e9
                ),
                None => println!("| | | cuBLAS (`colt5::matmul`, unchunked) | – | – | not taken |"),
            }
            let expected = values(expected);
            let scale = expected.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
            for strategy in strategies() {
                let launch = || -> Result<Tensor<B, 3>> {
                    let (l, r) = (primitive(lhs.clone()), primitive(rhs.clone()));
                    let out = init_matmul_output(&l, &r, l.dtype);
                    let client = out.client.clone();
                    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
                        lhs: l.dtype.into(),
                        rhs: r.dtype.into(),
                        out: out.dtype.into(),
                    });
                    let (ld, rd) = (l.dtype.into(), r.dtype.into());
                    launch_ref(
                        &strategy,
                        &client,
                        InputBinding::new(l.binding(), ld),
                        InputBinding::new(r.binding(), rd),
                        out.clone().binding(),
                        &mut dtypes,
                    )
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
                };
                let row = quiet(|| {
                    let out = values(launch()?);
                    let error = out
                        .iter()
                        .zip(&expected)
                        .fold(0.0f64, |a, (x, y)| a.max((x - y).abs()))
                        / scale;
                    let ms = median_ms::<B>(&device, args.reps, &|| {
                        drop(launch());
                    })?;
                    Ok((ms, error))
                });
                match row {
                    Ok((ms, error)) => println!(
                        "| | | {strategy} | {ms:.3} | {:.1} | {error:.1e} |",
                        flops / ms / 1e9
                    ),
                    Err(error) => {
                        let first = format!("{error:#}");
                        let first: String = first
                            .lines()
                            .next()
                            .unwrap_or("")
                            .chars()
                            .take(90)
                            .collect();
                        println!("| | | {strategy} | – | – | unavailable: {first} |")
                    }
                }
            }
        }
        Ok(())
    }

    /// The product as `colt5::matmul` runs it on cuBLAS, one matrix product over every
    /// token (a weight gradient summed over the chunks in the product itself): median ms
    /// and error against burn's, or `None` where cuBLAS does not take it.
    fn cublas_row<B>(
        product: &Product,
        lhs: &Tensor<B, 3>,
        rhs: &Tensor<B, 3>,
        expected: &Tensor<B, 3>,
        device: &CudaDevice,
        reps: usize,
    ) -> Result<Option<(f64, f64)>>
    where
        B: MatmulBackend<Device = CudaDevice, FloatTensorPrimitive = CubeTensor<CudaRuntime>>,
    {
        let Product { batch, m, k, n, .. } = *product;
        let (a, b, transpose, expected) = match (product.lhs_transposed, product.rhs_shared) {
            (false, true) => {
                let b = match product.rhs_transposed {
                    true => rhs.clone().swap_dims(1, 2).reshape([n, k]),
                    false => rhs.clone().reshape([k, n]),
                };
                let a = lhs.clone().reshape([batch * m, k]);
                let expected = expected.clone().reshape([batch * m, n]);
                (a, b, [false, product.rhs_transposed], expected)
            }
            (true, false) => {
                let a = lhs.clone().swap_dims(1, 2).reshape([batch * k, m]);
                let b = rhs.clone().reshape([batch * k, n]);
                let expected = expected.clone().sum_dim(0).reshape([m, n]);
                (a, b, [true, false], expected)
            }
            _ => return Ok(None),
        };
        let gemm = || {
            B::gemm(
                a.clone().into_primitive().tensor(),
                b.clone().into_primitive().tensor(),
                transpose,
            )
        };
        let Some(out) = gemm() else {
            return Ok(None);
        };
        let out: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(out));
        let (out, expected) = (values(out.unsqueeze()), values(expected.unsqueeze()));
        let scale = expected.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
        let error = out
            .iter()
            .zip(&expected)
            .fold(0.0f64, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        let ms = median_ms::<B>(device, reps, &|| drop(gemm()))?;
        Ok(Some((ms, error)))
    }

    /// `work` with panics turned into errors and their messages kept off the terminal.
    fn quiet<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        std::panic::set_hook(hook);
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                anyhow::bail!("panicked: {message}")
            }
        }
    }

    fn values<B: Backend>(t: Tensor<B, 3>) -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap_or_default()
    }

    fn median_ms<B: Backend>(device: &B::Device, reps: usize, work: &dyn Fn()) -> Result<f64> {
        let sync = || B::sync(device).context("device synchronisation");
        for _ in 0..2 {
            work();
        }
        sync()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let started = Instant::now();
            work();
            sync()?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }
}
