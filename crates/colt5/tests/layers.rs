//! Edge cases of the layers that the golden cases do not cover, and weight import errors.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Bool, Distribution, Tensor, TensorData};
use colt5::attend::AttendConfig;
use colt5::attention::SelfAttentionConfig;
use colt5::feed_forward::FeedForwardConfig;
use colt5::golden::CaseTensor;
use colt5::import::StateDict;
use colt5::Error;

type B = NdArray<f64>;
type BGrad = Autodiff<NdArray<f64>>;

fn random<const D: usize>(shape: [usize; D]) -> Tensor<BGrad, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn values<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

#[test]
fn queries_that_see_no_key_output_zero_with_zero_gradient() {
    let q = random([1, 2, 3, 4]).require_grad();
    let kv = random([1, 2, 5, 4]).require_grad();
    // Batch element 0: every key masked.
    let mask = Tensor::<BGrad, 4, Bool>::from_data(
        TensorData::new(vec![false; 5], [1, 1, 1, 5]),
        &Default::default(),
    );
    let out = AttendConfig::new()
        .init()
        .forward(q.clone(), kv.clone(), kv.clone(), Some(mask))
        .unwrap();
    let grads = out.clone().sum().backward();
    assert!(values(out).iter().all(|&v| v == 0.0));
    assert!(values(q.grad(&grads).unwrap()).iter().all(|&v| v == 0.0));
    assert!(values(kv.grad(&grads).unwrap()).iter().all(|&v| v == 0.0));
}

#[test]
fn causal_attention_aligns_the_last_query_with_the_last_key() {
    let attend = AttendConfig::new().with_causal(true).init();
    let (q, k, v) = (
        random([1, 1, 3, 4]),
        random([1, 1, 5, 4]),
        random([1, 1, 5, 4]),
    );
    let out = values(
        attend
            .forward(q.clone(), k.clone(), v.clone(), None)
            .unwrap(),
    );
    // Query 0 of 3 over 5 keys sees keys 0..=2: changing keys 3 and 4 must not move it.
    let mut k2 = values(k.clone());
    let mut v2 = values(v.clone());
    for i in 12..20 {
        k2[i] += 1.0;
        v2[i] -= 1.0;
    }
    let device = Default::default();
    let k2 = Tensor::<BGrad, 4>::from_data(TensorData::new(k2, [1, 1, 5, 4]), &device);
    let v2 = Tensor::<BGrad, 4>::from_data(TensorData::new(v2, [1, 1, 5, 4]), &device);
    let out2 = values(attend.forward(q.clone(), k2, v2, None).unwrap());
    assert_eq!(out[..4], out2[..4]);
    assert_ne!(out[8..], out2[8..], "the last query sees every key");

    // More queries than keys: the first queries see nothing and output zeros.
    let out = values(
        attend
            .forward(
                random([1, 1, 4, 4]),
                k.narrow(2, 0, 2),
                v.narrow(2, 0, 2),
                None,
            )
            .unwrap(),
    );
    assert!(out[..8].iter().all(|&x| x == 0.0));
    assert!(out[8..].iter().any(|&x| x != 0.0));
}

#[test]
fn dropout_applies_only_with_autodiff() {
    let attend = AttendConfig::new().with_dropout(0.5).init();
    let device = Default::default();
    let q = Tensor::<B, 4>::random([1, 1, 4, 4], Distribution::Normal(0.0, 1.0), &device);
    let a = values(
        attend
            .forward(q.clone(), q.clone(), q.clone(), None)
            .unwrap(),
    );
    let b = values(attend.forward(q.clone(), q.clone(), q, None).unwrap());
    assert_eq!(a, b, "inference is deterministic");
}

#[test]
fn attend_rejects_mismatched_shapes() {
    let attend = AttendConfig::new().init();
    let error = attend
        .forward(
            random([1, 2, 3, 4]),
            random([1, 2, 5, 4]),
            random([1, 2, 6, 4]),
            None,
        )
        .unwrap_err();
    assert!(matches!(error, Error::Shape { name: "v", .. }), "{error}");
    let mask = Tensor::<BGrad, 4, Bool>::from_data(
        TensorData::new(vec![true; 3], [1, 1, 1, 3]),
        &Default::default(),
    );
    let error = attend
        .forward(
            random([1, 2, 3, 4]),
            random([1, 2, 5, 4]),
            random([1, 2, 5, 4]),
            Some(mask),
        )
        .unwrap_err();
    assert!(
        matches!(error, Error::Shape { name: "mask", .. }),
        "{error}"
    );
}

#[test]
fn self_attention_rejects_the_wrong_width() {
    let layer = SelfAttentionConfig::new(16)
        .with_heads(2)
        .with_dim_head(4)
        .init::<B>(&Default::default());
    let x = Tensor::<B, 3>::zeros([1, 3, 8], &Default::default());
    assert!(matches!(
        layer.forward(x),
        Err(Error::Shape { name: "x", .. })
    ));
}

