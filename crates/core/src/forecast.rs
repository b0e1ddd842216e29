//! Forecasts of the pool from its recorded history: each class's alive slots a
//! little ahead and its rate of lost workers (preemptions, kills), by Holt's
//! exponential smoothing over a per-step series.

use crate::plan::Holt;

/// One worker's life as the store recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSpan {
    /// Its executor class.
    pub class: String,
    /// Whether it is spot capacity.
    pub spot: bool,
    /// Its slots.
    pub slots: u32,
    /// When it registered, ms.
    pub start_ms: i64,
    /// When it was last heard of if it has ended; `None` while it runs.
    pub end_ms: Option<i64>,
    /// Whether it ended by being lost (died or went silent holding work).
    pub lost: bool,
}

/// What the history says of one class.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClassForecast {
    /// The class.
    pub class: String,
    /// Whether its workers are spot capacity.
    pub spot: bool,
    /// Slots alive now.
    pub slots_now: f64,
    /// Slots expected `ahead_ms` from now (smoothed trend of the last window).
    pub slots_ahead: f64,
    /// Workers lost per worker-hour over the window.
    pub losses_per_hour: f64,
}

/// The history the pool's forecasts look at, ms.
pub const FORECAST_WINDOW_MS: i64 = 3_600_000;
/// Their sampling step, ms.
pub const FORECAST_STEP_MS: i64 = 60_000;
/// How far ahead they look, ms.
pub const FORECAST_AHEAD_MS: i64 = 600_000;

/// The forecast every part of granule uses: the last `FORECAST_WINDOW_MS`,
/// sampled every minute, `FORECAST_AHEAD_MS` ahead. `spans` should cover the window
/// (`Store::worker_history(now, now - FORECAST_WINDOW_MS)`).
pub fn forecast_recent(spans: &[WorkerSpan], now_ms: i64) -> Vec<ClassForecast> {
    forecast_pool(
        spans,
        now_ms,
        FORECAST_WINDOW_MS,
        FORECAST_STEP_MS,
        FORECAST_AHEAD_MS,
    )
}

/// Forecasts every class seen in `spans` from the window `[now - window, now]`,
/// sampled every `step_ms`, `ahead_ms` into the future.
pub fn forecast_pool(
    spans: &[WorkerSpan],
    now_ms: i64,
    window_ms: i64,
    step_ms: i64,
    ahead_ms: i64,
) -> Vec<ClassForecast> {
    let mut classes: Vec<(&str, bool)> = spans.iter().map(|s| (s.class.as_str(), s.spot)).collect();
    classes.sort_unstable();
    classes.dedup_by(|a, b| a.0 == b.0);
    let from = now_ms - window_ms;
    classes
        .into_iter()
        .map(|(class, spot)| {
            let mine: Vec<&WorkerSpan> = spans.iter().filter(|s| s.class == class).collect();
            let alive = |t: i64| -> f64 {
                mine.iter()
                    .filter(|s| s.start_ms <= t && s.end_ms.is_none_or(|e| e > t))
                    .map(|s| f64::from(s.slots))
                    .fold(0.0, |a, b| a + b)
            };
            let mut holt = Holt::default();
            let mut t = from;
            while t <= now_ms {
                holt.observe(alive(t));
                t += step_ms.max(1);
            }
            let worker_ms: f64 = mine
                .iter()
                .map(|s| {
                    (s.end_ms.unwrap_or(now_ms).min(now_ms) - s.start_ms.max(from)).max(0) as f64
                })
                .sum();
            let lost = mine
                .iter()
                .filter(|s| s.lost && s.end_ms.is_some_and(|e| e >= from))
                .count() as f64;
            ClassForecast {
                class: class.to_string(),
                spot,
                slots_now: alive(now_ms),
                slots_ahead: holt
                    .forecast(ahead_ms as f64 / step_ms.max(1) as f64)
                    .unwrap_or(0.0),
                losses_per_hour: if worker_ms > 0.0 {
                    lost / (worker_ms / 3_600_000.0)
                } else {
                    0.0
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(class: &str, start: i64, end: Option<i64>, lost: bool) -> WorkerSpan {
        WorkerSpan {
            class: class.into(),
            spot: class == "spot",
            slots: 1,
            start_ms: start,
            end_ms: end,
            lost,
        }
    }

    #[test]
    fn a_shrinking_class_is_forecast_lower_and_its_losses_counted() {
        let minute = 60_000;
        // Ten spot workers from the start; one lost every 6 minutes; none replaced.
        let mut spans: Vec<WorkerSpan> = (0..10)
            .map(|i| {
                let end = (i < 9).then_some((i + 1) * 6 * minute);
                span("spot", 0, end, true)
            })
            .collect();
        spans.push(span("ondemand", 0, None, false));
        let now = 60 * minute;
        let f = forecast_pool(&spans, now, 60 * minute, minute, 10 * minute);
        let spot = f.iter().find(|c| c.class == "spot").unwrap();
        assert_eq!(spot.slots_now, 1.0);
        assert!(spot.slots_ahead < spot.slots_now + 0.5, "{spot:?}");
        // 9 lost over sum of lives (6+12+..+54 min + 60 min) = 330 worker-minutes.
        assert!((spot.losses_per_hour - 9.0 / 5.5).abs() < 0.01, "{spot:?}");
        let steady = f.iter().find(|c| c.class == "ondemand").unwrap();
        assert_eq!((steady.slots_now, steady.losses_per_hour), (1.0, 0.0));
        assert!((steady.slots_ahead - 1.0).abs() < 1e-9);
    }
}
