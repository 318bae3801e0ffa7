//! The language models the CLI trains: either architecture behind one module type.

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use colt5::coor_descent::CoorDescentBackend;
use colt5::lm::{
    CdTransformer, CdTransformerConfig, Colt5Transformer, Colt5TransformerConfig, Decoder,
    LanguageModel,
};
use serde::{Deserialize, Serialize};

/// Which architecture (`--model`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// The coordinate-descent-attention Transformer.
    CdAttention,
    /// The CoLT5 LM: routed attention and routed feed-forward.
    Colt5,
}

/// A model's configuration, tagged with its architecture (`kind = "cd-attention"` or
/// `"colt5"` in config files).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelConfig {
    /// The coordinate-descent-attention Transformer.
    CdAttention(CdTransformerConfig),
    /// The CoLT5 LM.
    Colt5(Colt5TransformerConfig),
}

/// Sizes every architecture has, for command-line overrides and checks.
pub struct Sizes<'a> {
    /// Vocabulary size.
    pub num_tokens: &'a mut usize,
    /// Model width.
    pub dim: &'a mut usize,
    /// Longest sequence.
    pub seq_len: &'a mut usize,
    /// Number of blocks.
    pub depth: &'a mut usize,
}

impl ModelConfig {
    /// The architecture.
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::CdAttention(_) => ModelKind::CdAttention,
            ModelConfig::Colt5(_) => ModelKind::Colt5,
        }
    }

    /// The shared sizes, mutable.
    pub fn sizes(&mut self) -> Sizes<'_> {
        match self {
            ModelConfig::CdAttention(c) => Sizes {
                num_tokens: &mut c.num_tokens,
                dim: &mut c.dim,
                seq_len: &mut c.seq_len,
                depth: &mut c.depth,
            },
            ModelConfig::Colt5(c) => Sizes {
                num_tokens: &mut c.num_tokens,
                dim: &mut c.dim,
                seq_len: &mut c.seq_len,
                depth: &mut c.depth,
            },
        }
    }

    /// The longest training sequence.
    pub fn seq_len(&self) -> usize {
        match self {
            ModelConfig::CdAttention(c) => c.seq_len,
            ModelConfig::Colt5(c) => c.seq_len,
        }
    }

    /// Refuses a training run of `batch` sequences that the device cannot hold (estimated
    /// from the sizes, before anything is allocated).
    pub fn ensure_trainable<B: CoorDescentBackend>(
        &self,
        batch: usize,
        device: &B::Device,
    ) -> colt5::Result<()> {
        let estimate = match self {
            ModelConfig::CdAttention(c) => c.memory_estimate(),
            ModelConfig::Colt5(c) => c.memory_estimate(),
        };
        colt5::memory::ensure_fits::<B>(
            "training",
            estimate.training_bytes(batch, self.seq_len()),
            device,
        )
    }

    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> colt5::Result<Lm<B>> {
        Ok(match self {
            ModelConfig::CdAttention(c) => Lm::CdAttention(c.init(device)?),
            ModelConfig::Colt5(c) => Lm::Colt5(c.init(device)?),
        })
    }
}

/// A language model of either architecture.
#[derive(Module, Debug)]
pub enum Lm<B: Backend> {
    /// The coordinate-descent-attention Transformer.
    CdAttention(CdTransformer<B>),
    /// The CoLT5 LM.
    Colt5(Colt5Transformer<B>),
}

impl<B: CoorDescentBackend> LanguageModel<B> for Lm<B> {
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> colt5::Result<Tensor<B, 3>> {
        match self {
            Lm::CdAttention(m) => m.forward(tokens),
            Lm::Colt5(m) => m.forward(tokens),
        }
    }

    fn seq_len(&self) -> usize {
        match self {
            Lm::CdAttention(m) => m.seq_len(),
            Lm::Colt5(m) => m.seq_len(),
        }
    }

    fn num_tokens(&self) -> usize {
        match self {
            Lm::CdAttention(m) => m.num_tokens(),
            Lm::Colt5(m) => m.num_tokens(),
        }
    }

    fn device(&self) -> B::Device {
        match self {
            Lm::CdAttention(m) => m.device(),
            Lm::Colt5(m) => m.device(),
        }
    }

    fn decoder(&self) -> Box<dyn Decoder + '_> {
        match self {
            Lm::CdAttention(m) => m.decoder(),
            Lm::Colt5(m) => m.decoder(),
        }
    }
}
