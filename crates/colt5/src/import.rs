//! PyTorch `state_dict`s (safetensors): loading them into our modules, and saving our
//! modules in the same format (checkpoints that the reference can load too).
//!
//! Our modules keep the reference's structure, so a parameter's PyTorch name is its path of
//! field names, except where the reference used an `nn.Sequential` (positional names) —
//! [`torch_field`] lists those renames — and linear weights, which PyTorch stores
//! `[out, in]` and burn `[in, out]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use std::io::Write;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::Error;
use crate::golden::CaseTensor;

/// Tensors by PyTorch parameter name, values in f64.
#[derive(Clone, Debug, Default)]
pub struct StateDict {
    /// Every tensor by name.
    pub tensors: BTreeMap<String, CaseTensor>,
    /// Where it came from, for error messages.
    pub source: String,
}

impl StateDict {
    /// Reads a safetensors file of a PyTorch `state_dict` (f32, f64, f16 or bf16 tensors).
    pub fn load(path: &Path) -> crate::Result<StateDict> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: source.clone(),
            message: e.to_string(),
        })?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
            path: source.clone(),
            message: format!("not a safetensors file: {e}"),
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let values =
                crate::golden::decode(&name, view.dtype(), view.data()).map_err(|message| {
                    Error::Format {
                        path: source.clone(),
                        message,
                    }
                })?;
            let shape = view.shape().to_vec();
            tensors.insert(name, CaseTensor { shape, values });
        }
        Ok(StateDict { tensors, source })
    }

    /// Every parameter of `module` under its PyTorch name, in PyTorch's layout.
    pub fn from_module<B: Backend, M: Module<B>>(module: &M) -> StateDict {
        let tensors = torch_params(module, Values)
            .into_iter()
            .map(|(name, data)| {
                let shape = data.shape.to_vec();
                let values = data.convert::<f64>().to_vec::<f64>().unwrap_or_default();
                (name, CaseTensor { shape, values })
            })
            .collect();
        StateDict {
            tensors,
            source: String::new(),
        }
    }

    /// Writes the tensors as an f32 safetensors file, atomically: a temporary file beside
    /// `path` is written and synced, then renamed over it, so a crash never leaves a partial
    /// file at `path`.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let data = t
                    .values
                    .iter()
                    .flat_map(|&v| (v as f32).to_le_bytes())
                    .collect();
                (name.clone(), t.shape.clone(), data)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Format {
                path: path.display().to_string(),
                message: format!("cannot serialise: {e}"),
            })?;
        let serialized =
            safetensors::tensor::serialize(views, &None).map_err(|e| Error::Format {
                path: path.display().to_string(),
                message: format!("cannot serialise: {e}"),
            })?;
        let file_name = path
            .file_name()
            .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
        let temporary = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&serialized)?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(io)
    }

    /// The `param.*` tensors of a golden case, under their PyTorch names.
    pub fn from_case(case: &crate::golden::Case) -> StateDict {
        let tensors = case
            .tensors
            .iter()
            .filter_map(|(key, tensor)| {
                key.strip_prefix("param.")
                    .map(|name| (name.to_string(), tensor.clone()))
            })
            .collect();
        StateDict {
            tensors,
            source: case.path.display().to_string(),
        }
    }

    /// Loads every parameter of `module` from this state dict.
    ///
    /// The error lists every missing, unexpected and mis-shaped tensor at once.
    pub fn load_into<B: Backend, M: Module<B>>(&self, module: M) -> crate::Result<M> {
        self.map_params(module, None)
    }

    /// [`load_into`](Self::load_into), also giving every parameter its id from `ids` (from
    /// [`param_ids`]; optimizer state is keyed by them). A parameter without one is an error.
    pub fn load_into_with_ids<B: Backend, M: Module<B>>(
        &self,
        module: M,
        ids: &BTreeMap<String, u64>,
    ) -> crate::Result<M> {
        self.map_params(module, Some(ids))
    }

    fn map_params<B: Backend, M: Module<B>>(
        &self,
        module: M,
        ids: Option<&BTreeMap<String, u64>>,
    ) -> crate::Result<M> {
        let mut loader = Loader {
            state: self,
            ids,
            path: Vec::new(),
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let module = module.map(&mut loader);
        let mut problems = loader.problems;
        for (name, tensor) in &self.tensors {
            // Zero-element tensors (the reference registers an empty `null_kv` when it has
            // no null keys) carry nothing to load.
            let empty = tensor.values.is_empty();
            if !loader.used.contains(name) && !is_buffer(name) && !empty {
                problems.push(format!("unexpected tensor `{name}`"));
            }
        }
        if problems.is_empty() {
            Ok(module)
        } else {
            Err(Error::Format {
                path: self.source.clone(),
                message: format!("cannot load the weights: {}", problems.join("; ")),
            })
        }
    }
}

/// Non-parameter buffers the reference saves in its `state_dict` and we compute.
fn is_buffer(name: &str) -> bool {
    name.ends_with("inv_freq")
}

