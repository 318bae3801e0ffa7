//! `colt5 train` and `colt5 generate` end to end: learning, resumption, bad input.

use std::path::Path;

use assert_cmd::Command;

fn colt5() -> Command {
    Command::cargo_bin("colt5").unwrap()
}

/// A small model and schedule that train in seconds.
const TINY: &[&str] = &[
    "--dim",
    "32",
    "--depth",
    "1",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-every",
    "10",
    "--checkpoint-every",
    "10",
];

/// A text of a few repeated English sentences.
fn write_text(dir: &Path) -> std::path::PathBuf {
    let paragraph = "The quick brown fox jumps over the lazy dog. A journey of a thousand \
                     miles begins with a single step. All that glitters is not gold. ";
    let path = dir.join("text.txt");
    std::fs::write(&path, paragraph.repeat(200)).unwrap();
    path
}

fn unigram_entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / bytes.len() as f64;
            -p * p.ln()
        })
        .sum()
}

/// The (step, loss) rows of one split of `metrics.csv`.
fn losses(out: &Path, split: &str) -> Vec<(usize, String)> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields[1] == split).then(|| (fields[0].parse().unwrap(), fields[2].to_string()))
        })
        .collect()
}

fn train(out: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    colt5()
        .arg("train")
        .arg("--out")
        .arg(out)
        .arg("--data")
        .arg(data)
        .args(TINY)
        .args(extra)
        .output()
        .unwrap()
}

fn one_line_error(output: &std::process::Output) -> String {
    assert!(!output.status.success(), "the command should have failed");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"))
        .to_string();
    line
}

fn no_temporary_checkpoints(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.ends_with(".tmp"),
                "partial checkpoint {name} left behind"
            );
        }
    }
}

#[test]
fn training_beats_the_unigram_entropy_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let out = dir.path().join("run");
    let output = train(&out, &data, &["--steps", "40", "--lr", "3e-3"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read(&data).unwrap();
    let entropy = unigram_entropy(&text[..text.len() * 90 / 100]);
    let (step, last) = losses(&out, "valid").pop().unwrap();
    let last: f64 = last.parse().unwrap();
    assert_eq!(step, 40);
    assert!(
        last < entropy,
        "validation loss {last} ≥ unigram entropy {entropy}"
    );
    assert!(out.join("loss.png").exists());
    let generated = colt5()
        .args([
            "generate",
            "--prompt",
            "The quick",
            "--length",
            "20",
            "--checkpoint",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(generated.status.success());
    let stdout = generated.stdout;
    assert!(stdout.starts_with(b"The quick"));
    assert_eq!(stdout.len(), "The quick".len() + 20 + 1);
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    assert!(train(&straight, &data, &["--steps", "20"]).status.success());
    assert!(train(&split, &data, &["--steps", "10"]).status.success());
    // A run killed after step 10's checkpoint continues from it.
    let resumed = colt5()
        .args(["train", "--resume", "--steps", "20", "--out"])
        .arg(&split)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    for kind in ["train", "valid"] {
        let (a, b) = (losses(&straight, kind), losses(&split, kind));
        assert_eq!(a.len(), if kind == "train" { 20 } else { 2 });
        assert_eq!(a, b, "{kind} losses differ after resuming");
    }
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let out = dir.path().join("run");

    let missing = train(&out, &dir.path().join("absent.txt"), &["--steps", "1"]);
    assert!(one_line_error(&missing).contains("absent.txt"));

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(one_line_error(&train(&out, &empty, &["--steps", "1"])).contains("empty"));

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    assert!(one_line_error(&train(&out, &short, &["--steps", "1"])).contains("fewer than"));

    assert!(one_line_error(&train(&out, &data, &["--lr", "0"])).contains("lr"));
    assert!(one_line_error(&train(&out, &data, &["--steps", "0"])).contains("steps"));

    let config = dir.path().join("config.toml");
    std::fs::write(&config, "batch_size = \"many\"").unwrap();
    let line = one_line_error(&train(&out, &data, &["--config", config.to_str().unwrap()]));
    assert!(line.contains("config.toml"), "{line}");

    // A run to damage.
    assert!(train(&out, &data, &["--steps", "10"]).status.success());
    let again = train(&out, &data, &["--steps", "10"]);
    assert!(one_line_error(&again).contains("--resume"));
    let checkpoint = out.join("checkpoint-00000010");
    let model = std::fs::read_dir(&checkpoint)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model")
        })
        .unwrap();
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let resumed = colt5()
        .args(["train", "--resume", "--steps", "20", "--out"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(one_line_error(&resumed).contains("checkpoint-00000010"));
    let generated = colt5()
        .args(["generate", "--checkpoint"])
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(one_line_error(&generated).contains("checkpoint-00000010"));
    std::fs::write(checkpoint.join("state.json"), "{").unwrap();
    let generated = colt5()
        .args(["generate", "--checkpoint"])
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(one_line_error(&generated).contains("corrupt"));
    let missing = colt5()
        .args(["generate", "--checkpoint"])
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(one_line_error(&missing).contains("nowhere"));
    no_temporary_checkpoints(&out);
}
