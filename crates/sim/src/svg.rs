//! A timeline plot of a run: one lane per worker (at most `max_rows`, shared out
//! among the classes), grouped and labelled by class, one bar per fragment
//! coloured by stage; yielded and lost fragments are outlined, with a legend.

use crate::engine::TraceRow;
use std::collections::BTreeMap;
use std::fmt::Write;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f",
];

/// Which workers get a lane: every class gets a share of `max_rows` in proportion
/// to its workers, at least one lane (or all of its workers if fewer); lanes are
/// grouped by class, workers in order within a class.
fn lanes(rows: &[TraceRow], max_rows: usize) -> Vec<(String, usize)> {
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for r in rows {
        by_class.entry(r.class.as_str()).or_default().push(r.worker);
    }
    for workers in by_class.values_mut() {
        workers.sort_unstable();
        workers.dedup();
    }
    let total: usize = by_class.values().map(Vec::len).sum();
    let mut out = Vec::new();
    for (class, workers) in &by_class {
        let share = (max_rows * workers.len()).div_ceil(total.max(1)).max(1);
        out.extend(workers.iter().take(share).map(|&w| (class.to_string(), w)));
    }
    out
}

/// An SVG document of the fragments of at most `max_rows` workers.
pub fn timeline(rows: &[TraceRow], stages: &[String], makespan_ms: f64, max_rows: usize) -> String {
    let lanes = lanes(rows, max_rows);
    let lane_of: std::collections::HashMap<usize, usize> = lanes
        .iter()
        .enumerate()
        .map(|(i, (_, w))| (*w, i))
        .collect();
    let workers_in_all = {
        let mut all: Vec<usize> = rows.iter().map(|r| r.worker).collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    };
    let (width, row_h, left, top) = (1000.0, 6.0, 110.0, 48.0);
    let height = top + row_h * lanes.len() as f64 + 44.0;
    let x = |ms: f64| left + (width - left - 10.0) * ms / makespan_ms.max(1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    // Legend: stage colours, then the outlines.
    let mut lx = left;
    for (i, name) in stages.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="8" width="10" height="10" fill="{}"/><text x="{}" y="17">stage {}</text>"#,
            PALETTE[i % PALETTE.len()],
            lx + 14.0,
            escape(name)
        );
        lx += 24.0 + 7.0 * (name.len() as f64 + 6.0);
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="26" width="10" height="10" fill="#ccc" stroke="#d62728" stroke-width="1.2"/><text x="{}" y="35">lost (worker killed)</text><rect x="{}" y="26" width="10" height="10" fill="#ccc" stroke="#ff7f0e" stroke-width="1.2" stroke-dasharray="2,1"/><text x="{}" y="35">yielded (notice, lifespan, split)</text>"##,
        left + 14.0,
        left + 150.0,
        left + 164.0,
    );
    // Class labels, one per group of lanes, with a rule between groups.
    let mut i = 0;
    while i < lanes.len() {
        let class = &lanes[i].0;
        let n = lanes[i..].iter().take_while(|(c, _)| c == class).count();
        let y0 = top + row_h * i as f64;
        let _ = writeln!(
            out,
            r##"<line x1="0" x2="{width}" y1="{y0}" y2="{y0}" stroke="#999" stroke-width="0.5"/><text x="4" y="{:.1}">class {} ({n})</text>"##,
            y0 + (row_h * n as f64).clamp(9.0, 12.0),
            escape(class)
        );
        i += n;
    }
    for r in rows {
        let Some(&row) = lane_of.get(&r.worker) else {
            continue;
        };
        let stage = stages.iter().position(|s| *s == r.stage).unwrap_or(0);
        let stroke = match r.outcome {
            "lost" => r##"stroke="#d62728" stroke-width="0.8""##,
            "yielded" => r##"stroke="#ff7f0e" stroke-width="0.8" stroke-dasharray="2,1""##,
            _ => r#"stroke="none""#,
        };
        let _ = writeln!(
            out,
            r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{}" fill="{}" {stroke}/>"#,
            x(r.start_ms),
            top + row_h * row as f64,
            (x(r.end_ms) - x(r.start_ms)).max(0.3),
            row_h - 1.0,
            PALETTE[stage % PALETTE.len()],
        );
    }
    let axis_y = top + row_h * lanes.len() as f64 + 15.0;
    for i in 0..=5 {
        let ms = makespan_ms * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis_y}" text-anchor="{}">{}</text>"#,
            x(ms),
            if i == 5 { "end" } else { "middle" },
            crate::human_duration(ms)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="5" y="{}">{} of {workers_in_all} workers, by class, over virtual time</text></svg>"#,
        axis_y + 18.0,
        lanes.len()
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
