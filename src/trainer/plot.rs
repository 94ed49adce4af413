//! The training-curve plot: train/test loss and accuracy per epoch, as a PNG.

use super::Metrics;
use crate::error::{Error, Result};
use image::ImageEncoder;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1200, 480);

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Config(
            "the embedded plot font failed to load".into(),
        ))
    }
}

/// A labelled, coloured series of `(epoch, value)` points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Points `(epoch, value)` of one metric over the history.
fn series(history: &[Metrics], name: &str) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|m| Some((*m.get("epoch")?, *m.get(name)?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Draws train/test loss (left) and accuracy (right) against the epoch into `path`
/// (PNG, 1200 × 480). The PNG replaces the previous one whole (temporary file, then
/// rename): a failed write, e.g. on a full disk, leaves the last good plot.
pub fn plot_metrics(history: &[Metrics], path: &Path) -> Result<()> {
    register_font()?;
    let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw(history, &mut buf).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("drawing the plot: {e}"),
    })?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&buf, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("encoding PNG: {e}"),
        })?;
    crate::files::write_replacing(path, &png)
}

fn draw(
    history: &[Metrics],
    buf: &mut [u8],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let last_epoch = history
        .iter()
        .filter_map(|m| m.get("epoch"))
        .fold(1.0f64, |a, &b| a.max(b));
    let panels = root.split_evenly((1, 2));
    for (area, (title, metric, percent)) in panels
        .iter()
        .zip([("loss", "loss", false), ("accuracy (%)", "acc", true)])
    {
        let scale = if percent { 100.0 } else { 1.0 };
        let lines: Vec<Line> = [("train", BLUE), ("test", RED)]
            .into_iter()
            .map(|(split, color)| {
                let pts = series(history, &format!("{split}_{metric}"))
                    .into_iter()
                    .map(|(x, y)| (x, y * scale))
                    .collect();
                (split, color, pts)
            })
            .collect();
        let ys = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let (lo, hi) = if percent {
            ((lo - pad).max(0.0), (hi + pad).min(100.0))
        } else {
            ((lo - pad).max(0.0), hi + pad)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(1.0..last_epoch.max(2.0), lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels((last_epoch as usize).clamp(2, 11))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        for (split, color, pts) in lines {
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(split)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(if percent {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
