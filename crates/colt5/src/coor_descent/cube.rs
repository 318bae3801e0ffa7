//! CubeCL backends (CUDA, wgpu) run the iterative solver and its reverse sweep with the
//! fused kernels of `colt5-kernels`: one launch each, the thresholds (T f32 per row) the
//! only state kept between them. The converged solver runs as one kernel too (each row
//! stops on its own); its implicit-function gradient, a few elementwise operations and two
//! row sums, stays in the portable code. Top-k selection runs on the device too.

use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use colt5_kernels::{Convergence, Inputs, Rows};

use super::{
    portable_backward, portable_solve, portable_top_k_indices, CoorDescentBackend,
    CoorDescentConfig, SolveStats, Solver,
};

impl<R, F, I, BT> CoorDescentBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime + crate::matmul::RuntimeGemm,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    /// CUDA's total device memory: CubeCL's CUDA runtime sets its largest page to a quarter
    /// of it. Other runtimes do not say.
    fn device_memory(device: &Self::Device) -> Option<(u64, bool)> {
        let client = R::client(device);
        (R::name(&client) == "cuda").then(|| (4 * client.properties().memory.max_page_size, true))
    }

    fn coor_descent_solve(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, SolveStats) {
        if let Solver::Converged {
            tolerance,
            max_passes,
        } = config.solver
        {
            let convergence = Convergence {
                eps: config.eps as f32,
                tolerance: tolerance as f32,
                max_passes: max_passes.min(u32::MAX as usize) as u32,
            };
            return converged_solve::<R, F, BT>(scores, k, mask, convergence);
        }
        let Some(schedule) = fused_schedule(config) else {
            return portable_solve::<Self>(scores, k, mask, config);
        };
        let call = Call::<R>::new(scores, k, mask);
        let (output, thresholds) =
            colt5_kernels::forward::<R, F, BT>(&call.scores.client, &call.inputs(), &schedule)
                .expect("a checked schedule and shape");
        let steps = schedule.steps();
        (
            call.tensor::<F>(output, [call.shape.rows, call.shape.n]),
            call.tensor::<f32>(thresholds, [call.shape.rows, steps]),
            SolveStats { passes: steps },
        )
    }

    fn coor_descent_backward(
        scores: FloatTensor<Self>,
        k: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        thresholds: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        config: &CoorDescentConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(schedule) = fused_schedule(config) else {
            return portable_backward::<Self>(scores, k, mask, thresholds, grad, config);
        };
        let call = Call::<R>::new(scores, k, mask);
        let thresholds = into_contiguous(thresholds);
        let grad = into_contiguous(grad);
        let (d_scores, d_k) = colt5_kernels::backward::<R, F, BT>(
            &call.scores.client,
            &call.inputs(),
            &schedule,
            &thresholds.handle,
            &grad.handle,
        )
        .expect("a checked schedule and shape");
        (
            call.tensor::<F>(d_scores, [call.shape.rows, call.shape.n]),
            call.tensor::<F>(d_k, [call.shape.rows, 1]),
        )
    }

    /// The radix-select kernel of `colt5-kernels` (k up to its `MAX_TOP_K`, as far as the
    /// device's shared memory holds the selection); otherwise the host selection.
    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        let [rows, n] = values.meta.shape.dims::<2>();
        let values = into_contiguous(values);
        let Ok(indices) =
            colt5_kernels::top_k::<R, F, I>(&values.client, &values.handle, Rows { rows, n }, k)
        else {
            // k beyond the kernel's limit, or a selection the device's shared memory cannot
            // hold.
            return portable_top_k_indices::<Self>(values, k);
        };
        CubeTensor::new_contiguous(
            values.client.clone(),
            values.device.clone(),
            Shape::new([rows, k]),
            indices,
            I::dtype(),
        )
    }
}

/// The converged solver's kernel. The passes each row took are read back (one small
/// transfer) for the stats: the most any row needed.
fn converged_solve<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    scores: CubeTensor<R>,
    k: CubeTensor<R>,
    mask: Option<CubeTensor<R>>,
    convergence: Convergence,
) -> (CubeTensor<R>, CubeTensor<R>, SolveStats) {
    let call = Call::<R>::new(scores, k, mask);
    let client = &call.scores.client;
    let (output, thresholds, passes) =
        colt5_kernels::converged::<R, F, BT>(client, &call.inputs(), convergence)
            .expect("a checked shape");
    let passes = client
        .read_one(passes)
        .map(|bytes| {
            <u32 as burn_cubecl::cubecl::CubeElement>::from_bytes(&bytes)
                .iter()
                .copied()
                .max()
                .unwrap_or(0) as usize
        })
        .expect("reading the passes back from the device");
    (
        call.tensor::<F>(output, [call.shape.rows, call.shape.n]),
        call.tensor::<F>(thresholds, [call.shape.rows, 1]),
        SolveStats { passes },
    )
}

/// The kernels' schedule (eps_1..eps_T, then the output temperature) for the iterative
/// solver within the kernels' iteration limit; `None` sends the call to the portable code.
fn fused_schedule(config: &CoorDescentConfig) -> Option<colt5_kernels::Schedule> {
    let temperatures = config.temperatures()?;
    (temperatures.len() - 1 <= colt5_kernels::MAX_STEPS)
        .then(|| colt5_kernels::Schedule::from_temperatures(&temperatures))
}

/// One call's inputs, contiguous on the device.
struct Call<R: CubeRuntime> {
    scores: CubeTensor<R>,
    k: CubeTensor<R>,
    mask: Option<CubeTensor<R>>,
    shape: Rows,
}

impl<R: CubeRuntime> Call<R> {
    fn new(scores: CubeTensor<R>, k: CubeTensor<R>, mask: Option<CubeTensor<R>>) -> Self {
        let dims = scores.meta.shape.dims::<2>();
        Call {
            scores: into_contiguous(scores),
            k: into_contiguous(k),
            mask: mask.map(into_contiguous),
            shape: Rows {
                rows: dims[0],
                n: dims[1],
            },
        }
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            scores: &self.scores.handle,
            k: &self.k.handle,
            mask: self.mask.as_ref().map(|m| &m.handle),
            shape: self.shape,
        }
    }

    /// A contiguous `shape` tensor of element `E` over `handle`.
    fn tensor<E: burn_cubecl::CubeElement>(
        &self,
        handle: burn_cubecl::cubecl::server::Handle,
        shape: [usize; 2],
    ) -> CubeTensor<R> {
        CubeTensor::new_contiguous(
            self.scores.client.clone(),
            self.scores.device.clone(),
            Shape::new(shape),
            handle,
            E::dtype(),
        )
    }
}