/// The PyTorch name of field `field` of a module of burn container type `container`
/// (`Struct:Name`): positional names where the reference builds an `nn.Sequential`, and
/// PyTorch's names for burn's LayerNorm parameters.
pub fn torch_field<'a>(container: &str, field: &'a str) -> &'a str {
    match (container, field) {
        ("Struct:FeedForward", "norm") => "0",
        ("Struct:FeedForward", "proj_in") => "1",
        ("Struct:FeedForward", "proj_out") => "3",
        ("Struct:ConditionalRoutedViT", "patch_norm") => "to_patch_embedding.1",
        ("Struct:ConditionalRoutedViT", "patch_embedding") => "to_patch_embedding.2",
        ("Struct:ConditionalRoutedViT", "embedding_norm") => "to_patch_embedding.3",
        ("Struct:ConditionalRoutedViT", "layers") => "transformer.layers",
        ("Struct:ConditionalRoutedViT", "head_norm") => "linear_head.1",
        ("Struct:ConditionalRoutedViT", "head") => "linear_head.2",
        ("Struct:ViTBlock", "attention") => "0",
        ("Struct:ViTBlock", "feed_forward") => "1",
        ("Struct:CdFeedForward", "norm") => "proj_in.0",
        ("Struct:CdFeedForward", "proj_in") => "proj_in.1",
        ("Struct:CdBlock", "attention") => "0",
        ("Struct:CdBlock", "feed_forward") => "1",
        ("Struct:CdTransformer", "logits_norm") => "to_logits.0",
        ("Struct:CdTransformer", "to_logits") => "to_logits.1",
        ("Struct:LayerNorm", "gamma") => "weight",
        ("Struct:LayerNorm", "beta") => "bias",
        _ => field,
    }
}

/// The PyTorch name of the parameter at `path` (field name, container type of each level),
/// and whether its layout is transposed relative to ours (linear weights).
///
/// Levels inside an enum module (`Enum:…`, a choice among architectures) name the variant,
/// which PyTorch's modules do not have: they are left out.
pub fn torch_name(path: &[(String, String)]) -> (String, bool) {
    let name = path
        .iter()
        .filter(|(_, container)| !container.starts_with("Enum:"))
        .map(|(field, container)| torch_field(container, field))
        .collect::<Vec<_>>()
        .join(".");
    let transposed = path
        .last()
        .is_some_and(|(field, container)| container == "Struct:Linear" && field == "weight");
    (name, transposed)
}

struct Loader<'a> {
    state: &'a StateDict,
    /// Parameter ids to assign by name; `None` keeps the module's own.
    ids: Option<&'a BTreeMap<String, u64>>,
    path: Vec<(String, String)>,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (name, transposed) = torch_name(&self.path);
        let Some(stored) = self.state.tensors.get(&name) else {
            self.problems.push(format!("missing tensor `{name}`"));
            return param;
        };
        self.used.insert(name.clone());
        let ours = param.dims();
        let mut expected: Vec<usize> = ours.to_vec();
        if transposed {
            expected.reverse();
        }
        if stored.shape != expected {
            self.problems.push(format!(
                "`{name}` has shape {:?}, expected {expected:?}",
                stored.shape
            ));
            return param;
        }
        let (mut id, tensor, _) = param.consume();
        if let Some(ids) = self.ids {
            match ids.get(&name) {
                Some(&stored) => id = ParamId::from(stored),
                None => self.problems.push(format!("no parameter id for `{name}`")),
            }
        }
        let data = TensorData::new(stored.values.clone(), stored.shape.clone())
            .convert::<burn::tensor::ops::FloatElem<B>>();
        let mut value = Tensor::<B, D>::from_data(data, &tensor.device());
        if transposed {
            value = value.transpose();
        }
        Param::initialized(id, value.require_grad())
    }
}

/// The [`ParamId`] of every parameter of `module`, by PyTorch name. Optimizer state is keyed
/// by these ids, so a checkpoint stores them beside the weights.
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, u64> {
    struct Ids {
        path: Vec<(String, String)>,
        found: BTreeMap<String, u64>,
    }
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path
                .push((name.to_string(), container_type.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.found.insert(torch_name(&self.path).0, param.id.val());
        }
    }
    let mut ids = Ids {
        path: Vec::new(),
        found: BTreeMap::new(),
    };
    module.visit(&mut ids);
    ids.found
}

/// Reads one tensor per parameter for [`torch_params`]: its value, its gradient, ...
pub(crate) trait ParamReader<B: Backend> {
    /// The backend of the tensors read.
    type Output: Backend;
    /// The tensor of `param`, if it has one.
    fn read<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Option<Tensor<Self::Output, D>>;
}

/// What `reader` reads of every parameter of `module`, by PyTorch name and in PyTorch's
/// layout.
pub(crate) fn torch_params<B: Backend, M: Module<B>, R: ParamReader<B>>(
    module: &M,
    reader: R,
) -> BTreeMap<String, TensorData> {
    let mut visitor = TorchParams {
        reader,
        path: Vec::new(),
        found: BTreeMap::new(),
    };
    module.visit(&mut visitor);
    visitor.found
}

struct TorchParams<R> {
    reader: R,
    path: Vec<(String, String)>,
    found: BTreeMap<String, TensorData>,
}

impl<B: Backend, R: ParamReader<B>> ModuleVisitor<B> for TorchParams<R> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (name, transposed) = torch_name(&self.path);
        if let Some(value) = self.reader.read(param) {
            let value = if transposed { value.transpose() } else { value };
            self.found.insert(name, value.into_data());
        }
    }
}

/// Reads parameter values.
struct Values;

impl<B: Backend> ParamReader<B> for Values {
    type Output = B;

    fn read<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Option<Tensor<B, D>> {
        Some(param.val())
    }
}
