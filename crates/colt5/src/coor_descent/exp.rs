//! `exp` of many non-positive f64 values at once, for the CPU soft top-k, whose partition
//! sums are almost all of its work: glibc's scalar `exp` took 44 % of a CPU training step
//! of the coordinate-descent-attention LM.
//!
//! exp(x) = 2^k · e^r with k = round(x / ln 2) and r = x − k ln 2 (ln 2 split in two so
//! that k · ln2_hi is exact), |r| ≤ ln 2 / 2, and e^r by its Taylor polynomial of degree 13
//! (truncation error below 5e-18). Branch-free, so the compiler vectorises the loop; it
//! uses no fused multiply-add, so every instruction set gives the same bits. Values below
//! −708 give 0 (exp is below 3.3e-308 there: the soft top-k adds these terms to sums of at
//! least 1).

/// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f64 = 6_755_399_441_055_744.0;
const LOG2_E: f64 = std::f64::consts::LOG2_E;
/// ln 2 in two parts; the first has 32 trailing zero bits, so k · LN2_HI is exact.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1/n! for n = 13 down to 2.
const INVERSE_FACTORIALS: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// exp(x) for x ≤ 0 (0 below −708).
#[inline(always)]
fn exp_non_positive(x: f64) -> f64 {
    let clamped = x.max(-708.0);
    let shifted = clamped * LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let mut p = INVERSE_FACTORIALS[0];
    for c in &INVERSE_FACTORIALS[1..] {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    let exponent = (shifted.to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64) + 1023;
    let scale = f64::from_bits((exponent as u64) << 52);
    if x < -708.0 {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn exp_loop(values: &mut [f64]) {
    for v in values {
        *v = exp_non_positive(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_loop_avx2(values: &mut [f64]) {
    exp_loop(values)
}

/// Replaces each value (all ≤ 0) by its exponential.
pub(crate) fn exp_in_place(values: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { exp_loop_avx2(values) };
    }
    exp_loop(values)
}

/// Σ values in a fixed order (four interleaved partial sums, which pipeline).
pub(crate) fn sum(values: &[f64]) -> f64 {
    let mut partial = [0.0; 4];
    let mut chunks = values.chunks_exact(4);
    for chunk in &mut chunks {
        for (p, v) in partial.iter_mut().zip(chunk) {
            *p += v;
        }
    }
    let tail: f64 = chunks.remainder().iter().sum();
    (partial[0] + partial[1]) + (partial[2] + partial[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_exp_to_a_few_ulps() {
        let mut worst: f64 = 0.0;
        let inputs: Vec<f64> = (0..200_001)
            .map(|i| -(i as f64) * 708.0 / 200_000.0)
            .chain([0.0, -1e-300, -0.5 * std::f64::consts::LN_2, -1e-8])
            .collect();
        let mut values = inputs.clone();
        exp_in_place(&mut values);
        for (&x, &y) in inputs.iter().zip(&values) {
            let exact = x.exp();
            worst = worst.max(((y - exact) / exact).abs());
        }
        assert!(worst < 4.0 * f64::EPSILON, "relative error {worst:e}");
        let mut tiny = [-708.5, -1e4, -1e31, f64::NEG_INFINITY];
        exp_in_place(&mut tiny);
        assert_eq!(tiny, [0.0; 4]);
    }

    #[test]
    fn the_sum_adds_every_value() {
        let values: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(sum(&values), 66.0);
        assert_eq!(sum(&[]), 0.0);
    }
}
