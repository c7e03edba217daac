//! Traffic traces: requests per second over time, from a built-in shape or a CSV file.

use std::fmt;

/// Requests per second for each second of the simulation (piecewise constant).
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub name: String,
    pub rps: Vec<f64>,
}

impl Trace {
    pub fn duration_s(&self) -> usize {
        self.rps.len()
    }

    /// The rate during second `s` (0 past the end).
    pub fn rate_at(&self, s: usize) -> f64 {
        self.rps.get(s).copied().unwrap_or(0.0)
    }

    pub fn mean_rps(&self) -> f64 {
        if self.rps.is_empty() {
            0.0
        } else {
            self.rps.iter().sum::<f64>() / self.rps.len() as f64
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `base` for a quarter of the run, then `peak × base`.
    Step,
    /// `base`, with `peak × base` for `spike` seconds starting at a quarter of the run.
    Spike,
    /// A day's sine between 20 % and 100 % of `peak × base` (trough at midnight), scaled to the run.
    Diurnal,
    /// Linear from 10 % of `peak × base` up to `peak × base`.
    Ramp,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Shape::Step => "step",
            Shape::Spike => "spike",
            Shape::Diurnal => "diurnal",
            Shape::Ramp => "ramp",
        })
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "step" => Ok(Shape::Step),
            "spike" => Ok(Shape::Spike),
            "diurnal" => Ok(Shape::Diurnal),
            "ramp" => Ok(Shape::Ramp),
            other => Err(format!(
                "unknown trace shape {other:?} (step, spike, diurnal, ramp, or a CSV file)"
            )),
        }
    }
}

/// Parameters of a built-in shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeParams {
    pub duration_s: usize,
    /// Base requests per second.
    pub rps: f64,
    /// Peak as a multiple of the base.
    pub peak: f64,
    /// Length of a spike, seconds.
    pub spike_s: usize,
}

pub fn built_in(shape: Shape, p: &ShapeParams) -> Trace {
    let n = p.duration_s;
    let top = p.rps * p.peak;
    let rps = (0..n)
        .map(|s| match shape {
            Shape::Step => {
                if s < n / 4 {
                    p.rps
                } else {
                    top
                }
            }
            Shape::Spike => {
                let start = n / 4;
                if s >= start && s < start + p.spike_s {
                    top
                } else {
                    p.rps
                }
            }
            Shape::Diurnal => {
                let phase = s as f64 / n.max(1) as f64 * std::f64::consts::TAU;
                top * (0.6 - 0.4 * phase.cos())
            }
            Shape::Ramp => top * (0.1 + 0.9 * s as f64 / n.max(1) as f64),
        })
        .collect();
    Trace {
        name: shape.to_string(),
        rps,
    }
}

/// Parses `time_seconds,requests_per_second` rows (a header line is allowed; `#` comments are
/// skipped). Each row's rate holds until the next row's time; the last row ends the trace.
pub fn from_csv(name: &str, text: &str) -> Result<Trace, String> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cols = line.split(',').map(str::trim);
        let (Some(t), Some(r)) = (cols.next(), cols.next()) else {
            return Err(format!(
                "{name}:{}: expected `time_seconds,requests_per_second`",
                i + 1
            ));
        };
        match (t.parse::<f64>(), r.parse::<f64>()) {
            (Ok(t), Ok(r)) if t >= 0.0 && r >= 0.0 && t.is_finite() && r.is_finite() => {
                if points.last().is_some_and(|(pt, _)| t <= *pt) {
                    return Err(format!("{name}:{}: times must increase", i + 1));
                }
                points.push((t, r));
            }
            _ if points.is_empty() && i == 0 => continue, // a header
            _ => {
                return Err(format!(
                    "{name}:{}: not two non-negative numbers: {line:?}",
                    i + 1
                ));
            }
        }
    }
    if points.len() < 2 {
        return Err(format!(
            "{name}: needs at least two rows (a rate and an end time)"
        ));
    }
    let end = points.last().map(|(t, _)| t.ceil() as usize).unwrap_or(0);
    let mut rps = vec![0.0; end];
    for w in points.windows(2) {
        let (from, r) = w[0];
        let to = w[1].0;
        for slot in rps
            .iter_mut()
            .take(to.ceil() as usize)
            .skip(from.floor() as usize)
        {
            *slot = r;
        }
    }
    Ok(Trace {
        name: name.to_string(),
        rps,
    })
}

/// Parses "90s", "30m", "2h", "1d" or plain seconds.
pub fn parse_duration(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        Some('d') => (&s[..s.len() - 1], 86400.0),
        _ => (s, 1.0),
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0 && v.is_finite())
        .map(|v| (v * mult).round() as usize)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 90s, 30m, 2h, 1d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> ShapeParams {
        ShapeParams {
            duration_s: 400,
            rps: 10.0,
            peak: 4.0,
            spike_s: 50,
        }
    }

    #[test]
    fn shapes() {
        let spike = built_in(Shape::Spike, &p());
        assert_eq!(
            (
                spike.rate_at(99),
                spike.rate_at(100),
                spike.rate_at(149),
                spike.rate_at(150)
            ),
            (10.0, 40.0, 40.0, 10.0)
        );
        let step = built_in(Shape::Step, &p());
        assert_eq!(
            (step.rate_at(99), step.rate_at(100), step.rate_at(399)),
            (10.0, 40.0, 40.0)
        );
        let d = built_in(Shape::Diurnal, &p());
        assert!((d.rate_at(0) - 8.0).abs() < 1e-9 && (d.rate_at(200) - 40.0).abs() < 1e-9);
        let r = built_in(Shape::Ramp, &p());
        assert!(r.rate_at(0) < r.rate_at(200) && r.rate_at(200) < r.rate_at(399));
        assert_eq!(r.duration_s(), 400);
    }

    #[test]
    fn csv_traces() {
        let t = from_csv("t.csv", "time_seconds,rps\n0,5\n10,20\n# comment\n12.5,0\n").unwrap();
        assert_eq!(t.duration_s(), 13);
        assert_eq!(
            (t.rate_at(0), t.rate_at(9), t.rate_at(10), t.rate_at(12)),
            (5.0, 5.0, 20.0, 20.0)
        );
        assert!(
            from_csv("t", "0,1\n")
                .unwrap_err()
                .contains("at least two rows")
        );
        assert!(from_csv("t", "0,1\n5,x\n").unwrap_err().contains("t:2"));
        assert!(
            from_csv("t", "0,1\n5,2\n3,1\n")
                .unwrap_err()
                .contains("increase")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1.5m"), Ok(90));
        assert_eq!(parse_duration("1d"), Ok(86400));
        assert_eq!(parse_duration("120"), Ok(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1h").is_err());
    }
}
