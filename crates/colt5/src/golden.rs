//! Reading reference cases: safetensors files of inputs, weights, outputs and gradients
//! produced by the PyTorch originals (format `colt5-golden-v1`).
//!
//! Keys: `in.NAME` (inputs; boolean masks stored as U8), `param.NAME` (weights under their
//! PyTorch `state_dict` names), `out.NAME` (outputs), `cot.NAME` (the cotangent of output
//! NAME), `grad.in.NAME` / `grad.param.NAME` (gradients of Σ out·cot). Metadata: `module`,
//! `config` and `call` (JSON), `dtype`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::Error;

/// The format tag every case file carries in its metadata.
pub const FORMAT: &str = "colt5-golden-v1";

/// One tensor of a case, converted to f64 (masks: 1.0 = keep; indices: exact integers).
#[derive(Clone, Debug, PartialEq)]
pub struct CaseTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values in row-major order.
    pub values: Vec<f64>,
}

/// One reference case.
#[derive(Clone, Debug)]
pub struct Case {
    /// Where it was read from.
    pub path: PathBuf,
    /// The reference class or function name (`coor_descent`, `RMSNorm`, ...).
    pub module: String,
    /// Constructor (or call) keyword arguments.
    pub config: Value,
    /// Extra forward keyword arguments.
    pub call: Value,
    /// Every tensor by key.
    pub tensors: BTreeMap<String, CaseTensor>,
}

impl Case {
    /// Reads a case file; the error names the file and what is wrong with it.
    pub fn load(path: &Path) -> crate::Result<Case> {
        let display = path.display().to_string();
        let format_error = |message: String| Error::Format {
            path: display.clone(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: display.clone(),
            message: e.to_string(),
        })?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_error(format!("not a safetensors file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            other => {
                return Err(format_error(format!(
                    "metadata `format` is {other:?}, expected {FORMAT:?}"
                )))
            }
        }
        let field = |name: &str| -> crate::Result<&String> {
            metadata
                .get(name)
                .ok_or_else(|| format_error(format!("metadata has no `{name}`")))
        };
        let json = |name: &str| -> crate::Result<Value> {
            match metadata.get(name) {
                None => Ok(Value::Object(Default::default())),
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| format_error(format!("metadata `{name}` is not JSON: {e}"))),
            }
        };
        let module = field("module")?.clone();
        let config = json("config")?;
        let call = json("call")?;

        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| format_error(format!("not a safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let values = decode(&name, view.dtype(), view.data()).map_err(format_error)?;
            let shape = view.shape().to_vec();
            tensors.insert(name, CaseTensor { shape, values });
        }
        Ok(Case {
            path: path.to_path_buf(),
            module,
            config,
            call,
            tensors,
        })
    }

    /// The tensor stored under `key`, or an error naming the file and the key.
    pub fn tensor(&self, key: &str) -> crate::Result<&CaseTensor> {
        self.tensors.get(key).ok_or_else(|| Error::Format {
            path: self.path.display().to_string(),
            message: format!("missing tensor `{key}`"),
        })
    }

    /// The tensor stored under `key`, if there is one.
    pub fn optional(&self, key: &str) -> Option<&CaseTensor> {
        self.tensors.get(key)
    }

    /// A number from the config, or an error naming it.
    pub fn config_f64(&self, name: &str) -> crate::Result<Option<f64>> {
        match self.config.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_f64().map(Some).ok_or_else(|| Error::Format {
                path: self.path.display().to_string(),
                message: format!("config `{name}` is {value}, expected a number"),
            }),
        }
    }
}

/// Every `*.safetensors` file in `dir`, sorted by name.
pub fn case_files(dir: &Path) -> crate::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        message: format!("cannot read the golden directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Converts the little-endian bytes of a safetensors tensor to f64 (booleans and U8 masks to
/// 0/1, integers exactly up to 2^53); the error names the tensor.
pub(crate) fn decode(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f64>, String> {
    fn chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        data.chunks_exact(N)
            .map(|b| b.try_into().expect("chunks_exact yields N bytes"))
    }
    Ok(match dtype {
        Dtype::F64 => chunks::<8>(data).map(f64::from_le_bytes).collect(),
        Dtype::F32 => chunks::<4>(data)
            .map(|b| f32::from_le_bytes(b) as f64)
            .collect(),
        Dtype::F16 => chunks::<2>(data)
            .map(|b| half::f16::from_le_bytes(b).to_f64())
            .collect(),
        Dtype::BF16 => chunks::<2>(data)
            .map(|b| half::bf16::from_le_bytes(b).to_f64())
            .collect(),
        Dtype::I64 => chunks::<8>(data)
            .map(|b| i64::from_le_bytes(b) as f64)
            .collect(),
        Dtype::I32 => chunks::<4>(data)
            .map(|b| i32::from_le_bytes(b) as f64)
            .collect(),
        Dtype::U8 | Dtype::BOOL => data.iter().map(|&b| b as f64).collect(),
        other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
    })
}
