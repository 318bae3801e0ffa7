//! The language models and sampling: causality, cached decoding, sampler properties, errors.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use colt5::lm::{
    check_token_ids, generate, generate_batch, next_token_loss, CdTransformer, CdTransformerConfig,
    Colt5TransformerConfig, Decoder, LanguageModel, SamplerConfig,
};
use colt5::Error;

type B = NdArray<f64>;

fn model(null_kv: usize, learned_k: bool) -> CdTransformer<B> {
    CdTransformerConfig::new(64, 32, 24, 2)
        .with_heads(2)
        .with_dim_head(8)
        .with_attn_use_coor_descent(true)
        .with_ff_use_coor_descent(true)
        .with_ff_coor_descent_sparsity_k(16.0)
        .with_attn_null_kv(null_kv)
        .with_learned_sparsity_k(learned_k)
        .with_attn_coor_descent_sparsity_k(3.0)
        .init::<B>(&Default::default())
        .unwrap()
}

fn tokens(ids: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

fn values(t: Tensor<B, 3>) -> Vec<f64> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn logits_do_not_depend_on_later_tokens() {
    let model = model(2, true);
    let ids: Vec<i64> = (0..20).map(|i| (i * 7 % 64) as i64).collect();
    let full = values(model.forward(tokens(&ids)).unwrap());
    let mut changed = ids.clone();
    changed[12] = 63;
    let other = values(model.forward(tokens(&changed)).unwrap());
    let row = 64;
    assert_eq!(full[..12 * row], other[..12 * row]);
    assert_ne!(full[12 * row..13 * row], other[12 * row..13 * row]);
}

#[test]
fn cached_and_uncached_generation_give_the_same_tokens() {
    for (null_kv, learned_k) in [(0, false), (2, true)] {
        let model = model(null_kv, learned_k);
        let prompt = [5, 9, 1];
        let draw = |cached: bool| {
            let mut sampler = SamplerConfig::new().with_seed(7).init().unwrap();
            let mut decoder = if cached {
                model.decoder()
            } else {
                // The trait's default decoder recomputes every step.
                Box::new(Recompute(&model)) as Box<dyn Decoder>
            };
            // 30 tokens: past seq_len = 24 the cached decoder falls back to recomputing.
            generate(decoder.as_mut(), &prompt, 30, &mut sampler, |_| {}).unwrap()
        };
        assert_eq!(draw(true), draw(false));
    }
}

/// Full recomputation of the last `seq_len` tokens at every step.
struct Recompute<'a>(&'a CdTransformer<B>);

impl Decoder for Recompute<'_> {
    fn next_logits(&mut self, rows: &[Vec<i64>]) -> colt5::Result<Vec<Vec<f64>>> {
        rows.iter()
            .map(|ids| {
                let window = &ids[ids.len().saturating_sub(self.0.seq_len())..];
                let logits = values(self.0.forward(tokens(window))?);
                Ok(logits[logits.len() - 64..].to_vec())
            })
            .collect()
    }
}

/// Prompts of different lengths, one of them past half of seq_len = 24.
fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![5],
        (0..14).map(|i| (i * 11 % 64) as i64).collect(),
        vec![9, 1, 40, 2],
    ]
}

#[test]
fn a_batch_of_prompts_of_different_lengths_generates_what_each_prompt_generates_alone() {
    let cd = model(2, true);
    let colt5 = Colt5TransformerConfig::new(64, 16, 32, 1)
        .with_window_size(8)
        .with_heads(2)
        .with_dim_head(8)
        .with_num_heavy_tokens_kv(4)
        .with_num_heavy_ff_tokens(4)
        .init::<B>(&Default::default())
        .unwrap();
    assert_batch_matches_rows_alone("cd-attention", &cd);
    assert_batch_matches_rows_alone("colt5", &colt5);
}

