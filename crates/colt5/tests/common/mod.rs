//! Helpers shared by the integration tests.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// The GPU backend the GPU comparisons run on: CUDA with `--features cuda`, else wgpu.
#[cfg(feature = "cuda")]
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub type Gpu = burn::backend::Autodiff<burn::backend::Cuda>;
/// The GPU backend the GPU comparisons run on: CUDA with `--features cuda`, else wgpu.
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub type Gpu = burn::backend::Autodiff<burn::backend::Wgpu>;

/// The CPU backend the GPU comparisons take as the reference.
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub type Cpu = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

/// Deterministic pseudo-random numbers (splitmix64 → uniform → Box–Muller normals).
pub fn normals(seed: u64, count: usize, scale: f64) -> Vec<f64> {
    let mut state = seed;
    let mut uniform = || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..count)
        .map(|_| {
            let (u, v) = (uniform().max(1e-300), uniform());
            scale * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

/// max |a − b| / max |b| (the golden README's measure), with max |b| floored at 1e-6: rows
/// whose outputs are all saturated at 0 or 1 have gradients near 1e-12 that f32 cannot
/// resolve, so they are compared on the scale of g (1). NaN anywhere in `a` fails.
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "non-finite GPU output");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(1e-6, f64::max);
    diff / scale
}

/// A tensor of `shape` with standard normal entries drawn by [`normals`] from `seed`: the
/// same values on every backend.
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub fn tensor<B: Backend, const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<B, D> {
    let values: Vec<f32> = normals(seed, shape.iter().product(), 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// A tensor's values as f64.
#[allow(dead_code)] // the GPU comparisons use it, not every test binary
pub fn data<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}
