//! Fuzzing of everything the library reads: safetensors state dicts, golden case files,
//! checkpoint directories, JSON model configurations and token inputs. Each target mutates
//! a valid input (truncation, bit flips, overwritten, inserted and deleted byte runs) and
//! feeds it to the reader and what follows it; a panic fails the test, and every outcome must
//! be a value or a typed error.
//!
//! `cargo test -p colt5 --test fuzz` runs 256 cases per target. The long mode runs 10 000
//! (ignored by default): `cargo test --release -p colt5 --test fuzz -- --ignored`. Set
//! `COLT5_FUZZ_CASES` to run another count in either mode.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::optim::AdamConfig;
use burn::tensor::{Int, Tensor, TensorData};
use colt5::golden::{case_files, Case};
use colt5::import::StateDict;
use colt5::lm::{
    check_token_ids, next_token_loss, CdTransformer, CdTransformerConfig, Colt5TransformerConfig,
    LanguageModel,
};
use colt5::parity::{run_case, Precision};
use colt5::train::checkpoint::{self, State};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

type B = NdArray<f32>;
type Ad = Autodiff<NdArray<f32>>;

/// Cases per target: `COLT5_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("COLT5_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A quick run (CI) and the long mode of each target.
const QUICK: u32 = 256;
const LONG: u32 = 10_000;

/// One edit of a byte string; positions are fractions of its length.
#[derive(Clone, Debug)]
enum Edit {
    Truncate(prop::sample::Index),
    FlipBit(prop::sample::Index, u8),
    Overwrite(prop::sample::Index, Vec<u8>),
    Insert(prop::sample::Index, Vec<u8>),
    Delete(prop::sample::Index, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let index = any::<prop::sample::Index>;
    let bytes = || prop::collection::vec(any::<u8>(), 1..16);
    prop_oneof![
        index().prop_map(Edit::Truncate),
        (index(), 0u8..8).prop_map(|(i, b)| Edit::FlipBit(i, b)),
        (index(), bytes()).prop_map(|(i, b)| Edit::Overwrite(i, b)),
        (index(), bytes()).prop_map(|(i, b)| Edit::Insert(i, b)),
        (index(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
    ]
}

/// One to four edits: most land in a file's header or data and change its meaning.
fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..5)
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        if len == 0 {
            break;
        }
        match edit {
            Edit::Truncate(i) => bytes.truncate(i.index(len)),
            Edit::FlipBit(i, bit) => bytes[i.index(len)] ^= 1 << bit,
            Edit::Overwrite(i, run) => {
                let start = i.index(len);
                for (offset, &b) in run.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(start + offset) {
                        *slot = b;
                    }
                }
            }
            Edit::Insert(i, run) => {
                let at = i.index(len);
                bytes.splice(at..at, run.iter().copied());
            }
            Edit::Delete(i, n) => {
                let start = i.index(len);
                bytes.drain(start..(start + n).min(len));
            }
        }
    }
    bytes
}

/// A fresh scratch directory for one target.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("colt5-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn small_model<Bk: burn::tensor::backend::Backend>() -> CdTransformer<Bk> {
    CdTransformerConfig::new(64, 16, 12, 1)
        .with_heads(2)
        .with_dim_head(8)
        .with_attn_use_coor_descent(true)
        .init::<Bk>(&Default::default())
        .unwrap()
}

/// Writes `base` with each case's edits to `file` and gives it to `read`, which says
/// whether it read the file (`Some`) and whether what it read was then usable (`true`):
/// the counts of both.
fn mutated_files(
    cases: u32,
    base: &[u8],
    file: &Path,
    read: impl Fn(&Path) -> Option<bool>,
) -> (u32, u32) {
    let (read_count, used) = (Cell::new(0u32), Cell::new(0u32));
    runner(cases)
        .run(&edits(), |edits| {
            std::fs::write(file, apply(base.to_vec(), &edits)).unwrap();
            if let Some(usable) = read(file) {
                read_count.set(read_count.get() + 1);
                used.set(used.get() + usable as u32);
            }
            Ok(())
        })
        .unwrap();
    (read_count.get(), used.get())
}

fn state_dicts(cases: u32) {
    let dir = scratch("state-dict");
    let valid = dir.join("valid.safetensors");
    StateDict::from_module(&small_model::<B>())
        .save(&valid)
        .unwrap();
    let base = std::fs::read(&valid).unwrap();
    let (read, loaded) = mutated_files(cases, &base, &dir.join("mutated.safetensors"), |file| {
        let dict = StateDict::load(file).ok()?;
        Some(dict.load_into(small_model::<B>()).is_ok())
    });
    println!("state dicts: {cases} cases, {read} still read, {loaded} still loaded, 0 panics");
}

