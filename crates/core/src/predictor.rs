//! How good the predictions were: absolute percentage errors of predicted against
//! observed fragment durations, past a stage's warm-up, and their median and p90.
//! `status` and the simulator report the same figures.

/// Skipped when judging the predictor: the first fragments of a stage are its slow start.
pub const WARM_UP_FRAGMENTS: usize = 20;

/// Absolute percentage errors of `(predicted, observed)` durations in finish order,
/// past the warm-up, for fragments that had a prediction.
pub fn absolute_errors(pairs: &[(f64, f64)]) -> Vec<f64> {
    pairs
        .iter()
        .skip(WARM_UP_FRAGMENTS)
        .filter(|(predicted, observed)| *predicted > 0.0 && *observed > 0.0)
        .map(|(predicted, observed)| 100.0 * (predicted - observed).abs() / observed)
        .collect()
}

/// Median and 90th percentile of `values`; `None` when there are none.
pub fn median_p90(values: &[f64]) -> (Option<f64>, Option<f64>) {
    if values.is_empty() {
        return (None, None);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (Some(at(0.5)), Some(at(0.9)))
}

/// Median and 90th percentile of the absolute percentage error of predicted against
/// observed durations, past the warm-up; `None` without such fragments.
pub fn prediction_error(pairs: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    median_p90(&absolute_errors(pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_error_skips_the_warm_up_and_reads_quantiles() {
        let mut pairs = vec![(1.0, 100.0); WARM_UP_FRAGMENTS];
        pairs.extend((1..=10).map(|i| (100.0 + i as f64, 100.0)));
        let (median, p90) = prediction_error(&pairs);
        assert_eq!(median, Some(6.0));
        assert_eq!(p90, Some(9.0));
        assert_eq!(prediction_error(&pairs[..WARM_UP_FRAGMENTS]), (None, None));
    }
}