/// Generating for [`prompts`] in one batch gives each row the tokens it gets alone.
fn assert_batch_matches_rows_alone<M: LanguageModel<B>>(name: &str, model: &M) {
    // 16 new tokens: the 14-token prompt passes the CD model's seq_len = 24, where its
    // decoder recomputes the last 24 tokens of every row.
    let samplers: Vec<_> = (0..3)
        .map(|r| SamplerConfig::new().with_seed(r).init().unwrap())
        .collect();
    let mut streamed = vec![Vec::new(); 3];
    let batched = generate_batch(
        model.decoder().as_mut(),
        &prompts(),
        16,
        &mut samplers.clone(),
        |r, token| streamed[r].push(token),
    )
    .unwrap();
    assert_eq!(batched, streamed, "{name}");
    for (r, prompt) in prompts().iter().enumerate() {
        let mut sampler = samplers[r].clone();
        let alone = generate(model.decoder().as_mut(), prompt, 16, &mut sampler, |_| {}).unwrap();
        assert_eq!(batched[r], alone, "{name}, prompt {r}");
    }
}

#[test]
fn padded_rows_give_the_logits_of_their_unpadded_sequences() {
    for (null_kv, learned_k) in [(0, false), (2, true)] {
        let model = model(null_kv, learned_k);
        let mut batched = model.decoder();
        let mut alone = Recompute(&model);
        let mut rows = prompts();
        // The prompts' forward, then cached steps; every row's logits match the row's own
        // uncached forward.
        for step in 0..5 {
            let got = batched.next_logits(&rows).unwrap();
            let want = alone.next_logits(&rows).unwrap();
            for (r, (got, want)) in got.iter().zip(&want).enumerate() {
                let error = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(error < 1e-9, "row {r}, step {step}: {error:e}");
            }
            for (r, row) in rows.iter_mut().enumerate() {
                row.push((step * 7 + r) as i64 % 64);
            }
        }
    }
}

#[test]
fn batched_generation_rejects_empty_prompts_and_mismatched_samplers() {
    let model = model(0, false);
    let mut samplers = vec![SamplerConfig::new().init().unwrap()];
    assert!(matches!(
        generate_batch(&mut *model.decoder(), &[], 2, &mut [], |_, _| {}),
        Err(Error::Shape {
            name: "prompts",
            ..
        })
    ));
    assert!(matches!(
        generate_batch(
            &mut *model.decoder(),
            &[vec![1], vec![]],
            2,
            &mut samplers,
            |_, _| {}
        ),
        Err(Error::Shape {
            name: "prompts",
            ..
        })
    ));
    assert!(matches!(
        generate_batch(
            &mut *model.decoder(),
            &[vec![1], vec![2]],
            2,
            &mut samplers,
            |_, _| {}
        ),
        Err(Error::InvalidConfig {
            name: "samplers",
            ..
        })
    ));
}

