//! [`MatmulBackend::gemm`](super::MatmulBackend::gemm) on `Flex` through the
//! `matrixmultiply` crate: on the CPUs we measured, its AVX2 kernels ran the wide products
//! of the models (`[1024, 256] · [256, 768]`, `· [256, 1024]`) 1.7–1.9× faster than the
//! `gemm` crate's that `Flex` uses (the AVX-512 ones need a nightly compiler), and the
//! narrow ones at about the same speed. Transposed operands are read through strides
//! (nothing is copied). Each output element sums its products in a fixed order, whatever
//! the number of threads, so results repeat bit for bit.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

/// `op(a) · op(b)` of f32 row-major matrices, or `None` for other element types.
pub(super) fn gemm(a: FlexTensor, b: FlexTensor, transpose: [bool; 2]) -> Option<FlexTensor> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return None;
    }
    let (a_dims, b_dims) = (a.layout().shape().to_vec(), b.layout().shape().to_vec());
    if a_dims.len() != 2 || b_dims.len() != 2 {
        return None;
    }
    // Row and column strides of op(x) for a row-major [rows, cols] x.
    let op = |dims: &[usize], transposed: bool| match transposed {
        false => (dims[0], dims[1], dims[1] as isize, 1isize),
        true => (dims[1], dims[0], 1isize, dims[1] as isize),
    };
    let (m, k, a_row, a_col) = op(&a_dims, transpose[0]);
    let (k_b, n, b_row, b_col) = op(&b_dims, transpose[1]);
    if k != k_b {
        return None;
    }
    let (a, b) = (a.to_contiguous(), b.to_contiguous());
    let (a_values, b_values) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
    let mut c = vec![0f32; m * n];
    if m > 0 && n > 0 {
        // SAFETY: the slices hold m·k and k·n elements laid out by the strides above, and
        // `c` holds m·n elements with row stride n.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a_values.as_ptr(),
                a_row,
                a_col,
                b_values.as_ptr(),
                b_row,
                b_col,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
    Some(FlexTensor::from_data(TensorData::new(c, [m, n])))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tensor, TensorPrimitive};

    #[test]
    fn products_match_burns_matmul_for_every_transpose() {
        let device = Default::default();
        let (m, k, n) = (37, 53, 29);
        for transpose in [[false, false], [true, false], [false, true], [true, true]] {
            let a_dims = if transpose[0] { [k, m] } else { [m, k] };
            let b_dims = if transpose[1] { [n, k] } else { [k, n] };
            let a = Tensor::<Flex, 2>::random(a_dims, Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<Flex, 2>::random(b_dims, Distribution::Normal(0.0, 1.0), &device);
            let op = |x: Tensor<Flex, 2>, t: bool| if t { x.transpose() } else { x };
            let want = op(a.clone(), transpose[0]).matmul(op(b.clone(), transpose[1]));
            let got = super::gemm(
                a.into_primitive().tensor(),
                b.into_primitive().tensor(),
                transpose,
            )
            .expect("f32 products run");
            let got = Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(got));
            assert_eq!(got.dims(), [m, n]);
            let error = (got - want).abs().max().into_scalar();
            assert!(error < 1e-4, "{transpose:?}: {error}");
        }
    }
}
