//! Progress for people: bars on a terminal, periodic plain lines otherwise.

use granule_spec::JobSpec;
use granule_store::JobStatus;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often plain-line progress is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Progress of one job's stages.
pub(crate) struct Progress {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    quiet: bool,
    started: Instant,
    last_plain: Option<Instant>,
    sizes: Vec<u64>,
    names: Vec<String>,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise; nothing if `quiet`.
    pub(crate) fn new(spec: &JobSpec, quiet: bool) -> Progress {
        let names: Vec<String> = spec.stages.iter().map(|s| s.name.clone()).collect();
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let style = ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
            let bars = spec
                .stages
                .iter()
                .map(|s| {
                    let bar = multi.add(ProgressBar::new(s.items.count()));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("{:>width$}", s.name));
                    bar
                })
                .collect();
            (multi, bars)
        });
        Progress {
            bars,
            quiet,
            started: Instant::now(),
            last_plain: None,
            sizes: vec![0; names.len()],
            names,
        }
    }

    /// Records the size of a stage's latest fragment.
    pub(crate) fn fragment_size(&mut self, stage: usize, n: u64) {
        self.sizes[stage] = n;
    }

    /// Shows the latest status.
    pub(crate) fn update(&mut self, job: &JobStatus) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some((_, bars)) => {
                for (i, (bar, s)) in bars.iter().zip(&job.stages).enumerate() {
                    bar.set_position(s.done + s.quarantined);
                    let size = if self.sizes[i] > 0 {
                        self.sizes[i]
                    } else {
                        s.fragment_size
                    };
                    bar.set_message(format!("fragment {size}"));
                }
            }
            None => {
                if self.last_plain.is_some_and(|t| t.elapsed() < PLAIN_EVERY) {
                    return;
                }
                self.last_plain = Some(Instant::now());
                let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
                for s in &job.stages {
                    let rate = s.done as f64 / elapsed;
                    let left = s.items - s.done - s.quarantined;
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", left as f64 / rate)
                    } else {
                        "?".into()
                    };
                    eprintln!(
                        "granule: {} {}/{} done ({} quarantined), {:.1} items/s, eta {eta}, fragment {}",
                        s.name, s.done, s.items, s.quarantined, rate, s.fragment_size
                    );
                }
            }
        }
    }

    /// Prints a message above the bars.
    pub(crate) fn note(&self, message: &str) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(format!("granule: {message}"));
            }
            None => eprintln!("granule: {message}"),
        }
    }

    /// Leaves the bars on screen in their final state.
    pub(crate) fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            bars.iter().for_each(|b| b.abandon());
        }
        let _ = &self.names;
    }
}
