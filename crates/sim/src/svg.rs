//! A timeline plot of a run: one row per worker (the first `rows`), one bar per
//! fragment, coloured by stage; lost and yielded fragments are outlined in red.

use crate::engine::TraceRow;
use std::fmt::Write;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f",
];

/// An SVG document of the fragments of the first `rows` workers.
pub fn timeline(rows: &[TraceRow], stages: &[String], makespan_ms: f64, max_rows: usize) -> String {
    let mut workers: Vec<usize> = rows.iter().map(|r| r.worker).collect();
    workers.sort_unstable();
    workers.dedup();
    workers.truncate(max_rows);
    let (width, row_h, left, top) = (1000.0, 6.0, 60.0, 30.0);
    let height = top + row_h * workers.len() as f64 + 40.0;
    let x = |ms: f64| left + (width - left - 10.0) * ms / makespan_ms.max(1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, name) in stages.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="8" width="10" height="10" fill="{}"/><text x="{}" y="17">{}</text>"#,
            left + 110.0 * i as f64,
            PALETTE[i % PALETTE.len()],
            left + 14.0 + 110.0 * i as f64,
            escape(name)
        );
    }
    for r in rows {
        let Ok(row) = workers.binary_search(&r.worker) else {
            continue;
        };
        let stage = stages.iter().position(|s| *s == r.stage).unwrap_or(0);
        let stroke = if r.outcome == "done" {
            "none"
        } else {
            "#d62728"
        };
        let _ = writeln!(
            out,
            r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{}" fill="{}" stroke="{stroke}" stroke-width="0.6"/>"#,
            x(r.start_ms),
            top + row_h * row as f64,
            (x(r.end_ms) - x(r.start_ms)).max(0.3),
            row_h - 1.0,
            PALETTE[stage % PALETTE.len()],
        );
    }
    let axis_y = top + row_h * workers.len() as f64 + 15.0;
    for i in 0..=5 {
        let ms = makespan_ms * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis_y}" text-anchor="middle">{:.0} s</text>"#,
            x(ms),
            ms / 1e3
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="5" y="{}">workers (first {}) over virtual time</text></svg>"#,
        axis_y + 18.0,
        workers.len()
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
