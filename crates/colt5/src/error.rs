//! The error type of the crate.

/// Everything that can go wrong when calling into colt5 with bad input.
///
/// Each variant says what was wrong and carries the offending values, so that the
/// message alone is enough to fix the call.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// A configuration value is outside its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidConfig {
        /// The option's name.
        name: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// A tensor has the wrong shape.
    #[error("{name} has shape {actual:?}, expected {expected}")]
    Shape {
        /// Which tensor.
        name: &'static str,
        /// Its shape.
        actual: Vec<usize>,
        /// The shape (or shape rule) it must have.
        expected: String,
    },
    /// A tensor holds NaN or infinite values where only finite ones are allowed.
    #[error("{name} contains {count} non-finite value(s) (NaN or infinity)")]
    NonFinite {
        /// Which tensor.
        name: &'static str,
        /// How many of its entries are not finite.
        count: usize,
    },
    /// The soft top-k count `k` is not positive.
    #[error("k must be positive, got {k} (row {row})")]
    NonPositiveK {
        /// The rejected k.
        k: f64,
        /// The first row (in row-major order of the leading dimensions) that has it.
        row: usize,
    },
    /// The soft top-k count `k` exceeds the length of the row it selects from.
    #[error("k = {k} exceeds the row length {n} (row {row}); at most n entries can be selected")]
    KExceedsRow {
        /// The rejected k.
        k: f64,
        /// The row length (number of entries on the last axis, masked ones included).
        n: usize,
        /// The first row that has it.
        row: usize,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A weights or golden file does not have the expected content.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// Training diverged: a loss that is not finite, or far above the best seen so far.
    #[error(
        "training diverged at step {step}: loss {loss}{}; the newest checkpoint holds the \
         last weights whose loss was sane",
        limit.map_or_else(String::new, |l| format!(" (limit {l:.4})"))
    )]
    Diverged {
        /// The optimizer step whose loss was rejected.
        step: usize,
        /// The rejected loss.
        loss: f64,
        /// The limit it exceeded, if it was finite.
        limit: Option<f64>,
    },
    /// A configuration whose estimated memory exceeds what the device has, refused before
    /// anything is allocated.
    #[error(
        "{what} needs about {} MiB (estimate) but the device has {} MiB{}; use a shorter \
         seq_len, a smaller batch, dim or depth",
        needed >> 20,
        available >> 20,
        if *total { "" } else { " available" }
    )]
    OutOfMemory {
        /// What the memory is for (the model's weights, a training run).
        what: &'static str,
        /// Estimated bytes.
        needed: u64,
        /// Bytes the device has.
        available: u64,
        /// Whether `available` is the device's whole memory (GPUs) rather than what is free
        /// now (the host).
        total: bool,
    },
}

/// The result type of the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Rejects the first of `fields` (name, value) that is 0.
    pub(crate) fn require_positive(fields: &[(&'static str, usize)]) -> Result<()> {
        match fields.iter().find(|(_, value)| *value == 0) {
            Some(&(name, value)) => Err(Error::config(name, value, "at least 1")),
            None => Ok(()),
        }
    }

    pub(crate) fn config(
        name: &'static str,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}
