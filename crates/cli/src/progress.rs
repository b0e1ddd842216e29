//! Progress for people: bars on a terminal, periodic plain lines otherwise.

use granule_spec::JobSpec;
use granule_store::StageProgress;
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
    /// Items finished per stage when this run started (a resumed job starts above 0).
    done_at_start: Option<Vec<u64>>,
    last_plain: Option<Instant>,
    last: Option<Vec<StageProgress>>,
    sizes: Vec<u64>,
    names: Vec<String>,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise; nothing if `quiet`.
    pub(crate) fn new(spec: &JobSpec, quiet: bool) -> Progress {
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> ");
            let width = spec.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
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
            done_at_start: None,
            last_plain: None,
            last: None,
            sizes: vec![0; spec.stages.len()],
            names: spec.stages.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Notes only (a worker serving any job has no stages to show).
    pub(crate) fn notes_only(quiet: bool) -> Progress {
        Progress {
            bars: None,
            quiet,
            started: Instant::now(),
            done_at_start: None,
            last_plain: None,
            last: None,
            sizes: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Records the size of a stage's latest fragment.
    pub(crate) fn fragment_size(&mut self, stage: usize, n: u64) {
        self.sizes[stage] = n;
    }

    /// Rate (items/s this run), ETA and fragment size of a stage.
    fn describe(&self, i: usize, s: &StageProgress) -> String {
        let finished = s.done + s.quarantined;
        let before = self.done_at_start.as_ref().map_or(0, |d| d[i]);
        let rate =
            finished.saturating_sub(before) as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let left = s.items - finished;
        let eta = match (left, rate > 0.0) {
            (0, _) if !s.ended => "waiting for items".to_string(),
            (0, _) => "done".to_string(),
            (_, true) => format!(
                "eta {}",
                humantime::format_duration(Duration::from_secs((left as f64 / rate) as u64))
            ),
            _ => "eta ?".to_string(),
        };
        let size = if self.sizes[i] > 0 {
            self.sizes[i]
        } else {
            s.fragment_size
        };
        let quarantined = if s.quarantined > 0 {
            format!(", {} quarantined", s.quarantined)
        } else {
            String::new()
        };
        format!("{rate:.0} items/s, {eta}, fragment {size}{quarantined}")
    }

    /// Shows the latest progress of the job's stages (in spec order).
    pub(crate) fn update(&mut self, stages: &[StageProgress]) {
        if self.quiet {
            return;
        }
        if self.done_at_start.is_none() {
            self.done_at_start = Some(stages.iter().map(|s| s.done + s.quarantined).collect());
        }
        self.last = Some(stages.to_vec());
        match &self.bars {
            Some((_, bars)) => {
                for (i, (bar, s)) in bars.iter().zip(stages).enumerate() {
                    bar.set_length(s.items);
                    bar.set_position(s.done + s.quarantined);
                    bar.set_message(self.describe(i, s));
                }
            }
            None if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) => {
                self.last_plain = Some(Instant::now());
                self.print_plain(stages);
            }
            None => {}
        }
    }

    fn print_plain(&self, stages: &[StageProgress]) {
        for (i, (s, name)) in stages.iter().zip(&self.names).enumerate() {
            eprintln!(
                "granule: {} {}/{} done: {}",
                name,
                s.done,
                s.items,
                self.describe(i, s)
            );
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

    /// Leaves the bars on screen in their final state, or prints a last plain line.
    pub(crate) fn finish(&mut self) {
        match (&self.bars, &self.last) {
            (Some((_, bars)), _) => bars.iter().for_each(|b| b.abandon()),
            (None, Some(stages)) if !self.quiet => self.print_plain(stages),
            _ => {}
        }
    }
}
