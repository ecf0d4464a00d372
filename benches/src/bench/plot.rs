//! PNG plots of a report (plotters' bitmap backend): TTFT CDF, latency over time, throughput
//! over time, requests per engine. Text is drawn with DejaVu Sans Mono, compiled in from
//! `benches/assets/` (its license is beside it), so no system font is needed.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::Summary;

/// The plot files [`write_all`] makes.
pub const PLOTS: [&str; 4] =
    ["ttft_cdf.png", "latency_over_time.png", "throughput_over_time.png", "requests_per_engine.png"];

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const SIZE: (u32, u32) = (900, 520);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn font_ready() -> Result<(), String> {
    static READY: OnceLock<bool> = OnceLock::new();
    READY
        .get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok())
        .then_some(())
        .ok_or_else(|| "the bundled plot font could not be loaded".to_owned())
}

/// One named line.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Draws `lines` on one chart into `path`.
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    y_max: Option<f64>,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let pts = || lines.iter().flat_map(|l| l.points.iter());
    let x_max = pts().map(|p| p.0).fold(0.0f64, f64::max);
    let y_top = y_max.unwrap_or_else(|| pts().map(|p| p.1).fold(0.0f64, f64::max) * 1.1);
    let x: Range<f64> = 0.0..if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    let y: Range<f64> = 0.0..if y_top > 0.0 { y_top } else { 1.0 };
    render(path, |root| {
        let caption =
            if lines.iter().all(|l| l.points.is_empty()) { format!("{title} (no data)") } else { title.to_owned() };
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(l.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))
    })
}

/// Draws into a white [`SIZE`] bitmap with `draw`, then writes it to `path` as a PNG.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
        root.fill(&WHITE).map_err(|e| err(&e))?;
        draw(&root)?;
        root.present().map_err(|e| err(&e))?;
    }
    save_png(path, &buf)
}

/// Writes an RGB buffer of [`SIZE`] as a PNG with the best compression (plots are mostly flat
/// colour, so they come out at tens of KB).
fn save_png(path: &Path, rgb: &[u8]) -> Result<(), String> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let file = std::fs::File::create(path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    PngEncoder::new_with_quality(std::io::BufWriter::new(file), CompressionType::Best, FilterType::Adaptive)
        .write_image(rgb, SIZE.0, SIZE.1, image::ColorType::Rgb8)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// At most ~`n` evenly spaced points of a sorted sample as an empirical CDF.
fn cdf(sorted: &[f64], n: usize) -> Vec<(f64, f64)> {
    let len = sorted.len();
    if len == 0 {
        return Vec::new();
    }
    let step = len.div_ceil(n).max(1);
    let mut v: Vec<(f64, f64)> = (0..len).step_by(step).map(|i| (sorted[i], (i + 1) as f64 / len as f64)).collect();
    v.push((sorted[len - 1], 1.0));
    v
}

/// Writes every plot in [`PLOTS`] for `targets` into `dir`.
pub fn write_all(targets: &[Summary], dir: &Path) -> Result<(), String> {
    font_ready()?;
    let named = |s: &Summary, what: &str| {
        if targets.len() > 1 {
            format!("{} {what}", s.target)
        } else {
            what.to_owned()
        }
    };
    let cdfs: Vec<Line> =
        targets.iter().map(|s| Line { name: named(s, "TTFT"), points: cdf(&s.ttft_sorted_ms, 800) }).collect();
    line_chart(&dir.join(PLOTS[0]), "TTFT CDF", "time to first token (ms)", "fraction of requests", &cdfs, Some(1.0))?;
    let mut lat = Vec::new();
    for s in targets {
        let series = |f: fn(&super::stats::Bucket) -> f64| {
            s.timeline.iter().filter(|b| b.completed > 0).map(|b| (b.t_s, f(b))).collect::<Vec<_>>()
        };
        if s.ttft_ms.count > 0 {
            lat.push(Line { name: named(s, "TTFT p50"), points: series(|b| b.ttft_p50_ms) });
        }
        lat.push(Line { name: named(s, "e2e p50"), points: series(|b| b.e2e_p50_ms) });
    }
    line_chart(&dir.join(PLOTS[1]), "Latency over time", "time (s)", "ms", &lat, None)?;
    let tput: Vec<Line> = targets
        .iter()
        .map(|s| Line {
            name: named(s, "completed req/s"),
            points: s.timeline.iter().map(|b| (b.t_s, b.rps)).collect(),
        })
        .collect();
    line_chart(&dir.join(PLOTS[2]), "Throughput over time", "time (s)", "requests per second", &tput, None)?;
    engine_bars(&dir.join(PLOTS[3]), targets)
}

/// Requests per engine: `/metrics` deltas when scraped, else `x-gantry-engine` counts.
fn engine_bars(path: &Path, targets: &[Summary]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let per_target: Vec<Vec<(String, f64)>> = targets
        .iter()
        .map(|s| {
            if s.engine_metrics.is_empty() {
                s.requests_per_engine.iter().map(|(k, v)| (k.clone(), *v as f64)).collect()
            } else {
                s.engine_metrics.iter().map(|e| (e.url.clone(), e.requests)).collect()
            }
        })
        .collect();
    let mut names: Vec<String> = per_target.iter().flatten().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    let y_max = per_target.iter().flatten().map(|(_, v)| *v).fold(0.0f64, f64::max).max(1.0) * 1.15;
    render(path, |root| {
        let title = if names.is_empty() { "Requests per engine (no engine data)" } else { "Requests per engine" };
        let slots = names.len().max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..slots, 0.0..y_max)
            .map_err(|e| err(&e))?;
        // `host:port` of each engine; just `:port` when they all share a host, so labels fit.
        let authority = |n: &String| n.rsplit('/').next().unwrap_or(n).to_owned();
        let host = |a: &str| a.rsplit_once(':').map_or(a.to_owned(), |(h, _)| h.to_owned());
        let one_host = names.windows(2).all(|w| host(&authority(&w[0])) == host(&authority(&w[1])));
        let label_names: Vec<String> = names
            .iter()
            .map(|n| {
                let a = authority(n);
                match a.rsplit_once(':') {
                    Some((_, port)) if one_host && names.len() > 1 => format!(":{port}"),
                    _ => a,
                }
            })
            .collect();
        let short = move |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() > 0.01 {
                return String::new();
            }
            label_names.get(i).cloned().unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len() * 2 + 1)
            .x_label_formatter(&short)
            .y_desc("requests")
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        let width = 0.8 / targets.len().max(1) as f64;
        for (t, rows) in per_target.iter().enumerate() {
            let color = COLORS[t % COLORS.len()];
            let bars = rows.iter().filter_map(|(n, v)| {
                let i = names.iter().position(|m| m == n)? as f64;
                let x0 = i + 0.1 + width * t as f64;
                Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.95, *v)], color.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(|e| err(&e))?
                .label(targets[t].target.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        if targets.len() > 1 {
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
        Ok(())
    })
}