/// The smallest golden case file, which exercises the case reader and the parity harness.
fn golden_case() -> Option<PathBuf> {
    let dir = match std::env::var_os("COLT5_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    };
    case_files(&dir)
        .ok()?
        .into_iter()
        .min_by_key(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(u64::MAX))
}

fn golden_cases(cases: u32) {
    let source = golden_case().expect("a golden case file (set COLT5_GOLDEN_DIR)");
    let base = std::fs::read(&source).unwrap();
    let dir = scratch("golden");
    let (read, ran) = mutated_files(cases, &base, &dir.join("case.safetensors"), |file| {
        let case = Case::load(file).ok()?;
        Some(run_case(&case, Precision::F32).is_ok())
    });
    println!(
        "golden cases ({}): {cases} cases, {read} still read, {ran} still ran, 0 panics",
        source.display()
    );
}

/// The files of a checkpoint directory, mutated one at a time (or deleted), then verified,
/// resumed from, and each read directly as if verification had passed.
fn checkpoints(cases: u32) {
    let dir = scratch("checkpoint");
    let out = dir.join("valid");
    let model = small_model::<Ad>();
    let optimizer = AdamConfig::new().init::<Ad, CdTransformer<Ad>>();
    let state = State {
        step: 3,
        config: serde_json::json!({ "seed": 1 }),
    };
    let saved = checkpoint::save(&out, &state, &model, &optimizer, 1).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    let copy = dir.join("mutated");
    let target = copy.join(saved.file_name().unwrap());
    let accepted = Cell::new(0u32);
    let strategy = (0..files.len(), any::<bool>(), edits());
    runner(cases)
        .run(&strategy, |(which, delete, edits)| {
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&target).unwrap();
            for (i, (name, bytes)) in files.iter().enumerate() {
                let path = target.join(name);
                match (i == which, delete) {
                    (true, true) => {}
                    (true, false) => std::fs::write(path, apply(bytes.clone(), &edits)).unwrap(),
                    (false, _) => std::fs::write(path, bytes).unwrap(),
                }
            }
            if checkpoint::newest_good::<serde_json::Value>(&copy).is_ok() {
                accepted.set(accepted.get() + 1);
            }
            read_everything(&target);
            Ok(())
        })
        .unwrap();
    println!(
        "checkpoints: {cases} cases, {} accepted (edits that changed nothing), 0 panics",
        accepted.get()
    );
}

/// Every reader of a checkpoint's files on `dir`, whatever verification says.
fn read_everything(dir: &Path) {
    let _ = checkpoint::verify(dir);
    let _ = checkpoint::read_state::<serde_json::Value>(dir);
    let _ = checkpoint::load_model(dir, small_model::<Ad>());
    let optimizer = AdamConfig::new().init::<Ad, CdTransformer<Ad>>();
    let _ =
        checkpoint::load_optimizer::<Ad, CdTransformer<Ad>, _>(dir, optimizer, &Default::default());
}

/// A JSON value to put in place of a configuration field.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        8 => (0i64..300).prop_map(Value::from),
        2 => any::<i64>().prop_map(Value::from),
        2 => any::<f64>().prop_map(Value::from),
        4 => (-1.0f64..2.0).prop_map(Value::from),
        1 => "[a-z]{0,6}".prop_map(Value::from),
        1 => Just(Value::Array(vec![])),
    ]
}

