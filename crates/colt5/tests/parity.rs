//! Golden parity: every case file in `COLT5_GOLDEN_DIR` (default `../shared/golden` beside
//! the repository) is loaded and run in f64 and f32; outputs and gradients must match the
//! PyTorch reference within the golden README's tolerances.

use std::path::PathBuf;

use colt5::golden::{case_files, Case};
use colt5::parity::{run_case, Outcome, Precision};

/// Reference modules whose golden cases exist but which this version does not implement yet.
/// A case of any module that is neither implemented nor listed here fails the test.
const NOT_YET_IMPLEMENTED: &[&str] = &[];

fn golden_dir() -> PathBuf {
    match std::env::var_os("COLT5_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    }
}

#[test]
fn golden_cases_match_the_reference() {
    let dir = golden_dir();
    let files = case_files(&dir).unwrap_or_else(|e| panic!("{e} (set COLT5_GOLDEN_DIR)"));
    assert!(
        !files.is_empty(),
        "no *.safetensors case in {} (set COLT5_GOLDEN_DIR)",
        dir.display()
    );
    let mut failures = Vec::new();
    let mut compared = 0;
    for file in &files {
        let case = Case::load(file).unwrap_or_else(|e| panic!("cannot read a golden case: {e}"));
        for precision in [Precision::F64, Precision::F32] {
            let outcome =
                run_case(&case, precision).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            match outcome {
                Outcome::Compared(comparisons) => {
                    compared += 1;
                    for c in comparisons {
                        println!(
                            "{} {precision:?} {}: max abs {:.3e}, rel {:.3e} (tol {:.1e})",
                            file.display(),
                            c.name,
                            c.max_abs,
                            c.relative,
                            c.tolerance
                        );
                        if !c.ok() {
                            failures.push(format!("{} {precision:?} {c:?}", file.display()));
                        }
                    }
                }
                Outcome::Unsupported => {
                    if !NOT_YET_IMPLEMENTED.contains(&case.module.as_str()) {
                        failures.push(format!(
                            "{}: unrecognised module `{}`",
                            file.display(),
                            case.module
                        ));
                    } else if precision == Precision::F64 {
                        println!(
                            "{}: module `{}` not implemented yet",
                            file.display(),
                            case.module
                        );
                    }
                }
            }
        }
    }
    assert!(
        compared > 0,
        "no golden case of an implemented module in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}
