//! Checkpoint corruption: every file of a checkpoint truncated or with one bit flipped fails
//! verification with an error naming that file, and resuming falls back to the newest
//! checkpoint that verifies, reporting the ones it skipped.

use burn::backend::{Autodiff, NdArray};
use burn::optim::AdamConfig;
use colt5::lm::{CdTransformer, CdTransformerConfig};
use colt5::train::checkpoint::{self, State};

type B = Autodiff<NdArray<f32>>;

/// Checkpoints of steps 2 and 4 of a small model under `out`; returns their directories.
fn two_checkpoints(out: &std::path::Path) -> [std::path::PathBuf; 2] {
    let model: CdTransformer<B> = CdTransformerConfig::new(64, 16, 12, 1)
        .with_heads(2)
        .with_dim_head(8)
        .init(&Default::default())
        .unwrap();
    let optimizer = AdamConfig::new().init::<B, CdTransformer<B>>();
    [2, 4].map(|step| {
        let state = State {
            step,
            config: serde_json::json!({ "seed": 7 }),
        };
        checkpoint::save(out, &state, &model, &optimizer, 2).unwrap()
    })
}

/// The files of a checkpoint, by name.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn every_damaged_file_is_named_and_resuming_falls_back() {
    let out = tempfile::tempdir().unwrap();
    let [older, newest] = two_checkpoints(out.path());
    let names = files(&newest);
    assert_eq!(
        names,
        [
            "manifest.json",
            "model.safetensors",
            "optimizer.mpk",
            "param_ids.json",
            "state.json"
        ]
    );
    for name in &names {
        let path = newest.join(name);
        let original = std::fs::read(&path).unwrap();
        let damages: [(&str, Vec<u8>); 2] = [
            ("truncated", original[..original.len() / 2].to_vec()),
            ("bit-flipped", {
                let mut flipped = original.clone();
                let middle = flipped.len() / 2;
                flipped[middle] ^= 0x10;
                flipped
            }),
        ];
        for (damage, bytes) in damages {
            std::fs::write(&path, &bytes).unwrap();
            let error = checkpoint::verify(&newest)
                .expect_err(&format!("{name} {damage} passed verification"))
                .to_string();
            assert!(error.contains(name.as_str()), "{name} {damage}: {error}");
            let (found, skipped) =
                checkpoint::newest_good::<serde_json::Value>(out.path()).unwrap();
            assert_eq!(found.path, older, "{name} {damage}");
            assert_eq!(found.state.step, 2);
            assert_eq!(skipped.len(), 1);
            assert_eq!(skipped[0].step, 4);
            // A checkpoint named directly is never skipped: its error is the answer.
            assert!(checkpoint::newest_good::<serde_json::Value>(&newest).is_err());
        }
        std::fs::write(&path, &original).unwrap();
        checkpoint::verify(&newest).unwrap();
    }
    // Both damaged: an error that says so, naming the newest's problem.
    std::fs::remove_file(newest.join("state.json")).unwrap();
    std::fs::remove_file(older.join("model.safetensors")).unwrap();
    let error = checkpoint::newest_good::<serde_json::Value>(out.path())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("2 damaged") && error.contains("state.json"),
        "{error}"
    );
}
