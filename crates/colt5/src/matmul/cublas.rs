//! The CUDA backend's large matrix products on cuBLAS (`cublasGemmEx`).
//!
//! burn 0.21's CubeCL matmul issues `mma.sync` tensor-core kernels that reach a fraction
//! of cuBLAS on Hopper, and the products of token-wise layers over long sequences are most
//! of a CoLT5 block's arithmetic. cuBLAS is loaded at run time (`libcublas.so`, as PyTorch
//! installs it; found through `LD_LIBRARY_PATH`); where it is missing every product stays
//! on CubeCL.
//!
//! CubeCL does not expose its CUDA streams, so the hand-over is by synchronisation: the
//! operands' producers are awaited (`client.sync()`), cuBLAS runs on a stream of its own,
//! and that stream is awaited before the result is handed back. Each hand-over costs
//! tens of microseconds, so only products of at least [`MIN_MULTIPLY_ADDS`] take it.
//! The GPU tests send smaller products to it too (`COLT5_MATMUL=cublas`).
//!
//! Environment: `COLT5_MATMUL` = `auto` (default: cuBLAS for large products), `cubecl`
//! (never cuBLAS) or `cublas` (every product cuBLAS takes); `COLT5_TF32=0` makes f32
//! products exact f32 arithmetic instead of TF32 tensor cores (f32 inputs rounded to 10
//! mantissa bits, accumulated in f32 — what CubeCL's f32 matmul does as well).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::OnceLock;

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublas::sys as cublas;
use cudarc::driver::{result as driver, sys as cuda};

use super::RuntimeGemm;

/// Products of fewer multiply-adds (m·n·k) than this stay on CubeCL in `auto` mode. From
/// 2³⁰ up (measured on an H100), cuBLAS made the CoLT5 block 30 % slower at 4 096 tokens
/// and the small LMs 1.3–1.8× slower, the hand-over's two synchronisations costing more
/// than the faster product saves, and the block at 65 536 tokens 2 % faster: only the
/// products of the longest sequences take it.
const MIN_MULTIPLY_ADDS: usize = 1 << 34;

/// Which products go to cuBLAS (`COLT5_MATMUL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Auto,
    Never,
    Always,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("COLT5_MATMUL").as_deref() {
        Ok("cubecl") => Mode::Never,
        Ok("cublas") => Mode::Always,
        Ok("auto") | Err(_) => Mode::Auto,
        Ok(other) => {
            tracing::warn!("COLT5_MATMUL={other} is none of auto, cubecl, cublas; using auto");
            Mode::Auto
        }
    })
}

fn tf32() -> bool {
    static TF32: OnceLock<bool> = OnceLock::new();
    *TF32.get_or_init(|| std::env::var("COLT5_TF32").as_deref() != Ok("0"))
}

/// A cuBLAS handle bound to a stream of its own on one device's primary context.
struct Library {
    context: cuda::CUcontext,
    stream: cuda::CUstream,
    handle: cublas::cublasHandle_t,
}

impl Library {
    /// cuBLAS on device `index`, or `None` (with a warning, once per thread and device)
    /// where the library cannot be loaded or initialised.
    fn open(index: usize) -> Option<Library> {
        // SAFETY: probing only loads the library.
        if !unsafe { cublas::is_culib_present() } {
            tracing::warn!("libcublas not found (LD_LIBRARY_PATH): matrix products stay on CubeCL");
            return None;
        }
        let opened = (|| -> Result<Library, String> {
            driver::init().map_err(|e| e.to_string())?;
            let device = driver::device::get(index as i32).map_err(|e| e.to_string())?;
            // SAFETY: `device` is a valid device; CubeCL runs on the same primary context.
            let context =
                unsafe { driver::primary_ctx::retain(device) }.map_err(|e| e.to_string())?;
            unsafe { driver::ctx::set_current(context) }.map_err(|e| e.to_string())?;
            let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
                .map_err(|e| e.to_string())?;
            let handle = cudarc::cublas::result::create_handle().map_err(|e| e.to_string())?;
            // SAFETY: both were just created on this context.
            unsafe { cudarc::cublas::result::set_stream(handle, stream as cublas::cudaStream_t) }
                .map_err(|e| e.to_string())?;
            Ok(Library {
                context,
                stream,
                handle,
            })
        })();
        opened
            .map_err(|e| tracing::warn!("cuBLAS unavailable ({e}): matrix products stay on CubeCL"))
            .ok()
    }
}

thread_local! {
    /// cuBLAS handles are not shared between threads: one per thread and device.
    static LIBRARIES: RefCell<HashMap<usize, Option<Library>>> = RefCell::new(HashMap::new());
}

