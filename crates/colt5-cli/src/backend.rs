//! Choosing where a command runs.

use anyhow::Result;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use colt5::coor_descent::CoorDescentBackend;

/// The devices a command can run on.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BackendKind {
    /// The CPU (burn's `Flex`: gemm matrix products, SIMD, all cores; f32).
    Cpu,
    /// The CPU through burn's `NdArray` backend (single-threaded; f32).
    Ndarray,
    /// The first CUDA GPU (requires a build with `--features cuda`).
    Cuda,
}

/// The element type of a run's weights, activations and matrix products.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Default)]
pub enum Precision {
    /// f32 everywhere (on CUDA, CubeCL's matrix products use TF32 tensor cores).
    #[default]
    F32,
    /// bf16 weights, activations and matrix products (CUDA only); the soft top-k, the
    /// attention kernels' softmax and every matrix product accumulate in f32.
    Bf16,
}

impl Precision {
    /// The name of the run's dtype in bench_block.py's tables: its `fp32`, and `bf16w`
    /// (weights and input cast to bf16, no autocast).
    pub fn reference_name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16w",
        }
    }
}

/// A command body, generic over the backend it runs on.
pub trait Job {
    /// What it returns.
    type Output;

    /// Runs on backend `B` (with autodiff; its inner backend serves inference).
    fn run<B>(self, device: &B::Device) -> Result<Self::Output>
    where
        B: AutodiffBackend + CoorDescentBackend,
        B::InnerBackend: CoorDescentBackend;
}

/// Runs `job` on the chosen backend, in f32.
pub fn run_on<J: Job>(kind: BackendKind, job: J) -> Result<J::Output> {
    run_in(kind, Precision::F32, job)
}

/// Runs `job` on the chosen backend in `precision`.
pub fn run_in<J: Job>(kind: BackendKind, precision: Precision, job: J) -> Result<J::Output> {
    match (kind, precision) {
        (BackendKind::Cpu, Precision::F32) => job.run::<Autodiff<Flex>>(&Default::default()),
        (BackendKind::Ndarray, Precision::F32) => {
            job.run::<Autodiff<NdArray<f32>>>(&Default::default())
        }
        (BackendKind::Cpu | BackendKind::Ndarray, Precision::Bf16) => {
            anyhow::bail!("--precision bf16 runs on CUDA only (use --backend cuda)")
        }
        (BackendKind::Cuda, precision) => cuda(precision, job),
    }
}

#[cfg(feature = "cuda")]
fn cuda<J: Job>(precision: Precision, job: J) -> Result<J::Output> {
    use burn::backend::{cuda::CudaDevice, Cuda};
    use burn::tensor::Tensor;
    configure_kernel_caches();
    let device = CudaDevice::default();
    // burn panics when no GPU or driver is present: probe once, with the panic message
    // silenced, and turn that into an error.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        Tensor::<Cuda, 1>::zeros([1], &device).into_scalar();
    });
    std::panic::set_hook(hook);
    if probe.is_err() {
        anyhow::bail!("no usable CUDA GPU found (is the NVIDIA driver installed?)");
    }
    match precision {
        Precision::F32 => job.run::<Autodiff<Cuda>>(&device),
        Precision::Bf16 => job.run::<Autodiff<Cuda<burn::tensor::bf16>>>(&device),
    }
}

/// Where compiled kernels (PTX) and matmul autotune results are kept between runs:
/// `$COLT5_CACHE_DIR`, else `$XDG_CACHE_HOME/colt5`, else `~/.cache/colt5`.
#[cfg(feature = "cuda")]
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    var("COLT5_CACHE_DIR")
        .map(Into::into)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| std::path::PathBuf::from(d).join("colt5")))
        .or_else(|| var("HOME").map(|d| std::path::PathBuf::from(d).join(".cache/colt5")))
}

/// Points CubeCL's kernel (PTX) cache and its autotune cache at [`kernel_cache_dir`], so
/// that NVRTC compilations and matmul tuning are paid once per machine rather than once
/// per run. Other settings come from a `cubecl.toml` as CubeCL reads it. Call before the
/// first CUDA operation; later calls do nothing.
#[cfg(feature = "cuda")]
pub fn configure_kernel_caches() {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(dir) = kernel_cache_dir() else {
            return;
        };
        if let Err(error) = std::fs::create_dir_all(&dir) {
            tracing::warn!(
                "kernel cache {} unusable ({error}); compiling afresh",
                dir.display()
            );
            return;
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(dir.clone());
        config.compilation.cache = Some(CacheConfig::File(dir));
        CubeClRuntimeConfig::set(config);
    });
}

