//! Progress for people: bars on a terminal, periodic plain lines otherwise.

use granule_spec::JobSpec;
use granule_store::StageProgress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often plain-line progress is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The window a stage's rate is measured over (its ETA follows recent speed).
const RATE_WINDOW: Duration = Duration::from_secs(30);

/// Items done of a stage at moments since it started in this run: its rate.
#[derive(Default)]
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Records `done` now (only once the stage runs: time spent waiting for the
    /// stages before it does not count).
    fn record(&mut self, done: u64) {
        let now = Instant::now();
        self.samples.push_back((now, done));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// Items per second over the window (or since the stage started, if sooner).
    fn per_second(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.duration_since(t0).as_secs_f64();
        (secs >= 0.5).then(|| d1.saturating_sub(d0) as f64 / secs)
    }
}

/// Progress of one job's stages.
pub(crate) struct Progress {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    quiet: bool,
    started: Instant,
    /// Each stage's recent rate of items done.
    rates: Vec<Rate>,
    last_plain: Option<Instant>,
    last: Option<Vec<StageProgress>>,
    sizes: Vec<u64>,
    names: Vec<String>,
}

impl Progress {
    /// Bars when stderr is a terminal (and `bars`: not while tasks' output is
    /// printed), plain lines otherwise; nothing if `quiet`.
    pub(crate) fn new(spec: &JobSpec, quiet: bool, bars: bool) -> Progress {
        let bars = (bars && !quiet && std::io::stderr().is_terminal()).then(|| {
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
            rates: spec.stages.iter().map(|_| Rate::default()).collect(),
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
            rates: Vec::new(),
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

    /// Rate (items done per second lately), ETA and last fragment size of a stage.
    fn describe(&self, i: usize, s: &StageProgress) -> String {
        let finished = s.done + s.quarantined;
        let left = s.items.saturating_sub(finished);
        let rate = self.rates.get(i).and_then(Rate::per_second);
        let (rate_text, eta) = match (left, rate) {
            (0, _) if !s.ended => ("-".to_string(), "waiting for items".to_string()),
            (0, _) => ("-".to_string(), "done".to_string()),
            _ if !s.started => (
                "-".to_string(),
                "waiting for the stages before it".to_string(),
            ),
            (_, Some(r)) if r > 0.0 => (
                format!("{r:.0} items/s"),
                format!(
                    "eta {}",
                    humantime::format_duration(Duration::from_secs((left as f64 / r) as u64))
                ),
            ),
            (_, Some(_)) => ("0 items/s".to_string(), "eta ?".to_string()),
            (_, None) => ("-".to_string(), "eta ?".to_string()),
        };
        let size = if self.sizes[i] > 0 {
            self.sizes[i]
        } else {
            s.fragment_size
        };
        let size = if size > 0 {
            format!(", last fragment {}", crate::cmd::plural(size, "item"))
        } else {
            String::new()
        };
        let quarantined = if s.quarantined > 0 {
            format!(", {} quarantined", s.quarantined)
        } else {
            String::new()
        };
        format!("{rate_text}, {eta}{size}{quarantined}")
    }

    /// Shows the latest progress of the job's stages (in spec order).
    pub(crate) fn update(&mut self, stages: &[StageProgress]) {
        if self.quiet {
            return;
        }
        for (rate, s) in self.rates.iter_mut().zip(stages) {
            if s.started && !s.ended {
                rate.record(s.done);
            }
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

    /// Stopping (a signal, a lifespan's end): the bars go, so no stale bar stays
    /// above the message and what follows; progress continues in plain lines.
    pub(crate) fn stopping(&mut self, message: &str) {
        if let Some((multi, _)) = self.bars.take() {
            let _ = multi.clear();
        }
        self.note(message);
    }

    /// Leaves the bars on screen in their final state, then prints a summary: per
    /// stage what was done and quarantined, and the time this run took.
    pub(crate) fn finish(&mut self) {
        if self.quiet {
            return;
        }
        let Some(stages) = &self.last else {
            return;
        };
        match &self.bars {
            Some((_, bars)) => bars.iter().for_each(|b| b.abandon()),
            None => self.print_plain(stages),
        }
        let parts: Vec<String> = stages
            .iter()
            .zip(&self.names)
            .map(|(s, name)| {
                let quarantined = if s.quarantined > 0 {
                    format!(" ({} quarantined)", s.quarantined)
                } else {
                    String::new()
                };
                format!("{name} {}/{} done{quarantined}", s.done, s.items)
            })
            .collect();
        eprintln!(
            "granule: {} in {:.1}s",
            parts.join(", "),
            self.started.elapsed().as_secs_f64()
        );
    }
}