/// `f` on this thread's cuBLAS for device `index`, with its context current; `None` where
/// cuBLAS is unavailable.
fn with_library<T>(index: usize, f: impl FnOnce(&Library) -> Option<T>) -> Option<T> {
    LIBRARIES.with(|libraries| {
        let mut libraries = libraries.borrow_mut();
        let library = libraries
            .entry(index)
            .or_insert_with(|| Library::open(index))
            .as_ref()?;
        // SAFETY: the context was retained when the library was opened and never released.
        unsafe { driver::ctx::set_current(library.context) }.ok()?;
        f(library)
    })
}

/// The cuBLAS element type and compute type of `dtype`, or `None` where cuBLAS is not used.
fn types(dtype: DType) -> Option<(cublas::cudaDataType, cublas::cublasComputeType_t)> {
    use cublas::cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
    use cublas::cudaDataType::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
    match dtype {
        DType::F32 if tf32() => Some((CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32)),
        DType::F32 => Some((CUDA_R_32F, CUBLAS_COMPUTE_32F)),
        DType::BF16 => Some((CUDA_R_16BF, CUBLAS_COMPUTE_32F)),
        DType::F16 => Some((CUDA_R_16F, CUBLAS_COMPUTE_32F)),
        _ => None,
    }
}

impl RuntimeGemm for CudaRuntime {
    fn gemm(
        a: CubeTensor<Self>,
        b: CubeTensor<Self>,
        transpose: [bool; 2],
    ) -> Option<CubeTensor<Self>> {
        gemm(a, b, transpose)
    }
}

/// [`MatmulBackend::gemm`] on cuBLAS, or `None` where it does not take the call.
fn gemm(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    [transpose_a, transpose_b]: [bool; 2],
) -> Option<CubeTensor<CudaRuntime>> {
    if mode() == Mode::Never || a.dtype != b.dtype {
        return None;
    }
    let (data_type, compute_type) = types(a.dtype)?;
    let [rows_a, cols_a] = a.meta.shape.dims::<2>();
    let [rows_b, cols_b] = b.meta.shape.dims::<2>();
    let (m, k) = if transpose_a {
        (cols_a, rows_a)
    } else {
        (rows_a, cols_a)
    };
    let (k_b, n) = if transpose_b {
        (cols_b, rows_b)
    } else {
        (rows_b, cols_b)
    };
    let fits = |x: usize| x > 0 && x <= i32::MAX as usize;
    if k != k_b || ![m, n, k].into_iter().all(fits) {
        return None;
    }
    if mode() == Mode::Auto && m.saturating_mul(n).saturating_mul(k) < MIN_MULTIPLY_ADDS {
        return None;
    }
    let (a, b) = (into_contiguous(a), into_contiguous(b));
    let client = a.client.clone();
    let out = client.empty(m * n * a.dtype.size());
    let resources = (
        client.get_resource(a.handle.clone()).ok()?,
        client.get_resource(b.handle.clone()).ok()?,
        client.get_resource(out.clone()).ok()?,
    );
    let (ptr_a, ptr_b, ptr_out) = (
        resources.0.resource().ptr,
        resources.1.resource().ptr,
        resources.2.resource().ptr,
    );
    // The operands' producers (and the output's earlier users) on CubeCL's stream finish
    // before cuBLAS reads or writes them.
    burn_cubecl::cubecl::future::block_on(client.sync()).ok()?;
    with_library(a.device.index, |library| {
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS gets B
        // first, and a row-major matrix read column-major is its transpose.
        let op = |t: bool| {
            if t {
                cublas::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers are live device buffers of the shapes given (held by the
        // tensors and `resources` until the stream is synchronised below), alpha and beta
        // are f32 host values as the f32 compute types require.
        let status = unsafe {
            cublas::cublasGemmEx(
                library.handle,
                op(transpose_b),
                op(transpose_a),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                ptr_b as *const c_void,
                data_type,
                (if transpose_b { k } else { n }) as i32,
                ptr_a as *const c_void,
                data_type,
                (if transpose_a { m } else { k }) as i32,
                &beta as *const f32 as *const c_void,
                ptr_out as *mut c_void,
                data_type,
                n as i32,
                compute_type,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            tracing::warn!("cublasGemmEx failed ({status:?}) on {m}×{k}·{k}×{n}; using CubeCL");
            return None;
        }
        // SAFETY: the stream belongs to this library.
        unsafe { driver::stream::synchronize(library.stream) }.ok()
    })?;
    drop(resources);
    Some(CubeTensor::new_contiguous(
        client,
        a.device.clone(),
        Shape::new([m, n]),
        out,
        a.dtype,
    ))
}
