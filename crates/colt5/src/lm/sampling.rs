//! Sampling from a language model: temperature and top-k filtering as the reference's
//! `AutoregressiveWrapper.generate`, with a seeded generator.

use std::marker::PhantomData;

use burn::config::Config;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::LanguageModel;
use crate::error::Error;

/// Produces the next-token logits of a growing sequence.
pub trait Decoder {
    /// The logits over the vocabulary of the token that follows `tokens` (the whole sequence
    /// so far, prompt included; one more token than at the previous call).
    fn next_logits(&mut self, tokens: &[i64]) -> crate::Result<Vec<f64>>;
}

/// Recomputes the model over the last `seq_len` tokens at every step (the reference's way).
pub(crate) struct Recompute<'a, B, M> {
    pub model: &'a M,
    pub backend: PhantomData<B>,
}

impl<B: Backend, M: LanguageModel<B>> Decoder for Recompute<'_, B, M> {
    fn next_logits(&mut self, tokens: &[i64]) -> crate::Result<Vec<f64>> {
        let window = &tokens[tokens.len().saturating_sub(self.model.seq_len())..];
        last_logits(self.model.forward(token_tensor::<B>(
            window,
            self.model.num_tokens(),
            &self.model.device(),
        )?)?)
    }
}

/// `[1, n]` ids on `device`, each checked to lie in `0..num_tokens`.
pub(crate) fn token_tensor<B: Backend>(
    tokens: &[i64],
    num_tokens: usize,
    device: &B::Device,
) -> crate::Result<Tensor<B, 2, Int>> {
    if tokens.is_empty() {
        return Err(Error::Shape {
            name: "prompt",
            actual: vec![0],
            expected: "at least one token".into(),
        });
    }
    super::check_token_ids(tokens, num_tokens)?;
    Ok(Tensor::from_data(
        TensorData::new(tokens.to_vec(), [1, tokens.len()]),
        device,
    ))
}

/// The logits of the last position of `[1, n, vocab]`, on the host.
pub(crate) fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> crate::Result<Vec<f64>> {
    let [_, n, vocab] = logits.dims();
    logits
        .narrow(1, n - 1, 1)
        .reshape([vocab])
        .into_data()
        .convert::<f64>()
        .to_vec()
        .map_err(|e| Error::Format {
            path: "logits".into(),
            message: format!("{e:?}"),
        })
}

/// Options of a [`Sampler`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct SamplerConfig {
    /// Logits are divided by it; 0 picks the most likely token. Default 1.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Only the `max(1, ⌊(1 − filter_thres)·vocab⌋)` most likely tokens can be drawn.
    /// Default 0.9.
    #[config(default = 0.9)]
    pub filter_thres: f64,
    /// Seed of the random generator. Default 0.
    #[config(default = 0)]
    pub seed: u64,
}

/// Draws tokens from logits; the same seed gives the same draws.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: ChaCha8Rng,
}

impl SamplerConfig {
    /// A sampler; the temperature must be ≥ 0 and `filter_thres` in [0, 1).
    pub fn init(&self) -> crate::Result<Sampler> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::config(
                "temperature",
                self.temperature,
                "a finite number ≥ 0",
            ));
        }
        if !(0.0..1.0).contains(&self.filter_thres) {
            return Err(Error::config(
                "filter_thres",
                self.filter_thres,
                "a number in [0, 1)",
            ));
        }
        Ok(Sampler {
            config: self.clone(),
            rng: ChaCha8Rng::seed_from_u64(self.seed),
        })
    }
}

impl Sampler {
    /// Draws a token id from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f64]) -> crate::Result<i64> {
        if logits.is_empty() || logits.iter().any(|l| l.is_nan()) {
            return Err(Error::NonFinite {
                name: "logits",
                count: logits.iter().filter(|l| l.is_nan()).count(),
            });
        }
        let keep = (((1.0 - self.config.filter_thres) * logits.len() as f64) as usize).max(1);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(keep);
        if self.config.temperature == 0.0 {
            return Ok(order[0] as i64);
        }
        let top = logits[order[0]];
        let weights: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] - top) / self.config.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (&i, w) in order.iter().zip(&weights) {
            if draw < *w {
                return Ok(i as i64);
            }
            draw -= w;
        }
        Ok(*order.last().expect("at least one token is kept") as i64)
    }
}

/// Appends `count` sampled tokens to `prompt`, calling `on_token` with each as it is drawn;
/// returns the new tokens.
pub fn generate(
    decoder: &mut dyn Decoder,
    prompt: &[i64],
    count: usize,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(i64),
) -> crate::Result<Vec<i64>> {
    let mut tokens = prompt.to_vec();
    for _ in 0..count {
        let token = sampler.sample(&decoder.next_logits(&tokens)?)?;
        tokens.push(token);
        on_token(token);
    }
    Ok(tokens.split_off(prompt.len()))
}
