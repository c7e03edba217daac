//! Demand one horizon ahead, from its recent history (pure). GPUs take minutes to load a
//! model, so a purely reactive autoscaler is one cold start late; scaling for the forecast
//! starts replicas that long before the demand arrives.
//!
//! Two models, and the larger of what they say (a missed rise costs burst or latency, a
//! spare replica only its GPU time until the forecast falls):
//!
//! - **trend**: the level of the last minute, extended one horizon along a least-squares
//!   slope, but only a slope that holds: fitted over the last [`TREND_WINDOW_MS`] and over each
//!   half of it, the three must agree in sign and the gentlest is taken. A ramp keeps its
//!   slope; a step (flat on one side of it) has none, and is not read as a rise that goes on;
//! - **daily season**, once more than a day of samples is kept: the demand a day before the
//!   forecast time, scaled by how today's recent level compares with the same time yesterday.

use std::collections::VecDeque;

use crate::clock::Millis;

/// The span the trend is fitted over.
pub const TREND_WINDOW_MS: Millis = 10 * 60_000;
/// A day: the season's period.
pub const DAY_MS: Millis = 24 * 3_600_000;
/// Half the span averaged around a time of day (the season reads a band, not one sample).
const BAND_MS: Millis = 5 * 60_000;
/// How much history is kept: a day, plus a horizon's and a band's worth.
pub const KEEP_MS: Millis = DAY_MS + 2 * 3_600_000;

/// Demand samples: (time, demand in engine slots).
pub type Samples = VecDeque<(Millis, f64)>;

/// The demand forecast for `now + horizon` (engine slots), or `None` without enough history
/// (less than a minute of it).
pub fn forecast(samples: &Samples, now: Millis, horizon: Millis) -> Option<f64> {
    let trend = trend(samples, now, horizon);
    let season = season(samples, now, horizon);
    match (trend, season) {
        (Some(t), Some(s)) => Some(t.max(s)),
        (t, s) => t.or(s),
    }
    .map(|d| d.max(0.0))
}

/// The least-squares slope through `pts` (x in seconds), per second.
fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx > 0.0 { sxy / sxx } else { 0.0 }
}

fn trend(samples: &Samples, now: Millis, horizon: Millis) -> Option<f64> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _)| *t > now - TREND_WINDOW_MS && *t <= now)
        .map(|(t, d)| ((*t - now) as f64 / 1000.0, *d))
        .collect();
    let span = pts.last()?.0 - pts.first()?.0;
    if pts.len() < 3 || span < 60.0 {
        return None;
    }
    let mid = pts.first()?.0 + span / 2.0;
    let split = pts.partition_point(|p| p.0 < mid);
    let slopes = [slope(&pts), slope(&pts[..split]), slope(&pts[split..])];
    let held = if slopes.iter().all(|s| *s > 0.0) || slopes.iter().all(|s| *s < 0.0) {
        slopes
            .iter()
            .copied()
            .min_by(|a, b| a.abs().total_cmp(&b.abs()))
            .unwrap_or(0.0)
    } else {
        0.0
    };
    let recent: Vec<&(f64, f64)> = pts.iter().filter(|p| p.0 > -60.0).collect();
    if recent.is_empty() {
        // No level to carry: nothing measured in the last minute.
        return None;
    }
    let n = recent.len() as f64;
    let (mx, my) = (
        recent.iter().map(|p| p.0).sum::<f64>() / n,
        recent.iter().map(|p| p.1).sum::<f64>() / n,
    );
    // The last minute's mean stands at its mean time (x <= 0); carried to now, then on.
    Some(my + held * (horizon as f64 / 1000.0 - mx))
}

/// The mean demand within a band around `at`.
fn around(samples: &Samples, at: Millis) -> Option<f64> {
    let band: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| (*t - at).abs() <= BAND_MS)
        .map(|(_, d)| *d)
        .collect();
    (!band.is_empty()).then(|| band.iter().sum::<f64>() / band.len() as f64)
}

