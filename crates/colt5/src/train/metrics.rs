//! `metrics.csv`: one row per training step and per validation.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::Error;

const HEADER: &str = "step,split,loss,tokens_per_second,elapsed_seconds";

/// An open `metrics.csv`, appended to as training goes.
pub(crate) struct Metrics {
    file: fs::File,
    path: String,
}

impl Metrics {
    /// Opens `path` for appending, first dropping the rows after `step` (written after the
    /// checkpoint a resumed run starts from); `step` 0 starts a new file.
    pub(crate) fn open(path: &Path, step: usize) -> crate::Result<Metrics> {
        let name = path.display().to_string();
        let io = |e: std::io::Error| Error::Io {
            path: name.clone(),
            message: e.to_string(),
        };
        let kept: Vec<String> = match fs::read_to_string(path) {
            Ok(text) if step > 0 => text
                .lines()
                .skip(1)
                .filter(|line| {
                    line.split(',')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|s| s <= step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file = fs::File::create(path).map_err(io)?;
        writeln!(file, "{HEADER}").map_err(io)?;
        for line in kept {
            writeln!(file, "{line}").map_err(io)?;
        }
        Ok(Metrics { file, path: name })
    }

    /// Appends one row.
    pub(crate) fn write(
        &mut self,
        step: usize,
        split: &str,
        loss: f64,
        tokens_per_second: f64,
        elapsed: f64,
    ) -> crate::Result<()> {
        writeln!(
            self.file,
            "{step},{split},{loss:.6},{tokens_per_second:.1},{elapsed:.2}"
        )
        .map_err(|e| Error::Io {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}