fn tensor(shape: &[usize]) -> CaseTensor {
    CaseTensor {
        shape: shape.to_vec(),
        values: vec![0.5; shape.iter().product()],
    }
}

#[test]
fn import_names_every_missing_unexpected_and_misshaped_tensor() {
    let module = FeedForwardConfig::new(8)
        .with_mult(2.0)
        .init::<B>(&Default::default());
    let mut state = StateDict {
        source: "weights.safetensors".into(),
        ..Default::default()
    };
    state.tensors.insert("0.gamma".into(), tensor(&[8]));
    state.tensors.insert("1.weight".into(), tensor(&[8, 16])); // transposed by mistake
    state.tensors.insert("1.bias".into(), tensor(&[16]));
    state.tensors.insert("3.weight".into(), tensor(&[8, 16]));
    state.tensors.insert("extra.weight".into(), tensor(&[2]));
    let message = state.load_into(module).unwrap_err().to_string();
    assert!(
        message.starts_with("weights.safetensors: cannot load the weights"),
        "{message}"
    );
    assert!(
        message.contains("`1.weight` has shape [8, 16], expected [16, 8]"),
        "{message}"
    );
    assert!(message.contains("missing tensor `3.bias`"), "{message}");
    assert!(
        message.contains("unexpected tensor `extra.weight`"),
        "{message}"
    );
}

#[test]
fn import_loads_linear_weights_in_pytorch_layout() {
    let module = FeedForwardConfig::new(2)
        .with_mult(1.5)
        .init::<B>(&Default::default());
    let mut state = StateDict::default();
    state.tensors.insert("0.gamma".into(), tensor(&[2]));
    // PyTorch stores [out, in] = [3, 2]: rows are output features.
    let w1 = CaseTensor {
        shape: vec![3, 2],
        values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    };
    state.tensors.insert("1.weight".into(), w1);
    state.tensors.insert("1.bias".into(), tensor(&[3]));
    state.tensors.insert("3.weight".into(), tensor(&[2, 3]));
    state.tensors.insert("3.bias".into(), tensor(&[2]));
    let module = state.load_into(module).unwrap();
    assert_eq!(
        values(module.proj_in.weight.val()),
        vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
    );
}

#[test]
fn routed_feed_forward_routes_every_token_of_a_short_sequence() {
    use colt5::routed::ConditionalRoutedFeedForwardConfig;
    let device = Default::default();
    let layer = ConditionalRoutedFeedForwardConfig::new(8, 16)
        .init::<B>(&device)
        .unwrap();
    let x = Tensor::<B, 3>::random([2, 10, 8], Distribution::Normal(0.0, 1.0), &device);
    let out = values(layer.forward(x.clone(), None, None).unwrap());
    let expected = values(layer.light_ff.forward(x.clone()) + layer.heavy_ff.forward(x));
    for (a, b) in out.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn routed_attention_keeps_unrouted_tokens_at_light_plus_null_token() {
    use colt5::routed::ConditionalRoutedAttentionConfig;
    let device = Default::default();
    let layer = ConditionalRoutedAttentionConfig::new(8, 4, 4)
        .with_light_dim_head(4)
        .with_light_heads(2)
        .with_light_window_size(4)
        .with_heavy_dim_head(4)
        .with_heavy_heads(2)
        .init::<B>(&device)
        .unwrap();
    let x = Tensor::<B, 3>::random([1, 24, 8], Distribution::Normal(0.0, 1.0), &device);
    let out = values(layer.forward(x.clone(), None).unwrap());
    let light = values(layer.light_attn.forward(x, None).unwrap());
    let null = values(layer.null_q_token.as_ref().unwrap().val());
    let unchanged = (0..24)
        .filter(|t| (0..8).all(|d| (out[t * 8 + d] - light[t * 8 + d] - null[d]).abs() < 1e-12))
        .count();
    assert_eq!(
        unchanged, 20,
        "exactly the 20 unrouted queries get light + null token"
    );
}

#[test]
fn checkpoints_round_trip_and_reject_corruption() {
    use colt5::routed::ConditionalRoutedFeedForwardConfig;
    let device = Default::default();
    let config = ConditionalRoutedFeedForwardConfig::new(8, 4);
    let trained = config.init::<B>(&device).unwrap();
    let dir = std::env::temp_dir().join(format!("colt5-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    StateDict::from_module(&trained).save(&path).unwrap();
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left behind"
    );

    let restored = StateDict::load(&path)
        .unwrap()
        .load_into(config.init::<B>(&device).unwrap())
        .unwrap();
    let x = Tensor::<B, 3>::random([1, 12, 8], Distribution::Normal(0.0, 1.0), &device);
    let a = values(trained.forward(x.clone(), None, None).unwrap());
    let b = values(restored.forward(x, None, None).unwrap());
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() < 1e-5, "f32 checkpoint: {a} vs {b}");
    }

    std::fs::write(&path, b"truncated").unwrap();
    let error = StateDict::load(&path).unwrap_err().to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("not a safetensors file"),
        "{error}"
    );
    let error = StateDict::load(&dir.join("missing.safetensors")).unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}
