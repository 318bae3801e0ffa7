//! Memory estimates of the language models, checked against the device before anything is
//! allocated: a configuration that cannot fit is refused with the estimate instead of
//! ending in an allocator abort.

use crate::coor_descent::CoorDescentBackend;
use crate::error::Error;

/// Bytes of one f32 value.
const F32: f64 = 4.0;

/// The estimated memory of a model and of training it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters (counted from the configuration's sizes).
    pub parameters: f64,
    /// Values each token keeps per layer during a training step (activations saved for the
    /// backward pass and their gradients), an upper estimate.
    pub activations_per_token: f64,
    /// Values each token keeps outside the layers (embeddings, logits and their softmax).
    pub head_per_token: f64,
    /// Layers.
    pub depth: f64,
}

impl MemoryEstimate {
    /// Bytes of the f32 weights.
    pub fn weight_bytes(&self) -> f64 {
        F32 * self.parameters
    }

    /// Bytes of a training step on `batch` sequences of `seq_len` tokens with Adam: weights,
    /// their gradients and Adam's two moments, plus the activations.
    pub fn training_bytes(&self, batch: usize, seq_len: usize) -> f64 {
        let tokens = batch as f64 * seq_len as f64;
        F32 * (4.0 * self.parameters
            + tokens * (self.depth * self.activations_per_token + self.head_per_token))
    }
}

/// Refuses `needed` bytes (an estimate) for `what` where the device cannot hold them; passes
/// where the backend cannot say how much memory it has.
pub fn ensure_fits<B: CoorDescentBackend>(
    what: &'static str,
    needed: f64,
    device: &B::Device,
) -> crate::Result<()> {
    refuse_beyond(what, needed, B::device_memory(device))
}

/// `Error::OutOfMemory` where `needed` bytes exceed the `(bytes, whole memory)` a device has;
/// passes where that is unknown.
fn refuse_beyond(
    what: &'static str,
    needed: f64,
    memory: Option<(u64, bool)>,
) -> crate::Result<()> {
    match memory {
        Some((available, total)) if needed > available as f64 => Err(Error::OutOfMemory {
            what,
            needed: needed.min(u64::MAX as f64) as u64,
            available,
            total,
        }),
        _ => Ok(()),
    }
}

/// Refuses a model whose weights the host cannot hold: they pass through it on their way
/// to any device, and checkpoints stage them there.
pub(crate) fn ensure_host_holds(what: &'static str, estimate: MemoryEstimate) -> crate::Result<()> {
    refuse_beyond(
        what,
        estimate.weight_bytes(),
        host_available().map(|bytes| (bytes, false)),
    )
}

/// The host's available memory (`MemAvailable` of `/proc/meminfo`), where the system says.
pub(crate) fn host_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
