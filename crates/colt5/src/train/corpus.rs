//! Byte-level text corpora split for training, validation and test.

use std::io::Read;
use std::path::Path;

use rand::Rng;

use crate::error::Error;

/// enwik8's size and the split of the literature: 90M / 5M / 5M bytes.
const ENWIK8_LEN: usize = 100_000_000;
const ENWIK8_TRAIN: usize = 90_000_000;
const ENWIK8_VALID: usize = 5_000_000;

/// Training, validation and test bytes of one text.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Where it came from, for logs and errors.
    pub name: String,
    /// The first 90 % (enwik8: 90M bytes).
    pub train: Vec<u8>,
    /// The next 5 %.
    pub valid: Vec<u8>,
    /// The last 5 %.
    pub test: Vec<u8>,
}

impl Corpus {
    /// The file at `path`, gunzipped if its name ends in `.gz`. A file named `enwik8` (or
    /// `enwik8.gz`) must hold enwik8's 10⁸ bytes and is split 90M/5M/5M; any other text
    /// 90 % / 5 % / 5 %.
    pub fn load(path: &Path) -> crate::Result<Corpus> {
        let name = path.display().to_string();
        let raw = std::fs::read(path).map_err(|e| Error::Io {
            path: name.clone(),
            message: format!("cannot read the data file: {e}"),
        })?;
        let text = match path.extension().is_some_and(|e| e == "gz") {
            true => gunzip(&raw, &name)?,
            false => raw,
        };
        let enwik8 = path
            .file_name()
            .is_some_and(|n| n == "enwik8" || n == "enwik8.gz");
        Corpus::split(name, text, enwik8)
    }

    /// A gzip-compressed text held in memory (a bundled corpus), split 90 % / 5 % / 5 %.
    pub fn from_gzip(name: &str, compressed: &[u8]) -> crate::Result<Corpus> {
        Corpus::split(name.to_string(), gunzip(compressed, name)?, false)
    }

    /// `text` split 90 % / 5 % / 5 %, or 90M/5M/5M where `enwik8` says it is enwik8.
    pub fn split(name: String, text: Vec<u8>, enwik8: bool) -> crate::Result<Corpus> {
        let bad = |message: String| Error::Format {
            path: name.clone(),
            message,
        };
        if text.is_empty() {
            return Err(bad("the data file is empty".into()));
        }
        let (train_end, valid_end) = if enwik8 {
            if text.len() != ENWIK8_LEN {
                return Err(bad(format!(
                    "has {} bytes; enwik8 has {ENWIK8_LEN}",
                    text.len()
                )));
            }
            (ENWIK8_TRAIN, ENWIK8_TRAIN + ENWIK8_VALID)
        } else {
            (text.len() * 90 / 100, text.len() * 95 / 100)
        };
        Ok(Corpus {
            test: text[valid_end..].to_vec(),
            valid: text[train_end..valid_end].to_vec(),
            train: text[..train_end].to_vec(),
            name,
        })
    }

    /// The start of the validation text (64 bytes at most): the prompt of training-time
    /// samples.
    pub fn prompt(&self) -> &[u8] {
        &self.valid[..self.valid.len().min(64)]
    }

    /// Rejects a corpus whose training or validation split is shorter than one sample of
    /// `sample_len` bytes.
    pub fn check(&self, sample_len: usize) -> crate::Result<()> {
        for (split, bytes) in [("training", &self.train), ("validation", &self.valid)] {
            if bytes.len() < sample_len {
                return Err(Error::Format {
                    path: self.name.clone(),
                    message: format!(
                        "the {split} split has {} bytes, fewer than one sample of {sample_len} \
                         (seq_len + 1); use a longer text or a shorter seq_len",
                        bytes.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn gunzip(bytes: &[u8], name: &str) -> crate::Result<Vec<u8>> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut text)
        .map_err(|e| Error::Format {
            path: name.to_string(),
            message: format!("not valid gzip: {e}"),
        })?;
    Ok(text)
}

/// `batch` windows of `len` bytes (`len ≤ bytes.len()`) at uniformly random offsets, as
/// token ids, row-major.
pub fn sample(bytes: &[u8], batch: usize, len: usize, rng: &mut impl Rng) -> Vec<i64> {
    (0..batch)
        .flat_map(|_| {
            let start = rng.random_range(0..=bytes.len() - len);
            bytes[start..start + len].iter().map(|&b| i64::from(b))
        })
        .collect()
}

/// Entropy in nats of the byte distribution of `bytes` (the loss of the best model that
/// ignores context).
pub fn unigram_entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let total = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum()
}