#[cfg(not(feature = "cuda"))]
fn cuda<J: Job>(_precision: Precision, _job: J) -> Result<J::Output> {
    anyhow::bail!("this colt5 was built without CUDA support: rebuild with `--features cuda`")
}

/// The device memory `work` takes at its peak beyond what was allocated before it, on CUDA:
/// the growth of the memory CubeCL's pools reserve, from a cleaned-up pool (an upper bound
/// of the peak: pools reserve in pages). `None` on the CPU.
pub fn peak_bytes<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    work: &dyn Fn() -> Result<()>,
) -> Result<Option<u64>> {
    let Some(reserved) = reserved_bytes::<B>(device) else {
        return Ok(None);
    };
    B::sync(device).map_err(|e| anyhow::anyhow!("device synchronisation: {e:?}"))?;
    B::memory_cleanup(device);
    let before = reserved()?;
    work()?;
    B::sync(device).map_err(|e| anyhow::anyhow!("device synchronisation: {e:?}"))?;
    Ok(Some(reserved()?.saturating_sub(before)))
}

/// Runs `work` between `cuProfilerStart` and `cuProfilerStop` (after synchronising the
/// device on both sides), so that `ncu --profile-from-start off` records its kernels alone.
/// Runs it unwrapped on other backends.
pub fn profiler_range<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    work: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device synchronisation: {e:?}"));
    sync()?;
    profiler(true)?;
    let outcome = work().and_then(|()| sync());
    profiler(false)?;
    outcome
}

/// Starts (`true`) or stops CUDA's profiler; does nothing without CUDA.
#[cfg(feature = "cuda")]
fn profiler(start: bool) -> Result<()> {
    use cudarc::driver::result as driver;
    use cudarc::driver::sys::{cuProfilerStart, cuProfilerStop, CUresult};
    // The profiler toggles the current context's recording, and CubeCL does not leave its
    // context current on this thread: make the benches' device's (0) primary context current.
    let context_error = |e: cudarc::driver::DriverError| anyhow::anyhow!("CUDA context: {e}");
    driver::init().map_err(context_error)?;
    let device = driver::device::get(0).map_err(context_error)?;
    // SAFETY: `device` is valid; the primary context is the one CubeCL runs on.
    unsafe {
        driver::ctx::set_current(driver::primary_ctx::retain(device).map_err(context_error)?)
    }
    .map_err(context_error)?;
    // SAFETY: both calls take no arguments and only toggle the current context's profiler.
    let result = unsafe {
        match start {
            true => cuProfilerStart(),
            false => cuProfilerStop(),
        }
    };
    anyhow::ensure!(
        result == CUresult::CUDA_SUCCESS,
        "cuProfiler{}: {result:?}",
        if start { "Start" } else { "Stop" }
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profiler(_start: bool) -> Result<()> {
    Ok(())
}

/// `bytes` from [`peak_bytes`] in MiB for a table, "–" where not measured.
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("–".into(), |b| {
        format!("{:.0}", b as f64 / (1u64 << 20) as f64)
    })
}

/// A reader of the bytes the device's memory pools reserve, for CUDA devices.
#[cfg(feature = "cuda")]
fn reserved_bytes<B: burn::tensor::backend::Backend>(
    device: &B::Device,
) -> Option<impl Fn() -> Result<u64>> {
    use cubecl::Runtime;
    let device =
        (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()?;
    let client = cubecl::cuda::CudaRuntime::client(device);
    Some(move || {
        Ok(client
            .memory_usage()
            .map_err(|e| anyhow::anyhow!("memory usage: {e:?}"))?
            .bytes_reserved)
    })
}

#[cfg(not(feature = "cuda"))]
fn reserved_bytes<B: burn::tensor::backend::Backend>(
    _device: &B::Device,
) -> Option<fn() -> Result<u64>> {
    None
}
