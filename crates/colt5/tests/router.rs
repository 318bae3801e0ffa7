//! Router behaviour the golden cases do not cover: block routing, learned routing tokens,
//! short sequences and input errors.

use burn::backend::NdArray;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use colt5::router::{CoordinateDescentRouterConfig, RouteOptions};
use colt5::Error;

type B = NdArray<f64>;

fn x(batch: usize, n: usize, dim: usize) -> Tensor<B, 3> {
    Tensor::random(
        [batch, n, dim],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
}

fn ints(t: Tensor<B, 3, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

#[test]
fn block_routing_selects_the_same_count_inside_every_block() {
    let router = CoordinateDescentRouterConfig::new(8)
        .with_route_block_size(Some(16))
        .init::<B>(&Default::default())
        .unwrap();
    let input = x(2, 70, 8); // 4 whole blocks; the last 6 tokens are never routed
    let out = router
        .forward(input.clone(), 8, RouteOptions::default())
        .unwrap();
    let indices = ints(out.indices.unwrap());
    assert_eq!(indices.len(), 2 * 8);
    for row in indices.chunks(8) {
        for (block, pair) in row.chunks(2).enumerate() {
            for &i in pair {
                assert!(
                    (block as i64 * 16..(block as i64 + 1) * 16).contains(&i),
                    "{row:?}"
                );
            }
        }
    }
    // Routed tokens are gathered from the whole sequence.
    let tokens: Vec<f64> = out.routed_tokens.into_data().to_vec().unwrap();
    let all: Vec<f64> = input.into_data().to_vec().unwrap();
    let (b, slot) = (1, 5);
    let index = indices[b * 8 + slot] as usize;
    assert_eq!(
        tokens[(b * 8 + slot) * 8..][..8],
        all[(b * 70 + index) * 8..][..8]
    );
}

#[test]
fn short_sequences_route_every_token_with_score_one() {
    let router = CoordinateDescentRouterConfig::new(8)
        .init::<B>(&Default::default())
        .unwrap();
    let out = router
        .forward(x(1, 5, 8), 8, RouteOptions::default())
        .unwrap();
    assert!(out.indices.is_none());
    assert_eq!(out.routed_tokens.dims(), [1, 1, 5, 8]);
    let scores: Vec<f64> = out.scores.into_data().to_vec().unwrap();
    assert_eq!(scores, vec![1.0; 5]);
}

#[test]
fn learned_routing_tokens_are_required_and_checked() {
    let router = CoordinateDescentRouterConfig::new(8)
        .with_learned_routing_tokens(true)
        .with_num_routing_tokens(2)
        .init::<B>(&Default::default())
        .unwrap();
    let error = router
        .forward(x(2, 32, 8), 4, RouteOptions::default())
        .unwrap_err();
    assert!(
        error.to_string().contains("learned_routing_tokens"),
        "{error}"
    );
    let tokens = Tensor::<B, 3>::zeros([2, 3, 8], &Default::default());
    let options = RouteOptions {
        routing_tokens: Some(tokens),
        ..Default::default()
    };
    assert!(matches!(
        router.forward(x(2, 32, 8), 4, options),
        Err(Error::Shape {
            name: "routing_tokens",
            ..
        })
    ));
    let tokens = Tensor::<B, 3>::random(
        [2, 2, 8],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let options = RouteOptions {
        routing_tokens: Some(tokens),
        ..Default::default()
    };
    let out = router.forward(x(2, 32, 8), 4, options).unwrap();
    assert_eq!(out.routed_tokens.dims(), [2, 2, 4, 8]);
}

#[test]
fn selected_masked_tokens_get_score_zero() {
    let router = CoordinateDescentRouterConfig::new(8)
        .init::<B>(&Default::default())
        .unwrap();
    // Only 3 valid tokens, 6 routed: 3 masked ones must be selected, with score 0.
    let mask: Vec<bool> = (0..16).map(|i| i < 3).collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [1, 16]), &Default::default());
    let options = RouteOptions {
        mask: Some(mask),
        ..Default::default()
    };
    let out = router.forward(x(1, 16, 8), 6, options).unwrap();
    let scores: Vec<f64> = out.scores.into_data().to_vec().unwrap();
    let routed_mask: Vec<bool> = out.routed_mask.unwrap().into_data().to_vec().unwrap();
    for (score, valid) in scores.iter().zip(&routed_mask) {
        assert_eq!(*score, if *valid { 1.0 } else { 0.0 });
    }
    assert_eq!(routed_mask.iter().filter(|v| **v).count(), 3);
}

#[test]
fn random_routing_works_without_a_mask() {
    let router = CoordinateDescentRouterConfig::new(8)
        .init::<B>(&Default::default())
        .unwrap();
    let options = RouteOptions {
        random_route: true,
        ..Default::default()
    };
    let out = router.forward(x(1, 16, 8), 4, options).unwrap();
    assert_eq!(out.routed_tokens.dims(), [1, 1, 4, 8]);
}

#[test]
fn bad_router_input_gives_typed_errors() {
    let router = CoordinateDescentRouterConfig::new(8)
        .init::<B>(&Default::default())
        .unwrap();
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(vec![true; 10], [1, 10]),
        &Default::default(),
    );
    let options = RouteOptions {
        mask: Some(mask),
        ..Default::default()
    };
    assert!(matches!(
        router.forward(x(1, 16, 8), 4, options),
        Err(Error::Shape { name: "mask", .. })
    ));
    assert!(matches!(
        CoordinateDescentRouterConfig::new(8)
            .with_fetch_k_ratio(0.5)
            .init::<B>(&Default::default()),
        Err(Error::InvalidConfig {
            name: "fetch_k_ratio",
            ..
        })
    ));
    let blocked = CoordinateDescentRouterConfig::new(8)
        .with_route_block_size(Some(32))
        .init::<B>(&Default::default())
        .unwrap();
    assert!(matches!(
        blocked.forward(x(1, 20, 8), 4, RouteOptions::default()),
        Err(Error::Shape { name: "x", .. })
    ));
}