fn season(samples: &Samples, now: Millis, horizon: Millis) -> Option<f64> {
    // A full day behind now is needed (and the bands before it).
    if samples.front()?.0 > now - DAY_MS - 2 * BAND_MS {
        return None;
    }
    // Today's level (the band just behind now) against the same band yesterday.
    let today = around(samples, now - BAND_MS)?;
    let yesterday_now = around(samples, now - BAND_MS - DAY_MS)?;
    let yesterday_then = around(samples, now + horizon - DAY_MS)?;
    if yesterday_now <= 0.0 {
        return Some(yesterday_then.max(today));
    }
    Some(yesterday_then * today / yesterday_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Millis = 60_000;

    fn series(from: Millis, to: Millis, every: Millis, f: impl Fn(Millis) -> f64) -> Samples {
        (0..)
            .map(|i| from + i * every)
            .take_while(|t| *t <= to)
            .map(|t| (t, f(t)))
            .collect()
    }

    #[test]
    fn a_ramp_is_extended_one_horizon() {
        // 2 slots more a minute, sampled every 15 s: in 4 minutes, 8 more than now.
        let s = series(0, 20 * MIN, 15_000, |t| 10.0 + 2.0 * t as f64 / MIN as f64);
        let now = 20 * MIN;
        let f = forecast(&s, now, 4 * MIN).unwrap();
        assert!((f - (50.0 + 8.0)).abs() < 1e-6, "{f}");
        // Flat: the level. Falling: never below 0.
        let flat = series(0, 20 * MIN, 15_000, |_| 40.0);
        assert!((forecast(&flat, now, 4 * MIN).unwrap() - 40.0).abs() < 1e-9);
        let falling = series(0, 20 * MIN, 15_000, |t| 30.0 - 3.0 * t as f64 / MIN as f64);
        assert_eq!(forecast(&falling, now, 10 * MIN), Some(0.0));
    }

    /// A step is not a trend: after demand jumps and stays, the forecast is the new level,
    /// not the line through the jump (which read 4x the step four minutes on).
    #[test]
    fn a_step_is_not_extended() {
        let step = |t: Millis| if t < 17 * MIN { 50.0 } else { 200.0 };
        let s = series(0, 20 * MIN, 2_000, step);
        let f = forecast(&s, 20 * MIN, 4 * MIN).unwrap();
        assert!((f - 200.0).abs() < 1e-6, "{f}");
        // Just after it, too: the first half of the window is flat.
        let s = series(0, 18 * MIN, 2_000, step);
        let f = forecast(&s, 18 * MIN, 4 * MIN).unwrap();
        assert!((f - 200.0).abs() < 1e-6, "{f}");
    }

    #[test]
    fn too_little_history_forecasts_nothing() {
        assert_eq!(forecast(&Samples::new(), 0, MIN), None);
        let s = series(0, 30_000, 15_000, |_| 5.0);
        assert_eq!(forecast(&s, 30_000, MIN), None, "under a minute");
    }

    /// A day's cycle: the morning rise is seen coming a horizon ahead from yesterday's, scaled
    /// to today's level, where the trend alone sees only a flat night.
    #[test]
    fn a_daily_season_sees_the_morning_coming() {
        let day = |t: Millis, scale: f64| {
            let hour = (t % DAY_MS) as f64 / 3_600_000.0;
            scale
                * if (8.0..20.0).contains(&hour) {
                    100.0
                } else {
                    20.0
                }
        };
        // Yesterday at full scale, today at 1.5x.
        let s = series(0, DAY_MS + 8 * 3_600_000 - 5 * MIN, MIN, |t| {
            day(t, if t < DAY_MS { 1.0 } else { 1.5 })
        });
        let now = DAY_MS + 8 * 3_600_000 - 5 * MIN;
        let f = forecast(&s, now, 10 * MIN).unwrap();
        assert!((f - 150.0).abs() < 1e-6, "{f}");
        // The trend alone (no day of history) sees the night.
        let night: Samples = s.iter().filter(|(t, _)| *t >= DAY_MS).copied().collect();
        assert!((forecast(&night, now, 10 * MIN).unwrap() - 30.0).abs() < 1e-6);
    }
}
