//! Byte-level text corpora: the bundled one, enwik8, or any text file.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::Rng;

/// The corpus that ships with colt5 (see `data/README.md`).
const BUNDLED: &[u8] = include_bytes!("../../../data/shakespeare.txt.gz");

/// enwik8's size and the split of the literature: 90M / 5M / 5M bytes.
const ENWIK8_LEN: usize = 100_000_000;
const ENWIK8_TRAIN: usize = 90_000_000;
const ENWIK8_VALID: usize = 5_000_000;

/// Training, validation and test bytes.
pub struct Corpus {
    /// Where it came from, for logs.
    pub name: String,
    pub train: Vec<u8>,
    pub valid: Vec<u8>,
    pub test: Vec<u8>,
}

impl Corpus {
    /// The file at `path` (gzip if it ends in `.gz`), or the bundled corpus. A file named
    /// `enwik8` (or `enwik8.gz`) is split 90M/5M/5M; any other 90 % / 5 % / 5 %.
    pub fn load(path: Option<&Path>) -> Result<Corpus> {
        let (name, bytes) = match path {
            None => (
                "bundled Shakespeare".to_string(),
                gunzip(BUNDLED, "bundled corpus")?,
            ),
            Some(path) => {
                let raw = std::fs::read(path)
                    .with_context(|| format!("cannot read the data file {}", path.display()))?;
                let text = match path.extension().is_some_and(|e| e == "gz") {
                    true => gunzip(&raw, &path.display().to_string())?,
                    false => raw,
                };
                (path.display().to_string(), text)
            }
        };
        if bytes.is_empty() {
            bail!("the data file {name} is empty");
        }
        let enwik8 = path
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "enwik8" || n == "enwik8.gz");
        let (train_end, valid_end) = if enwik8 {
            if bytes.len() != ENWIK8_LEN {
                bail!("{name} has {} bytes; enwik8 has {ENWIK8_LEN}", bytes.len());
            }
            (ENWIK8_TRAIN, ENWIK8_TRAIN + ENWIK8_VALID)
        } else {
            (bytes.len() * 90 / 100, bytes.len() * 95 / 100)
        };
        Ok(Corpus {
            name,
            test: bytes[valid_end..].to_vec(),
            valid: bytes[train_end..valid_end].to_vec(),
            train: bytes[..train_end].to_vec(),
        })
    }

    /// Rejects a corpus whose splits are shorter than one training sample.
    pub fn check(&self, sample_len: usize) -> Result<()> {
        for (split, bytes) in [("training", &self.train), ("validation", &self.valid)] {
            if bytes.len() < sample_len {
                bail!(
                    "{}: the {split} split has {} bytes, fewer than one sample of {sample_len} \
                     (seq_len + 1); use a longer text or a shorter seq_len",
                    self.name,
                    bytes.len()
                );
            }
        }
        Ok(())
    }
}

fn gunzip(bytes: &[u8], name: &str) -> Result<Vec<u8>> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut text)
        .with_context(|| format!("{name} is not valid gzip"))?;
    Ok(text)
}

/// `batch` windows of `len` bytes at uniformly random offsets, as token ids, row-major.
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
