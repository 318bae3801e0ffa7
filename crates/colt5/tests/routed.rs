//! Properties of the routed attentions and the ViT that need no reference: causality,
//! layout equivalences, masking, shapes and errors.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Bool, Distribution, Tensor, TensorData};
use colt5::import::StateDict;
use colt5::routed::{
    ConditionalRoutedAttentionConfig, ConditionalRoutedAutoregressiveAttentionConfig,
    ConditionalRoutedCrossAttentionConfig, ConditionalRoutedImageAttentionConfig,
};
use colt5::vit::ConditionalRoutedViTConfig;
use colt5::Error;

type B = NdArray<f64>;

fn random<Bk: Backend, const D: usize>(shape: [usize; D]) -> Tensor<Bk, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// Small routed attention options: width 16, windows of 8.
fn options(num_q: usize, num_kv: usize) -> ConditionalRoutedAttentionConfig {
    ConditionalRoutedAttentionConfig::new(16, num_q, num_kv)
        .with_light_heads(2)
        .with_light_dim_head(8)
        .with_light_window_size(8)
        .with_heavy_heads(2)
        .with_heavy_dim_head(8)
}

/// The first position whose output row differs between `a` and `b: [1, n, dim]`.
fn first_changed(a: &[f64], b: &[f64], dim: usize) -> Option<usize> {
    a.chunks(dim)
        .zip(b.chunks(dim))
        .position(|(x, y)| x.iter().zip(y).any(|(p, q)| p != q))
}

/// Perturbs each position t in turn and returns the first position whose output changed.
fn first_changes(
    forward: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    x: Tensor<B, 3>,
) -> Vec<(usize, Option<usize>)> {
    let [_, n, dim] = x.dims();
    let base = values(forward(x.clone()));
    (0..n)
        .map(|t| {
            let bump = Tensor::<B, 3>::zeros([1, n, dim], &Default::default()).slice_assign(
                [0..1, t..t + 1, 0..dim],
                Tensor::ones([1, 1, dim], &Default::default()).mul_scalar(3.0),
            );
            let changed = values(forward(x.clone() + bump));
            (t, first_changed(&base, &changed, dim))
        })
        .collect()
}

#[test]
fn autoregressive_attention_is_causal_when_every_query_of_a_block_is_heavy() {
    // 29 tokens (padded to 32), blocks of 8, all 8 queries of a block heavy, keys routed
    // among earlier blocks, rotary positions: perturbing x_t changes nothing before t.
    let attn =
        ConditionalRoutedAutoregressiveAttentionConfig::new(options(8, 6).with_rotary_emb(true))
            .init::<B>(&Default::default())
            .unwrap();
    let x = random::<B, 3>([1, 29, 16]);
    for (t, first) in first_changes(|x| attn.forward(x, false).unwrap(), x) {
        assert_eq!(first, Some(t), "perturbing x_{t} changed output {first:?}");
    }
}

#[test]
fn autoregressive_attention_with_routed_queries_is_causal_across_blocks() {
    // With 3 of 8 queries routed per block, the query router ranks a block's tokens among
    // themselves (the reference's design), so an output may depend on later tokens of its
    // own block, never on a later block.
    let w = 8;
    let attn = ConditionalRoutedAutoregressiveAttentionConfig::new(options(3, 6))
        .init::<B>(&Default::default())
        .unwrap();
    let x = random::<B, 3>([1, 32, 16]);
    for (t, first) in first_changes(|x| attn.forward(x, false).unwrap(), x) {
        let first = first.expect("a perturbation changes its own output");
        assert!(
            first >= t / w * w,
            "perturbing x_{t} changed output {first}, in an earlier block"
        );
    }
}

