//! `granule sim`: runs a scenario through the simulator and reports.

use crate::BadInput;
use anyhow::{Context, Result};
use granule_sim::{Policy, Report, TraceRow};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `granule sim`.
#[derive(clap::Args)]
pub(crate) struct SimArgs {
    /// The scenario (TOML): worker classes and stages.
    scenario: PathBuf,
    /// Policy to simulate; `both` runs granule and class-blind FIFO on the same pool,
    /// `all` adds the loop-scheduling baselines (static, self-scheduling, guided,
    /// factoring).
    #[arg(long, value_enum, default_value = "granule")]
    policy: PolicyArg,
    /// Seed (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Write every fragment as a JSON line here (granule's run).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write a timeline plot (SVG) here (granule's run): up to 120 workers, shared
    /// among the classes.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the report(s) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    Granule,
    Fifo,
    Static,
    SelfScheduling,
    Guided,
    Factoring,
    Both,
    All,
}

/// Runs `granule sim`.
pub(crate) fn sim(args: SimArgs) -> Result<u8> {
    let path = args.scenario.display().to_string();
    let text = std::fs::read_to_string(&args.scenario)
        .map_err(|e| BadInput(format!("{path}: cannot read the scenario: {e}")))?;
    let mut scenario = granule_sim::parse(&path, &text).map_err(BadInput)?;
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    let policies: &[Policy] = match args.policy {
        PolicyArg::Granule => &[Policy::Granule],
        PolicyArg::Fifo => &[Policy::Fifo],
        PolicyArg::Static => &[Policy::Static],
        PolicyArg::SelfScheduling => &[Policy::SelfScheduling],
        PolicyArg::Guided => &[Policy::Guided],
        PolicyArg::Factoring => &[Policy::Factoring],
        PolicyArg::Both => &[Policy::Granule, Policy::Fifo],
        PolicyArg::All => &Policy::ALL,
    };
    let mut reports = Vec::new();
    for (i, &policy) in policies.iter().enumerate() {
        let started = std::time::Instant::now();
        let want_rows = i == 0 && (args.trace.is_some() || args.svg.is_some());
        let mut rows: Vec<TraceRow> = Vec::new();
        let mut keep = |row: &TraceRow| rows.push(row.clone());
        let report = granule_sim::run(
            &scenario,
            policy,
            want_rows.then_some(&mut keep as &mut dyn FnMut(&TraceRow)),
        );
        let wall = started.elapsed().as_secs_f64();
        if let Some(file) = args.trace.as_ref().filter(|_| want_rows) {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(file)
                    .with_context(|| format!("creating {}", file.display()))?,
            );
            for row in &rows {
                serde_json::to_writer(&mut out, row)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        if let Some(file) = args.svg.as_ref().filter(|_| want_rows) {
            let names: Vec<String> = scenario.stages.iter().map(|s| s.name.clone()).collect();
            let svg = granule_sim::timeline(&rows, &names, report.makespan_ms, 120);
            std::fs::write(file, svg).with_context(|| format!("writing {}", file.display()))?;
        }
        if !args.json {
            print_report(&report, wall);
            if let Some(budget) = scenario.budget {
                let verdict = if report.cost <= budget {
                    "within"
                } else {
                    "OVER"
                };
                println!("  budget {budget:.2}: {verdict} (cost {:.2})", report.cost);
            }
        }
        reports.push((report, wall));
    }
    if args.json {
        let all: Vec<serde_json::Value> = reports
            .iter()
            .map(|(r, wall)| {
                let mut v = serde_json::to_value(r).expect("plain data");
                v["wall_s"] = serde_json::json!(wall);
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if let [(g, _), (f, _)] = reports.as_slice() {
        println!(
            "granule vs fifo: makespan {:.3}x, cost {:.3}x (cost {:.1}% lower)",
            g.makespan_ms / f.makespan_ms.max(1e-9),
            g.cost / f.cost.max(1e-9),
            100.0 * (1.0 - g.cost / f.cost.max(1e-9))
        );
    } else if reports.len() > 2 {
        let g = reports[0].0.makespan_ms.max(1e-9);
        println!("policy           makespan s  vs granule  vs bound  cost      fragments");
        for (r, _) in &reports {
            println!(
                "{:<16} {:>10.1} {:>11.3} {:>9.3} {:>9.2} {:>10}",
                format!("{:?}", r.policy),
                r.makespan_ms / 1000.0,
                r.makespan_ms / g,
                r.makespan_ms / r.lower_bound_ms.max(1e-9),
                r.cost,
                r.fragments
            );
        }
    }
    Ok(if reports.iter().all(|(r, _)| r.finished) {
        0
    } else {
        1
    })
}

fn hours(ms: f64) -> String {
    granule_sim::human_duration(ms)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}%"))
}

fn print_report(r: &Report, wall: f64) {
    println!(
        "scenario {} (seed {}), policy {:?}: {} in {:.2}s wall",
        r.scenario,
        r.seed,
        r.policy,
        if r.finished {
            "finished"
        } else {
            "NOT finished by the horizon"
        },
        wall
    );
    println!(
        "  makespan {}  lower bound {}  ratio {:.3}",
        hours(r.makespan_ms),
        hours(r.lower_bound_ms),
        r.makespan_ms / r.lower_bound_ms.max(1e-9)
    );
    println!(
        "  cost {:.2}  wasted work {:.2}% of useful  fragments {}  prediction error median {} p90 {}",
        r.cost,
        100.0 * r.wasted_ms / r.useful_ms.max(1e-9),
        r.fragments,
        pct(r.error_median),
        pct(r.error_p90)
    );
    for c in &r.classes {
        println!(
            "  class {:<10} utilization {:5.1}%  cost {:10.2}  items {:>12}  preemptions {}",
            c.name,
            100.0 * c.utilization,
            c.cost,
            c.items,
            c.preemptions
        );
    }
    for s in &r.stages {
        println!(
            "  stage {:<10} done at {:>10}  fragments {:>7}  items by class: {}  error median {} p90 {}",
            s.name,
            s.done_ms.map_or("-".into(), hours),
            s.fragments,
            r.classes
                .iter()
                .zip(&s.items_by_class)
                .map(|(c, n)| format!("{} {n}", c.name))
                .collect::<Vec<_>>()
                .join(", "),
            pct(s.error_median),
            pct(s.error_p90)
        );
    } // Fair share, once there are several owners.
    if r.owners.len() > 1 {
        println!(
            "  owners (median fragment {}; share of busy slot-time per {} shown every 10th):",
            hours(r.fragment_median_ms),
            hours(granule_sim::OWNER_BUCKET_MS)
        );
    }
    for o in r.owners.iter().filter(|_| r.owners.len() > 1) {
        let over: Vec<String> = o
            .over_time
            .iter()
            .step_by(10)
            .map(|x| format!("{:.0}%", 100.0 * x))
            .collect();
        println!(
            "  owner {:<8} {} shares, entitled to {:.1}%, had {} while all had work, longest starved {}, over time: {}",
            o.owner.as_deref().unwrap_or("-"),
            o.shares,
            100.0 * o.entitlement,
            o.share_all_active
                .map_or("-".into(), |s| format!("{:.1}%", 100.0 * s)),
            hours(o.longest_starved_ms),
            over.join(" ")
        );
    }
}
