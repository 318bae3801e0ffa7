//! The loss plot written next to the checkpoints.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// DejaVu Sans Mono (free licence: `assets/DejaVu-LICENSE.txt`), so that plots need no
/// system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Draws the training and validation losses of `metrics.csv` into a PNG.
pub fn loss_curves(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        if let [step, split, loss, ..] = fields[..] {
            let (Ok(step), Ok(loss)) = (step.parse::<f64>(), loss.parse::<f64>()) else {
                continue;
            };
            match split {
                "train" => train.push((step, loss)),
                _ => valid.push((step, loss)),
            }
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    // Registering twice is harmless; the font must be known before the first text.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let max_step = train.iter().chain(&valid).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = train.iter().chain(&valid).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(png, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("colt5 train: loss (nats/byte)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, 0.0..max_loss)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(valid.iter().copied(), RED.stroke_width(2)))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", png.display()))
}
