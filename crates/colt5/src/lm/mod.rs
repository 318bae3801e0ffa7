//! Language models: the coordinate-descent-attention Transformer and the CoLT5 LM, their
//! next-token loss, and sampling.

mod cd_transformer;
mod colt5_transformer;
mod sampling;

pub use cd_transformer::{
    CdAttention, CdBlock, CdCache, CdFeedForward, CdTransformer, CdTransformerConfig, KeyMask,
};
pub use colt5_transformer::{Colt5Block, Colt5Transformer, Colt5TransformerConfig};
pub use sampling::{generate, generate_batch, Decoder, Sampler, SamplerConfig};

pub(crate) use sampling::{last_logits, left_pad, token_tensor, Recompute};

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::error::Error;

/// A causal language model over a vocabulary of `num_tokens` ids.
pub trait LanguageModel<B: Backend> {
    /// Logits `[batch, n, num_tokens]` of `tokens: [batch, n]` (1 ≤ n ≤ `seq_len`); the logits
    /// at position t depend on tokens ≤ t only. The ids must lie in `0..num_tokens`: debug
    /// builds check them, release builds leave that to the caller ([`check_token_ids`]).
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> crate::Result<Tensor<B, 3>>;

    /// The longest sequence the model takes.
    fn seq_len(&self) -> usize;

    /// The vocabulary size.
    fn num_tokens(&self) -> usize;

    /// The device the model's parameters live on.
    fn device(&self) -> B::Device;

    /// A decoder for generation; by default each step recomputes the last `seq_len` tokens.
    fn decoder(&self) -> Box<dyn Decoder + '_>
    where
        Self: Sized,
    {
        Box::new(Recompute {
            model: self,
            backend: std::marker::PhantomData,
        })
    }
}

/// The mean cross-entropy of predicting `tokens[:, 1:]` from `tokens[:, :-1]` (the
/// reference's `AutoregressiveWrapper`), in nats per token.
pub fn next_token_loss<B: Backend, M: LanguageModel<B>>(
    model: &M,
    tokens: Tensor<B, 2, Int>,
) -> crate::Result<Tensor<B, 1>> {
    let [batch, len] = tokens.dims();
    if len < 2 {
        return Err(Error::Shape {
            name: "tokens",
            actual: vec![batch, len],
            expected: "[batch, n + 1] with n ≥ 1 (inputs and their next tokens)".into(),
        });
    }
    // The targets too: the model checks only its inputs.
    debug_check_tokens(&tokens, model.num_tokens())?;
    let inputs = tokens.clone().narrow(1, 0, len - 1);
    let targets = tokens.narrow(1, 1, len - 1).reshape([batch * (len - 1)]);
    let logits = model.forward(inputs)?;
    let vocab = model.num_tokens();
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.reshape([batch * (len - 1), vocab]), targets);
    Ok(loss)
}

/// Rejects token ids outside `0..num_tokens` (an embedding lookup would read past its
/// table). Models do not check the ids they are given in release builds: on a GPU that
/// would read every batch back to the host in every forward. Check them where they enter
/// instead — the trainer checks its corpus once, generation its prompt.
pub fn check_token_ids(ids: &[i64], num_tokens: usize) -> crate::Result<()> {
    match ids.iter().find(|&&t| t < 0 || t >= num_tokens as i64) {
        Some(&bad) => Err(Error::config(
            "token id",
            bad,
            format!("an id in 0..{num_tokens} (the vocabulary size)"),
        )),
        None => Ok(()),
    }
}

/// [`check_token_ids`] on a tensor of ids, in debug builds only (it synchronises with the
/// device).
pub(crate) fn debug_check_tokens<B: Backend>(
    tokens: &Tensor<B, 2, Int>,
    num_tokens: usize,
) -> crate::Result<()> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    let data = tokens.clone().into_data().convert::<i64>();
    let ids = data.as_slice::<i64>().map_err(|e| Error::Format {
        path: "tokens".into(),
        message: format!("{e:?}"),
    })?;
    check_token_ids(ids, num_tokens)
}