#[test]
fn autoregressive_attention_of_one_block_is_its_light_branch() {
    let attn = ConditionalRoutedAutoregressiveAttentionConfig::new(options(4, 4))
        .init::<B>(&Default::default())
        .unwrap();
    for n in [5, 8] {
        let x = random::<B, 3>([2, n, 16]);
        let light = attn.light_attn.forward(x.clone(), None).unwrap();
        assert_eq!(values(attn.forward(x, false).unwrap()), values(light));
    }
}

#[test]
fn autoregressive_attention_routes_randomly_on_request() {
    let attn = ConditionalRoutedAutoregressiveAttentionConfig::new(options(3, 4))
        .with_heavy_window_size(Some(4))
        .init::<B>(&Default::default())
        .unwrap();
    let out = attn.forward(random::<B, 3>([2, 19, 16]), true).unwrap();
    assert_eq!(out.dims(), [2, 19, 16]);
    assert!(values(out).iter().all(|v| v.is_finite()));
}

#[test]
fn image_attention_channel_first_is_the_transposed_channel_last() {
    let device = Default::default();
    let last = ConditionalRoutedImageAttentionConfig::new(options(8, 8).with_light_window_size(4))
        .init::<B>(&device)
        .unwrap();
    let first = StateDict::from_module(&last)
        .load_into(
            ConditionalRoutedImageAttentionConfig::new(options(8, 8).with_light_window_size(4))
                .with_channel_first(true)
                .init::<B>(&device)
                .unwrap(),
        )
        .unwrap();
    let image = random::<B, 4>([2, 8, 12, 16]);
    let out_last = last.forward(image.clone(), None).unwrap();
    let out_first = first
        .forward(image.permute([0, 3, 1, 2]), None)
        .unwrap()
        .permute([0, 2, 3, 1]);
    let (a, b) = (values(out_last), values(out_first));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-12));
}

#[test]
fn image_attention_masked_pixels_are_never_heavy_keys() {
    // The heavy outputs of real pixels do not depend on masked pixels (the light branch,
    // full attention inside the window, takes no mask, as in the reference).
    let device = Default::default();
    let attn = ConditionalRoutedImageAttentionConfig::new(options(4, 4).with_light_window_size(4))
        .init::<B>(&device)
        .unwrap();
    let image = random::<B, 4>([1, 4, 4, 16]);
    // One 4×4 window; mask out its last row of pixels.
    let keep: Vec<bool> = (0..16).map(|i| i < 12).collect();
    let mask = Tensor::<B, 3, Bool>::from_data(TensorData::new(keep, [1, 4, 4]), &device);
    let heavy_only = |image: Tensor<B, 4>| {
        let light = attn
            .light_attn
            .forward(image.clone().reshape([1, 16, 16]))
            .unwrap()
            .reshape([1, 4, 4, 16]);
        attn.forward(image, Some(mask.clone())).unwrap() - light
    };
    let bump = Tensor::<B, 4>::zeros([1, 4, 4, 16], &device)
        .slice_assign([0..1, 3..4, 0..4, 0..16], random::<B, 4>([1, 1, 4, 16]));
    let before = values(heavy_only(image.clone()));
    let after = values(heavy_only(image + bump));
    // Rows 0..2 (pixels 0..12) are real; their heavy outputs must not move.
    let (a, b) = (&before[..12 * 16], &after[..12 * 16]);
    assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12));
}

