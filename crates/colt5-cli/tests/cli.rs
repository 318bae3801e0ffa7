//! The `colt5` command line: exit codes and messages.

use std::path::PathBuf;

use assert_cmd::Command;

fn golden_dir() -> PathBuf {
    match std::env::var_os("COLT5_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    }
}

fn colt5() -> Command {
    Command::cargo_bin("colt5").unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn parity_passes_on_the_coor_descent_cases() {
    let dir = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(golden_dir()).expect("golden directory") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("coor_descent_") && name.ends_with(".safetensors") {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert!(copied > 0, "no coor_descent case in the golden directory");
    let output = colt5().arg("parity").arg(dir.path()).output().unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(&format!("{copied} passed, 0 failed, 0 unsupported")),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with(" ok")).count(),
        copied,
        "{text}"
    );
}

#[test]
fn parity_fails_on_a_corrupt_case_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let output = colt5().arg("parity").arg(dir.path()).output().unwrap();
    let text = stdout(&output);
    assert!(!output.status.success());
    assert!(text.contains("broken.safetensors  FAIL"), "{text}");
    assert!(text.contains("0 passed, 1 failed, 0 unsupported"), "{text}");
}

#[test]
fn parity_rejects_an_empty_or_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = colt5().arg("parity").arg(dir.path()).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no *.safetensors case files"));

    let output = colt5()
        .args(["parity", "/nonexistent/golden"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/golden"));
}

#[test]
fn demo_reports_both_solvers() {
    let output = colt5()
        .args(["demo", "--batch", "2", "--tokens", "256", "--route", "32"])
        .output()
        .unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("reference schedule") && text.contains("converged solver"),
        "{text}"
    );
}

#[test]
fn demo_rejects_more_routed_tokens_than_tokens() {
    let output = colt5()
        .args(["demo", "--tokens", "16", "--route", "32"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--route must be between 1 and --tokens (16)"),
        "{stderr}"
    );
}
