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
    "--warmup-steps",
    "4",
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

/// `TINY` with the flags of `extra` (flag-value pairs, or lone switches) replacing its own.
fn tiny_with(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    for pair in TINY.chunks(2) {
        if !extra.contains(&pair[0]) {
            args.extend(pair.iter().map(|s| s.to_string()));
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `colt5 train --out OUT --data DATA ARGS…`.
fn train_command<S: AsRef<std::ffi::OsStr>>(
    out: &Path,
    data: &Path,
    args: impl IntoIterator<Item = S>,
) -> std::process::Command {
    let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("colt5"));
    command
        .arg("train")
        .arg("--out")
        .arg(out)
        .arg("--data")
        .arg(data)
        .args(args);
    command
}

/// A tiny run from scratch, `extra` replacing `TINY`'s flags.
fn train(out: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    train_command(out, data, tiny_with(extra)).output().unwrap()
}

/// `--resume` of the run in `out`, with `extra` flags.
fn resume(out: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    train_command(out, data, ["--resume"].iter().chain(extra))
        .output()
        .unwrap()
}

/// Fails with the command's stderr unless it succeeded.
fn assert_succeeded(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
    let output = train(
        &out,
        &data,
        &["--steps", "40", "--lr", "3e-3", "--final-lr-fraction", "1"],
    );
    assert_succeeded(&output);
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

    // A batch of prompts: each continues as it would alone (prompt i with seed i).
    let generate_raw = |prompt_flag: &str, value: &std::ffi::OsStr, seed: &str| {
        let output = colt5()
            .args([
                "generate",
                "--raw",
                "--length",
                "20",
                "--seed",
                seed,
                prompt_flag,
            ])
            .arg(value)
            .arg("--checkpoint")
            .arg(&out)
            .output()
            .unwrap();
        assert_succeeded(&output);
        output.stdout
    };
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The quick\n\nA\n").unwrap();
    let batched = generate_raw("--prompts", prompts.as_os_str(), "0");
    let mut expected = Vec::new();
    for (i, prompt) in ["The quick", "A"].iter().enumerate() {
        let alone = generate_raw("--prompt", prompt.as_ref(), &i.to_string());
        expected.extend(format!("==> prompt {i} <==\n").bytes());
        expected.extend(&alone);
        expected.push(b'\n');
    }
    assert_eq!(batched, expected);
    std::fs::write(&prompts, "\n\n").unwrap();
    let empty = colt5()
        .args(["generate", "--prompts"])
        .arg(&prompts)
        .arg("--checkpoint")
        .arg(&out)
        .output()
        .unwrap();
    assert!(one_line_error(&empty).contains("holds no prompt"));
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    // A constant rate after the warm-up: a decay would depend on `--steps`, which differs
    // between the two halves (runs killed mid-schedule are the SIGKILL test's).
    let constant = ["--final-lr-fraction", "1"];
    let with = |steps| [&["--steps", steps][..], &constant].concat();
    assert!(train(&straight, &data, &with("20")).status.success());
    assert!(train(&split, &data, &with("10")).status.success());
    // A run stopped after step 10's checkpoint continues from it.
    let resumed = resume(&split, &data, &["--steps", "20"]);
    assert_succeeded(&resumed);
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
    let resumed = resume(&out, &data, &["--steps", "20"]);
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

/// The checkpoint steps under `out`.
fn checkpoint_steps(out: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(out)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("checkpoint-")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let out = dir.path().join("run");

    let wild = train(&out, &data, &["--steps", "20", "--lr", "1e6"]);
    let line = one_line_error(&wild);
    assert!(line.contains("diverged at step 2"), "{line}");
    assert!(checkpoint_steps(&out).is_empty());

    let good = dir.path().join("good");
    let ten = train(&good, &data, &["--steps", "10", "--checkpoint-every", "5"]);
    assert!(ten.status.success());
    let resumed = resume(&good, &data, &["--steps", "20", "--lr", "1e6"]);
    let line = one_line_error(&resumed);
    assert!(line.contains("diverged at step 12"), "{line}");
    // Step 11's update ruined the weights that the step-15 checkpoint would have held.
    assert_eq!(checkpoint_steps(&good), vec![5, 10]);

    let unchecked = resume(
        &good,
        &data,
        &["--steps", "13", "--lr", "1e6", "--no-divergence-check"],
    );
    assert_succeeded(&unchecked);
}

/// Starts `colt5 train` in the background.
fn spawn_train(out: &Path, data: &Path, extra: &[&str]) -> std::process::Child {
    train_command(out, data, tiny_with(extra))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `metrics.csv` under `out` records at least `rows` training steps.
fn wait_for_steps(out: &Path, rows: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(out.join("metrics.csv"))
        .map_or(0, |t| t.lines().filter(|l| l.contains(",train,")).count())
        < rows
    {
        assert!(
            std::time::Instant::now() < deadline,
            "training made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn ctrl_c_and_sigterm_checkpoint_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let straight = dir.path().join("straight");
    assert!(train(&straight, &data, &["--steps", "40"]).status.success());
    for (name, code) in [("INT", 130), ("TERM", 143)] {
        let out = dir.path().join(name);
        let child = spawn_train(&out, &data, &["--steps", "40"]);
        wait_for_steps(&out, 3);
        signal(&child, name);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let stopped_at = losses(&out, "train").len();
        assert!(stopped_at < 40, "SIG{name} did not stop the run");
        assert_eq!(checkpoint_steps(&out).last(), Some(&stopped_at));
        no_temporary_checkpoints(&out);
        let resumed = resume(&out, &data, &["--steps", "40"]);
        assert!(resumed.status.success());
        for kind in ["train", "valid"] {
            assert_eq!(
                losses(&straight, kind),
                losses(&out, kind),
                "{kind} after SIG{name}"
            );
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let straight = dir.path().join("straight");
    let schedule = ["--steps", "200", "--checkpoint-every", "2"];
    assert!(train(&straight, &data, &schedule).status.success());
    let out = dir.path().join("killed");
    // A fixed pseudo-random sequence of delays (xorshift), so that failures reproduce.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut kills = 0;
    while kills < 20 {
        let fresh = checkpoint_steps(&out).is_empty();
        let args = match fresh {
            true => tiny_with(&schedule),
            false => vec!["--resume".into(), "--steps".into(), "200".into()],
        };
        let mut child = train_command(&out, &data, args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(std::time::Duration::from_millis(100 + state % 500));
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let finished = match checkpoint_steps(&out).last() {
        Some(&200) => true,
        _ => resume(&out, &data, &["--steps", "200"]).status.success(),
    };
    assert!(finished);
    eprintln!("survived {kills} SIGKILLs");
    assert!(
        kills >= 20,
        "the run finished after {kills} kills: lengthen it"
    );
    for kind in ["train", "valid"] {
        assert_eq!(
            losses(&straight, kind),
            losses(&out, kind),
            "{kind} after {kills} kills"
        );
    }
    let weights = |run: &Path| std::fs::read(run.join("checkpoint-00000200/model.safetensors"));
    assert_eq!(weights(&straight).unwrap(), weights(&out).unwrap());
    no_temporary_checkpoints(&out);
}

#[test]
fn cuda_without_a_gpu_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let output = train(&dir.path().join("run"), &data, &["--backend", "cuda"]);
    if output.status.success() {
        return; // a machine with a GPU and a CUDA build
    }
    let line = one_line_error(&output);
    assert!(line.contains("CUDA"), "{line}");
}

#[test]
fn a_run_too_large_for_memory_is_refused_before_allocation() {
    // Dense attention at 200 000 tokens keeps 4 · 200 000² logits per layer: terabytes.
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let output = train(
        &dir.path().join("run"),
        &data,
        &["--seq-len", "200000", "--model", "cd-attention"],
    );
    let line = one_line_error(&output);
    assert!(
        line.contains("needs about") && line.contains("MiB"),
        "{line}"
    );
    assert!(!dir.path().join("run").join("metrics.csv").exists());
}

/// The CPU backend splits work across threads in a fixed way: one thread and four threads
/// train to the same losses and byte-identical weights, so a run resumes exactly on a
/// machine with another core count.
#[test]
fn one_and_four_threads_train_to_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let run = |threads: &str| {
        let out = dir.path().join(format!("threads-{threads}"));
        let args = tiny_with(&[
            "--dim",
            "64",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
            "--steps",
            "6",
            "--checkpoint-every",
            "6",
        ]);
        let output = train_command(&out, &data, args)
            .env("RAYON_NUM_THREADS", threads)
            .env("MATMUL_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert_succeeded(&output);
        out
    };
    let (one, four) = (run("1"), run("4"));
    assert_eq!(losses(&one, "train"), losses(&four, "train"));
    let weights = |run: &Path| std::fs::read(run.join("checkpoint-00000006/model.safetensors"));
    assert_eq!(weights(&one).unwrap(), weights(&four).unwrap());
}
