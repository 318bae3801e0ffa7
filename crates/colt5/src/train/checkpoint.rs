//! Training checkpoints: one directory `checkpoint-NNNNNNNN` per saved step, holding
//!
//! - `model.safetensors`: the weights under the reference's PyTorch parameter names (what
//!   [`StateDict`] writes; `torch.load`-free PyTorch code reads it with `safetensors`),
//! - `param_ids.json`: each parameter's burn id, which keys the optimizer state,
//! - `optimizer.mpk`: Adam's moments (burn's named MessagePack record),
//! - `state.json`: the step and the run's configuration,
//! - `manifest.json`, written last: every other file's length and SHA-256.
//!
//! A checkpoint is written into a temporary directory, synced and renamed into place, so a
//! crash leaves either the whole checkpoint or none. Loading verifies the manifest first and
//! names the file that fails it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::import::{param_ids, StateDict};

/// The name of every checkpoint directory: this prefix and the step, eight digits.
pub const PREFIX: &str = "checkpoint-";
const MODEL: &str = "model.safetensors";
const PARAM_IDS: &str = "param_ids.json";
const OPTIMIZER: &str = "optimizer";
const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";

/// What `state.json` records next to the weights.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct State<C> {
    /// Optimizer steps taken.
    pub step: usize,
    /// The run's configuration (model, optimisation, data seed), as its owner defines it.
    pub config: C,
}

/// `manifest.json`: the checkpoint's files with their sizes and digests, and the SHA-256 of
/// that listing itself, so that damage to the manifest is reported as such rather than as a
/// mismatch of the file whose entry it hit.
#[derive(Serialize, Deserialize, Debug)]
struct Manifest {
    files: BTreeMap<String, FileDigest>,
    #[serde(default)]
    files_sha256: Option<String>,
}

impl Manifest {
    fn new(files: BTreeMap<String, FileDigest>) -> Self {
        let files_sha256 = Some(listing_digest(&files));
        Manifest {
            files,
            files_sha256,
        }
    }
}

