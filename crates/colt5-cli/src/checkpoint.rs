//! Training checkpoints: a directory `checkpoint-NNNNNNNN` per saved step with the model,
//! the optimizer state and `state.json` (step and configuration), written atomically.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::train::TrainConfig;

const PREFIX: &str = "checkpoint-";

/// What `state.json` records next to the weights.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct State {
    /// Optimizer steps taken.
    pub step: usize,
    /// The run's configuration (model, optimisation, data seed).
    pub config: TrainConfig,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Writes a checkpoint of `step` under `out` (temporary directory, fsync, rename), then
/// deletes all but the newest `keep`.
pub fn save<B, M, O>(
    out: &Path,
    state: &State,
    model: &M,
    optimizer: &O,
    keep: usize,
) -> Result<PathBuf>
where
    B: AutodiffBackend,
    M: burn::module::AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let name = format!("{PREFIX}{:08}", state.step);
    let target = out.join(&name);
    let temporary = out.join(format!(".{name}.tmp"));
    if temporary.exists() {
        fs::remove_dir_all(&temporary)?;
    }
    fs::create_dir_all(&temporary)?;
    let written = (|| -> Result<()> {
        model
            .clone()
            .save_file(temporary.join("model"), &recorder())
            .context("cannot write the model")?;
        recorder()
            .record(optimizer.to_record(), temporary.join("optimizer"))
            .context("cannot write the optimizer state")?;
        fs::write(
            temporary.join("state.json"),
            serde_json::to_vec_pretty(state)?,
        )?;
        for entry in fs::read_dir(&temporary)? {
            fs::File::open(entry?.path())?.sync_all()?;
        }
        if target.exists() {
            fs::remove_dir_all(&target)?;
        }
        fs::rename(&temporary, &target)?;
        fs::File::open(out)?.sync_all()?;
        Ok(())
    })();
    if let Err(error) = written {
        let _ = fs::remove_dir_all(&temporary);
        return Err(error.context(format!("cannot write checkpoint {}", target.display())));
    }
    let all = list(out)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        fs::remove_dir_all(old)?;
    }
    Ok(target)
}

/// The checkpoints under `out`, oldest first.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    if !out.exists() {
        return Ok(found);
    }
    for entry in fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step.filter(|_| path.is_dir()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// `path` itself if it is a checkpoint, else the newest checkpoint in it.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").exists() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    match list(path)?.pop() {
        Some((_, latest)) => Ok(latest),
        None => bail!(
            "{} holds no checkpoint ({PREFIX}N directory)",
            path.display()
        ),
    }
}

/// Reads `state.json` of a checkpoint.
pub fn read_state(checkpoint: &Path) -> Result<State> {
    let file = checkpoint.join("state.json");
    let bytes = fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is corrupt or not a colt5 checkpoint state",
            file.display()
        )
    })
}

/// Loads the weights of a checkpoint into `model` (built from the checkpoint's config).
pub fn load_model<B: burn::tensor::backend::Backend, M: Module<B>>(
    checkpoint: &Path,
    model: M,
    device: &B::Device,
) -> Result<M> {
    model
        .load_file(checkpoint.join("model"), &recorder(), device)
        .with_context(|| {
            format!(
                "cannot load the weights of {} (corrupt, or written for another model \
                 configuration)",
                checkpoint.display()
            )
        })
}

/// Loads the optimizer state of a checkpoint.
pub fn load_optimizer<B, M, O>(checkpoint: &Path, optimizer: O, device: &B::Device) -> Result<O>
where
    B: AutodiffBackend,
    M: burn::module::AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let record = recorder()
        .load(checkpoint.join("optimizer"), device)
        .with_context(|| {
            format!(
                "cannot load the optimizer state of {}",
                checkpoint.display()
            )
        })?;
    Ok(optimizer.load_record(record))
}