#[test]
fn the_sampler_draws_only_among_the_top_tokens_and_repeats_with_its_seed() {
    let logits: Vec<f64> = (0..100).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
    let mut order: Vec<usize> = (0..100).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top: Vec<i64> = order[..10].iter().map(|&i| i as i64).collect();
    let draws = |seed| {
        let mut sampler = SamplerConfig::new().with_seed(seed).init().unwrap();
        (0..200)
            .map(|_| sampler.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    let first = draws(3);
    assert!(first.iter().all(|t| top.contains(t)));
    assert!(
        first
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 3
    );
    assert_eq!(first, draws(3));
    assert_ne!(first, draws(4));
    let mut greedy = SamplerConfig::new().with_temperature(0.0).init().unwrap();
    assert_eq!(greedy.sample(&logits).unwrap(), order[0] as i64);
    assert!(SamplerConfig::new().with_filter_thres(1.0).init().is_err());
    assert!(SamplerConfig::new().with_temperature(-1.0).init().is_err());
}

#[test]
fn bad_token_sequences_are_errors() {
    let model = model(0, false);
    let long: Vec<i64> = vec![1; 25];
    assert!(matches!(
        model.forward(tokens(&long)),
        Err(Error::Shape { name: "tokens", .. })
    ));
    // Forwards check ids in debug builds only (the check reads them back from the device);
    // the host check is what edges (prompts, corpora) run.
    if cfg!(debug_assertions) {
        assert!(matches!(
            model.forward(tokens(&[1, 64])),
            Err(Error::InvalidConfig {
                name: "token id",
                ..
            })
        ));
    }
    for bad in [[1, 64], [-1, 0]] {
        assert!(matches!(
            check_token_ids(&bad, 64),
            Err(Error::InvalidConfig {
                name: "token id",
                ..
            })
        ));
    }
    assert!(check_token_ids(&[0, 63], 64).is_ok());
    let mut sampler = SamplerConfig::new().init().unwrap();
    assert!(matches!(
        generate(&mut *model.decoder(), &[3, 99], 2, &mut sampler, |_| {}),
        Err(Error::InvalidConfig {
            name: "token id",
            ..
        })
    ));
    assert!(matches!(
        next_token_loss(&model, tokens(&[3])),
        Err(Error::Shape { name: "tokens", .. })
    ));
    let loss = next_token_loss(&model, tokens(&[3, 4, 5]))
        .unwrap()
        .into_scalar();
    assert!(loss.is_finite() && loss > 0.0);
}

#[test]
fn a_one_token_sequence_works_with_k_above_its_key_count() {
    // k = 3 > 1 key: every visible key saturates instead of an error.
    let model = model(0, false);
    assert_eq!(model.forward(tokens(&[7])).unwrap().dims(), [1, 1, 64]);
}

/// The position of the first logit row that differs between `a` and `b` (rows of 64).
fn first_difference(a: &[f64], b: &[f64]) -> Option<usize> {
    (0..a.len() / 64).find(|&t| a[t * 64..(t + 1) * 64] != b[t * 64..(t + 1) * 64])
}

#[test]
fn colt5_lm_is_causal_across_windows_and_strictly_without_subset_routing() {
    let ids: Vec<i64> = (0..30).map(|i| (i * 11 % 64) as i64).collect();
    let mut changed = ids.clone();
    changed[21] = 5;
    // Window 8: token 21 is in the window 16..24.
    for (ff_tokens, first_allowed) in [(3, 16), (8, 21)] {
        let model = Colt5TransformerConfig::new(64, 16, 32, 2)
            .with_window_size(8)
            .with_heads(2)
            .with_dim_head(8)
            .with_num_heavy_tokens_kv(4)
            .with_num_heavy_ff_tokens(ff_tokens)
            .init::<B>(&Default::default())
            .unwrap();
        let full = values(model.forward(tokens(&ids)).unwrap());
        let other = values(model.forward(tokens(&changed)).unwrap());
        let first = first_difference(&full, &other).expect("the change shows somewhere");
        assert!(
            first >= first_allowed,
            "{ff_tokens} heavy feed-forward tokens per window: position {first} changed"
        );
        assert!(first <= 21);
    }
}

#[test]
fn colt5_lm_trains_and_rejects_bad_configurations() {
    use burn::backend::Autodiff;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let config = Colt5TransformerConfig::new(64, 16, 32, 1)
        .with_window_size(8)
        .with_heads(2)
        .with_dim_head(8)
        .with_num_heavy_tokens_kv(4)
        .with_num_heavy_ff_tokens(2);
    let mut model = config.init::<A>(&device).unwrap();
    let mut optimizer = AdamConfig::new().init();
    // A repeating sequence is learnable: the loss must fall.
    let ids: Vec<i64> = (0..2 * 33).map(|i| (i % 5) as i64).collect();
    let batch = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [2, 33]), &device);
    let mut losses = Vec::new();
    for _ in 0..15 {
        let loss = next_token_loss(&model, batch.clone()).unwrap();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-2, model, grads);
    }
    assert!(losses[14] < 0.5 * losses[0], "{losses:?}");

    for bad in [
        config.clone().with_num_heavy_ff_tokens(9),
        config.clone().with_num_heavy_tokens_q(Some(0)),
        config.clone().with_window_size(0),
    ] {
        assert!(matches!(
            bad.init::<B>(&Default::default()),
            Err(Error::InvalidConfig { .. })
        ));
    }
    let model = config.init::<B>(&Default::default()).unwrap();
    assert!(
        model.forward(tokens(&[1; 33])).is_err(),
        "longer than seq_len"
    );
    assert!(
        model.forward(tokens(&[64])).is_err(),
        "token outside the vocabulary"
    );
}
