//! Sampling from a language model: temperature and top-k filtering as the reference's
//! `AutoregressiveWrapper.generate`, with a seeded generator.

use std::marker::PhantomData;

use burn::config::Config;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::LanguageModel;
use crate::error::Error;

/// Produces the next-token logits of a batch of growing sequences.
pub trait Decoder {
    /// The logits over the vocabulary of the token that follows each of `rows` (each row the
    /// whole sequence so far, prompt included; rows may differ in length). A decoder that
    /// caches reuses its cache when each row has grown by one token since the previous call,
    /// and starts again otherwise.
    fn next_logits(&mut self, rows: &[Vec<i64>]) -> crate::Result<Vec<Vec<f64>>>;
}

/// Recomputes the model over the last `seq_len` tokens of each row at every step (the
/// reference's way): one forward for rows of equal length, one per row otherwise.
pub(crate) struct Recompute<'a, B, M> {
    pub model: &'a M,
    pub backend: PhantomData<B>,
}

impl<B: Backend, M: LanguageModel<B>> Decoder for Recompute<'_, B, M> {
    fn next_logits(&mut self, rows: &[Vec<i64>]) -> crate::Result<Vec<Vec<f64>>> {
        let seq_len = self.model.seq_len();
        let windows: Vec<&[i64]> = rows
            .iter()
            .map(|row| &row[row.len().saturating_sub(seq_len)..])
            .collect();
        let (num_tokens, device) = (self.model.num_tokens(), self.model.device());
        if windows
            .windows(2)
            .all(|pair| pair[0].len() == pair[1].len())
        {
            let tokens = token_tensor::<B>(&windows, num_tokens, &device)?;
            return last_logits(self.model.forward(tokens)?);
        }
        let mut logits = Vec::with_capacity(rows.len());
        for window in windows {
            let tokens = token_tensor::<B>(&[window], num_tokens, &device)?;
            logits.extend(last_logits(self.model.forward(tokens)?)?);
        }
        Ok(logits)
    }
}

/// `[rows, n]` ids on `device` from rows of equal length n ≥ 1, each id checked to lie in
/// `0..num_tokens`.
pub(crate) fn token_tensor<B: Backend>(
    rows: &[&[i64]],
    num_tokens: usize,
    device: &B::Device,
) -> crate::Result<Tensor<B, 2, Int>> {
    let n = rows.first().map_or(0, |row| row.len());
    if n == 0 || rows.iter().any(|row| row.len() != n) {
        return Err(Error::Shape {
            name: "prompt",
            actual: rows.iter().map(|row| row.len()).collect(),
            expected: "rows of one length, at least one token each".into(),
        });
    }
    let ids = rows.concat();
    super::check_token_ids(&ids, num_tokens)?;
    Ok(Tensor::from_data(
        TensorData::new(ids, [rows.len(), n]),
        device,
    ))
}

/// Rows of different lengths padded on the left to the longest with id 0: the ids
/// `[rows, longest]` (row-major) and each row's padding.
pub(crate) fn left_pad(rows: &[&[i64]]) -> (Vec<i64>, Vec<usize>) {
    let longest = rows.iter().map(|row| row.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * longest);
    let mut padding = Vec::with_capacity(rows.len());
    for row in rows {
        padding.push(longest - row.len());
        ids.extend(std::iter::repeat_n(0, longest - row.len()));
        ids.extend_from_slice(row);
    }
    (ids, padding)
}

/// The logits of the last position of each row of `[rows, n, vocab]`, on the host (one
/// read from the device).
pub(crate) fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> crate::Result<Vec<Vec<f64>>> {
    let [rows, n, vocab] = logits.dims();
    let values = logits
        .narrow(1, n - 1, 1)
        .reshape([rows, vocab])
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| Error::Format {
            path: "logits".into(),
            message: format!("{e:?}"),
        })?;
    Ok(values.chunks(vocab).map(<[f64]>::to_vec).collect())
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
    let mut rows = generate_batch(
        decoder,
        &[prompt.to_vec()],
        count,
        std::slice::from_mut(sampler),
        |_, token| on_token(token),
    )?;
    Ok(rows.remove(0))
}

/// Appends `count` sampled tokens to each of `prompts` (of any lengths) in one batch, row r
/// drawing with `samplers[r]`; calls `on_token(r, token)` with each token as it is drawn and
/// returns each row's new tokens. A row generates the same tokens as it would alone with
/// the same sampler (up to the last bits of the logits).
pub fn generate_batch(
    decoder: &mut dyn Decoder,
    prompts: &[Vec<i64>],
    count: usize,
    samplers: &mut [Sampler],
    mut on_token: impl FnMut(usize, i64),
) -> crate::Result<Vec<Vec<i64>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Shape {
            name: "prompts",
            actual: prompts.iter().map(Vec::len).collect(),
            expected: "at least one prompt, each of at least one token".into(),
        });
    }
    if samplers.len() != prompts.len() {
        return Err(Error::config(
            "samplers",
            samplers.len(),
            format!("one per prompt ({})", prompts.len()),
        ));
    }
    let mut rows = prompts.to_vec();
    for _ in 0..count {
        let logits = decoder.next_logits(&rows)?;
        for (r, ((row, logits), sampler)) in rows
            .iter_mut()
            .zip(&logits)
            .zip(samplers.iter_mut())
            .enumerate()
        {
            let token = sampler.sample(logits)?;
            row.push(token);
            on_token(r, token);
        }
    }
    Ok(rows
        .into_iter()
        .zip(prompts)
        .map(|(mut row, prompt)| row.split_off(prompt.len()))
        .collect())
}