#[test]
fn image_attention_rejects_sizes_that_are_not_window_multiples() {
    let attn = ConditionalRoutedImageAttentionConfig::new(options(4, 4).with_light_window_size(4))
        .init::<B>(&Default::default())
        .unwrap();
    let err = attn
        .forward(random::<B, 4>([1, 6, 8, 16]), None)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { name: "image", .. }), "{err}");
    let err = ConditionalRoutedImageAttentionConfig::new(options(4, 4).with_rotary_emb(true))
        .init::<B>(&Default::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                name: "rotary_emb",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn cross_attention_ignores_masked_context_and_gives_unrouted_queries_the_null_token() {
    let device = Default::default();
    let attn = ConditionalRoutedCrossAttentionConfig::new(16, 4, 8)
        .with_heads(2)
        .with_dim_head(8)
        .init::<B>(&device)
        .unwrap();
    let x = random::<B, 3>([2, 12, 16]);
    let context = random::<B, 3>([2, 40, 16]);
    let keep: Vec<bool> = (0..80).map(|i| i % 40 < 30).collect();
    let context_mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(keep, [2, 40]), &device);
    let bump = Tensor::<B, 3>::zeros([2, 40, 16], &device)
        .slice_assign([0..2, 30..40, 0..16], random::<B, 3>([2, 10, 16]));
    let out = attn
        .forward(x.clone(), context.clone(), None, Some(context_mask.clone()))
        .unwrap();
    let moved = attn
        .forward(x, context + bump, None, Some(context_mask))
        .unwrap();
    let (a, b) = (values(out), values(moved));
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-12));
    // 12 queries, 4 routed: 8 rows per sequence are the null token.
    let null = values(attn.null_q_token.as_ref().unwrap().val());
    let null_rows = a.chunks(16).filter(|row| *row == null.as_slice()).count();
    assert_eq!(null_rows, 2 * 8);
}

#[test]
fn cross_attention_rejects_a_context_of_another_width() {
    let attn = ConditionalRoutedCrossAttentionConfig::new(16, 4, 8)
        .with_heads(2)
        .with_dim_head(8)
        .init::<B>(&Default::default())
        .unwrap();
    let err = attn
        .forward(
            random::<B, 3>([2, 12, 16]),
            random::<B, 3>([2, 40, 8]),
            None,
            None,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Shape { name: "x", .. }), "{err}");
}

#[test]
fn vit_trains_on_224_pixel_images_with_finite_gradients() {
    type G = Autodiff<NdArray<f32>>;
    let vit = ConditionalRoutedViTConfig::new([224, 224], [16, 16], 10, 64, 2, 16, 16, 64)
        .with_attn_light_window_size(7)
        .with_attn_heavy_dim_head(16)
        .with_attn_heavy_heads(4)
        .with_attn_light_dim_head(16)
        .with_attn_light_heads(4)
        .init::<G>(&Default::default())
        .unwrap();
    let images = random::<G, 4>([2, 3, 224, 224]).require_grad();
    let logits = vit.forward(images.clone()).unwrap();
    assert_eq!(logits.dims(), [2, 10]);
    let grads = logits.sum().backward();
    let image_grad = values(images.grad(&grads).unwrap());
    assert!(image_grad.iter().all(|g| g.is_finite()));
    assert!(image_grad.iter().any(|g| *g != 0.0));
    let head_grad = values(vit.head.weight.val().grad(&grads).unwrap());
    assert!(head_grad.iter().all(|g| g.is_finite()));
}

#[test]
fn vit_rejects_bad_sizes() {
    let device = Default::default();
    let base = || ConditionalRoutedViTConfig::new([32, 32], [8, 8], 10, 32, 1, 4, 4, 4);
    let err = ConditionalRoutedViTConfig::new([32, 32], [5, 8], 10, 32, 1, 4, 4, 4)
        .init::<B>(&device)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                name: "patch_size",
                ..
            }
        ),
        "{err}"
    );
    let err = ConditionalRoutedViTConfig::new([32, 32], [8, 8], 10, 30, 1, 4, 4, 4)
        .init::<B>(&device)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { name: "dim", .. }),
        "{err}"
    );
    let err = base()
        .with_attn_light_window_size(3)
        .init::<B>(&device)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                name: "attn_light_window_size",
                ..
            }
        ),
        "{err}"
    );
    let vit = base()
        .with_attn_light_window_size(2)
        .init::<B>(&device)
        .unwrap();
    let err = vit.forward(random::<B, 4>([1, 3, 32, 16])).unwrap_err();
    assert!(matches!(err, Error::Shape { name: "images", .. }), "{err}");
}
