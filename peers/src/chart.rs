//! PNG charts of the medians file: throughput bars per case, and ack
//! latency percentiles per durability level. Text uses DejaVu Sans from
//! the system (Debian `fonts-dejavu-core`, which the script installs).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Deserialize;

use super::Error;

#[derive(Deserialize)]
struct Medians {
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    case: String,
    durability: String,
    target: String,
    msgs_per_s: f64,
    latency_us: Option<[u64; 5]>,
}

const TARGETS: [(&str, RGBColor); 3] = [
    ("bida", RGBColor(0xd6, 0x3b, 0x2f)),
    ("nats", RGBColor(0x2f, 0x6f, 0xd6)),
    ("redis", RGBColor(0x4a, 0x9a, 0x4a)),
];

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<(), Error> {
    let bytes = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("DejaVuSans.ttf not found (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    for style in [FontStyle::Normal, FontStyle::Bold] {
        plotters::style::register_font("sans-serif", style, bytes)
            .map_err(|_| "DejaVuSans.ttf is not a usable font")?;
    }
    Ok(())
}

pub fn draw(medians: &Path, out: &Path) -> Result<(), Error> {
    register_font()?;
    let m: Medians = serde_json::from_slice(&std::fs::read(medians)?)?;
    std::fs::create_dir_all(out)?;
    throughput(&m, &out.join("peers-throughput.png"))?;
    latency(&m, &out.join("peers-latency.png"))?;
    Ok(())
}

/// Grouped bars: one group per (case, durability), one bar per target,
/// log scale (the durability levels differ by orders of magnitude).
fn throughput(m: &Medians, path: &Path) -> Result<(), Error> {
    let mut groups: Vec<(String, String)> = Vec::new();
    for r in &m.rows {
        let g = (r.case.clone(), r.durability.clone());
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let max = m.rows.iter().map(|r| r.msgs_per_s).fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "messages per second (median; log scale)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups.len() as f64, (1e2..max * 12.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < groups.len() {
                format!("{} / {}", groups[i].0, groups[i].1)
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| {
            if *v >= 1e6 {
                format!("{:.0} M", v / 1e6)
            } else if *v >= 1e3 {
                format!("{:.0} K", v / 1e3)
            } else {
                format!("{v:.0}")
            }
        })
        .label_style(("sans-serif", 13))
        .draw()?;
    for (t, (name, color)) in TARGETS.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (case, dur))| {
                let r = m
                    .rows
                    .iter()
                    .find(|r| &r.case == case && &r.durability == dur && r.target == *name)?;
                let x0 = g as f64 + 0.1 + t as f64 * 0.27;
                Some(Rectangle::new(
                    [(x0, 1e2), (x0 + 0.25, r.msgs_per_s.max(1e2))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Ack latency at p50, p90, p99, p99.9 and max for each target, one panel
/// per durability level, for the first produce case that has latencies.
fn latency(m: &Medians, path: &Path) -> Result<(), Error> {
    let Some(case) = m
        .rows
        .iter()
        .find(|r| r.latency_us.is_some())
        .map(|r| r.case.clone())
    else {
        return Ok(());
    };
    let mut levels: Vec<String> = Vec::new();
    for r in m.rows.iter().filter(|r| r.case == case) {
        if !levels.contains(&r.durability) {
            levels.push(r.durability.clone());
        }
    }
    let root = BitMapBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, levels.len().max(1)));
    let names = ["p50", "p90", "p99", "p99.9", "max"];
    for (panel, level) in panels.iter().zip(&levels) {
        let rows: Vec<&Row> = m
            .rows
            .iter()
            .filter(|r| r.case == case && &r.durability == level && r.latency_us.is_some())
            .collect();
        let max = rows
            .iter()
            .flat_map(|r| r.latency_us.expect("filtered"))
            .max()
            .unwrap_or(10)
            .max(10) as f64;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{case}, {level}: ack latency (log scale)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..4f64, (10f64..max * 2.0).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(5)
            .y_label_formatter(&|v| {
                if *v >= 1e6 {
                    format!("{:.0} s", v / 1e6)
                } else if *v >= 1e3 {
                    format!("{:.0} ms", v / 1e3)
                } else {
                    format!("{v:.0} µs")
                }
            })
            .x_label_formatter(&|x| names.get(x.round() as usize).unwrap_or(&"").to_string())
            .label_style(("sans-serif", 13))
            .draw()?;
        for (name, color) in TARGETS {
            let Some(r) = rows.iter().find(|r| r.target == name) else {
                continue;
            };
            let points: Vec<(f64, f64)> = r
                .latency_us
                .expect("filtered")
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, (*v).max(10) as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(3))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