/// Both models' JSON configurations with fields replaced by other values, removed or added,
/// or the text itself edited: parsed, estimated, and built where the sizes stay small (a
/// replaced number can ask for more memory than the machine has; the weights check refuses
/// those the host cannot hold, and building one that fits but is large would only be slow).
fn configs(cases: u32) {
    use serde_json::Value;
    let colt5 = Colt5TransformerConfig::new(64, 16, 32, 1)
        .with_window_size(8)
        .with_heads(2)
        .with_dim_head(8)
        .with_num_heavy_tokens_kv(4)
        .with_num_heavy_ff_tokens(2);
    let cd = CdTransformerConfig::new(64, 16, 12, 1)
        .with_heads(2)
        .with_dim_head(8);
    let values = [
        serde_json::to_value(&colt5).unwrap(),
        serde_json::to_value(&cd).unwrap(),
    ];
    let small = |value: &Value| {
        value.as_object().is_some_and(|fields| {
            fields
                .values()
                .all(|v| v.as_f64().is_none_or(|x| x.abs() <= 256.0))
        })
    };
    assert!(values.iter().all(small), "the unmutated configs are small");
    let (parsed, built) = (Cell::new(0u32), Cell::new(0u32));
    let mutation = (
        0..2usize,
        prop::collection::vec(
            (any::<prop::sample::Index>(), prop::option::of(json_value())),
            1..4,
        ),
        prop::option::weighted(0.3, edits()),
    );
    runner(cases)
        .run(&mutation, |(which, fields, edits)| {
            let mut value = values[which].clone();
            let object = value.as_object_mut().unwrap();
            for (field, replacement) in fields {
                let names: Vec<String> = object.keys().cloned().collect();
                let name = names[field.index(names.len())].clone();
                match replacement {
                    Some(v) => object.insert(name, v),
                    None => object.remove(&name),
                };
            }
            let mut text = serde_json::to_vec(&value).unwrap();
            if let Some(edits) = edits {
                text = apply(text, &edits);
            }
            let Ok(value) = serde_json::from_slice::<Value>(&text) else {
                return Ok(());
            };
            let build = |estimate: colt5::memory::MemoryEstimate| {
                // Estimates of any sizes are finite or infinite numbers, never a panic.
                let _ = estimate.training_bytes(8, 1 << 20);
                small(&value)
            };
            let ok = match which {
                0 => serde_json::from_value::<Colt5TransformerConfig>(value.clone())
                    .ok()
                    .map(|c| {
                        build(c.memory_estimate()) && c.init::<B>(&Default::default()).is_ok()
                    }),
                _ => serde_json::from_value::<CdTransformerConfig>(value.clone())
                    .ok()
                    .map(|c| {
                        build(c.memory_estimate()) && c.init::<B>(&Default::default()).is_ok()
                    }),
            };
            if let Some(ok) = ok {
                parsed.set(parsed.get() + 1);
                built.set(built.get() + ok as u32);
            }
            Ok(())
        })
        .unwrap();
    println!(
        "configs: {cases} cases, {} parsed, {} built, 0 panics",
        parsed.get(),
        built.get()
    );
}

/// Token sequences of any length and any ids, valid or not, through the host check and
/// (valid ones, or any in debug builds where the model checks) the models and the loss.
fn tokens(cases: u32) {
    let cd = small_model::<B>();
    let colt5 = Colt5TransformerConfig::new(64, 16, 32, 1)
        .with_window_size(8)
        .with_heads(2)
        .with_dim_head(8)
        .with_num_heavy_tokens_kv(4)
        .with_num_heavy_ff_tokens(2)
        .init::<B>(&Default::default())
        .unwrap();
    let ids = prop::collection::vec(
        prop_oneof![8 => 0i64..64, 1 => any::<i64>(), 1 => -3i64..70],
        0..40,
    );
    let valid = Cell::new(0u32);
    runner(cases)
        .run(&(ids, 1usize..3), |(ids, batch)| {
            let checked = check_token_ids(&ids, 64);
            valid.set(valid.get() + checked.is_ok() as u32);
            let len = ids.len() / batch;
            if len == 0 || (checked.is_err() && !cfg!(debug_assertions)) {
                return Ok(());
            }
            let data = TensorData::new(ids[..batch * len].to_vec(), [batch, len]);
            let t = Tensor::<B, 2, Int>::from_data(data, &Default::default());
            let _ = cd.forward(t.clone());
            let _ = colt5.forward(t.clone());
            let _ = next_token_loss(&cd, t.clone());
            let _ = next_token_loss(&colt5, t);
            Ok(())
        })
        .unwrap();
    println!(
        "token inputs: {cases} cases, {} valid, 0 panics",
        valid.get()
    );
}

macro_rules! fuzz_targets {
    ($($target:ident, $long:ident;)*) => {$(
        #[test]
        fn $target() {
            super::$target(super::cases(super::QUICK));
        }

        #[test]
        #[ignore = "long mode: cargo test --release -p colt5 --test fuzz -- --ignored"]
        fn $long() {
            super::$target(super::cases(super::LONG));
        }
    )*};
}

mod fuzz {
    fuzz_targets! {
        state_dicts, state_dicts_long;
        golden_cases, golden_cases_long;
        checkpoints, checkpoints_long;
        configs, configs_long;
        tokens, tokens_long;
    }
}