/// The SHA-256 of a manifest's listing (its JSON; the map's order is fixed).
fn listing_digest(files: &BTreeMap<String, FileDigest>) -> String {
    let json = serde_json::to_vec(files).expect("digests serialise");
    hex(&Sha256::digest(&json))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct FileDigest {
    bytes: u64,
    sha256: String,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn digest(path: &Path) -> crate::Result<FileDigest> {
    let bytes = fs::read(path).map_err(io(path))?;
    let hash = Sha256::digest(&bytes);
    Ok(FileDigest {
        bytes: bytes.len() as u64,
        sha256: hex(&hash),
    })
}

/// Writes the checkpoint of `state.step` under `out`, then deletes all but the newest `keep`
/// checkpoints. Returns its directory.
pub fn save<B, M, O, C>(
    out: &Path,
    state: &State<C>,
    model: &M,
    optimizer: &O,
    keep: usize,
) -> crate::Result<PathBuf>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
    C: Serialize,
{
    let name = format!("{PREFIX}{:08}", state.step);
    let target = out.join(&name);
    let temporary = out.join(format!(".{name}.tmp"));
    let written = (|| -> crate::Result<()> {
        if temporary.exists() {
            fs::remove_dir_all(&temporary).map_err(io(&temporary))?;
        }
        fs::create_dir_all(&temporary).map_err(io(&temporary))?;
        StateDict::from_module(model).save(&temporary.join(MODEL))?;
        write_json(&temporary.join(PARAM_IDS), &param_ids(model))?;
        recorder()
            .record(optimizer.to_record(), temporary.join(OPTIMIZER))
            .map_err(|e| Error::Io {
                path: temporary.join(OPTIMIZER).display().to_string(),
                message: format!("cannot write the optimizer state: {e}"),
            })?;
        write_json(&temporary.join(STATE), state)?;
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(&temporary).map_err(io(&temporary))? {
            let path = entry.map_err(io(&temporary))?.path();
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            files.insert(file.into_owned(), digest(&path)?);
        }
        let manifest = temporary.join(MANIFEST);
        write_json(&manifest, &Manifest::new(files))?;
        fs::File::open(&manifest)
            .and_then(|f| f.sync_all())
            .map_err(io(&manifest))?;
        if target.exists() {
            fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        fs::rename(&temporary, &target).map_err(io(&target))?;
        fs::File::open(out)
            .and_then(|f| f.sync_all())
            .map_err(io(out))
    })();
    if let Err(error) = written {
        let _ = fs::remove_dir_all(&temporary);
        return Err(error);
    }
    let all = list(out)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(target)
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> crate::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Format {
        path: path.display().to_string(),
        message: format!("cannot serialise: {e}"),
    })?;
    fs::write(path, bytes).map_err(io(path))
}

/// The checkpoints under `out`, oldest first (none if `out` does not exist).
pub fn list(out: &Path) -> crate::Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    if !out.exists() {
        return Ok(found);
    }
    for entry in fs::read_dir(out).map_err(io(out))? {
        let path = entry.map_err(io(out))?.path();
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

/// Checks every file of a checkpoint against its manifest; the error names the first file
/// that is missing, of the wrong length or with the wrong digest.
pub fn verify(checkpoint: &Path) -> crate::Result<()> {
    let manifest_path = checkpoint.join(MANIFEST);
    let bad = |path: &Path, message: String| Error::Format {
        path: path.display().to_string(),
        message,
    };
    let text = fs::read(&manifest_path).map_err(|e| {
        bad(
            &manifest_path,
            format!(
                "cannot read the checkpoint manifest ({e}): incomplete or not a colt5 checkpoint"
            ),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| bad(&manifest_path, format!("corrupt checkpoint manifest: {e}")))?;
    if let Some(expected) = &manifest.files_sha256 {
        if *expected != listing_digest(&manifest.files) {
            return Err(bad(
                &manifest_path,
                "corrupt checkpoint manifest: its listing's SHA-256 differs from the one it records"
                    .into(),
            ));
        }
    }
    for required in [MODEL, PARAM_IDS, STATE] {
        if !manifest.files.contains_key(required) {
            return Err(bad(&manifest_path, format!("lists no {required}")));
        }
    }
    for (file, expected) in &manifest.files {
        let path = checkpoint.join(file);
        if !path.exists() {
            return Err(bad(&path, "missing from the checkpoint".into()));
        }
        let actual = digest(&path)?;
        if actual.bytes != expected.bytes {
            return Err(bad(
                &path,
                format!(
                    "corrupt: {} bytes, the manifest says {} (truncated or overwritten)",
                    actual.bytes, expected.bytes
                ),
            ));
        }
        if actual.sha256 != expected.sha256 {
            return Err(bad(
                &path,
                "corrupt: its SHA-256 differs from the manifest's".into(),
            ));
        }
    }
    Ok(())
}

/// Reads `state.json` of a checkpoint (after [`verify`]).
pub fn read_state<C: DeserializeOwned>(checkpoint: &Path) -> crate::Result<State<C>> {
    let file = checkpoint.join(STATE);
    let bytes = fs::read(&file).map_err(io(&file))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        path: file.display().to_string(),
        message: format!("corrupt or not a colt5 checkpoint state: {e}"),
    })
}

/// A checkpoint passed over because it failed verification, and why.
#[derive(Debug)]
pub struct Skipped {
    /// Its step.
    pub step: usize,
    /// Its directory.
    pub path: PathBuf,
    /// What failed.
    pub error: Error,
}

/// A verified checkpoint and its state.
#[derive(Debug)]
pub struct Checkpoint<C> {
    /// Its directory.
    pub path: PathBuf,
    /// Its `state.json`.
    pub state: State<C>,
}

/// The checkpoint at `path` if it is one, else the newest checkpoint under `path` that passes
/// [`verify`]. Newer ones that fail are returned beside it with their errors (a resumed run
/// warns about them; a checkpoint named directly is never skipped).
pub fn newest_good<C: DeserializeOwned>(
    path: &Path,
) -> crate::Result<(Checkpoint<C>, Vec<Skipped>)> {
    let open = |path: &Path| -> crate::Result<Checkpoint<C>> {
        verify(path)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            state: read_state(path)?,
        })
    };
    if path.join(MANIFEST).exists() || path.join(STATE).exists() {
        return Ok((open(path)?, Vec::new()));
    }
    if !path.exists() {
        return Err(Error::Io {
            path: path.display().to_string(),
            message: "does not exist".into(),
        });
    }
    let mut skipped = Vec::new();
    for (step, candidate) in list(path)?.into_iter().rev() {
        match open(&candidate) {
            Ok(found) => return Ok((found, skipped)),
            Err(error) => skipped.push(Skipped {
                step,
                path: candidate,
                error,
            }),
        }
    }
    let message = match skipped.first() {
        None => format!("holds no checkpoint ({PREFIX}N directory)"),
        Some(Skipped { error, .. }) => format!(
            "holds no checkpoint that passes verification ({} damaged; the newest: {error})",
            skipped.len()
        ),
    };
    Err(Error::Format {
        path: path.display().to_string(),
        message,
    })
}

/// Loads the weights and parameter ids of a checkpoint into `model` (built from the
/// checkpoint's configuration).
pub fn load_model<B: Backend, M: Module<B>>(checkpoint: &Path, model: M) -> crate::Result<M> {
    let ids_path = checkpoint.join(PARAM_IDS);
    let bytes = fs::read(&ids_path).map_err(io(&ids_path))?;
    let ids: BTreeMap<String, u64> = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        path: ids_path.display().to_string(),
        message: format!("corrupt parameter ids: {e}"),
    })?;
    StateDict::load(&checkpoint.join(MODEL))?.load_into_with_ids(model, &ids)
}

/// Loads the optimizer state of a checkpoint.
pub fn load_optimizer<B, M, O>(
    checkpoint: &Path,
    optimizer: O,
    device: &B::Device,
) -> crate::Result<O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let path = checkpoint.join(OPTIMIZER);
    let record = recorder()
        .load(path.clone(), device)
        .map_err(|e| Error::Format {
            path: format!("{}.mpk", path.display()),
            message: format!("cannot load the optimizer state: {e}"),
        })?;
    Ok(optimizer.load_record(record))
}
