//! Presenting a simulation: a summary table (policies side by side), JSON, a timeline CSV and
//! an SVG plot.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::world::SimResult;

/// One simulated policy, named.
pub struct Run {
    pub policy: String,
    pub result: SimResult,
}

fn money(x: f64) -> String {
    format!("${x:.2}")
}

/// The summary table; one column per policy.
pub fn table(runs: &[Run], slo_ms: u64) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, f: &dyn Fn(&SimResult) -> String| {
        rows.push((
            label.to_string(),
            runs.iter().map(|r| f(&r.result)).collect(),
        ));
    };
    row("requests", &|r| r.outcomes.total.to_string());
    row("  served locally", &|r| {
        pct(r.outcomes.local, r.outcomes.total)
    });
    let providers: Vec<String> = runs
        .iter()
        .flat_map(|r| r.result.outcomes.by_provider.iter().map(|(n, _)| n.clone()))
        .fold(Vec::new(), |mut acc, n| {
            if !acc.contains(&n) {
                acc.push(n);
            }
            acc
        });
    for name in &providers {
        row(&format!("  burst to {name}"), &|r| {
            let n = r
                .outcomes
                .by_provider
                .iter()
                .find(|(p, _)| p == name)
                .map_or(0, |(_, n)| *n);
            pct(n, r.outcomes.total)
        });
    }
    row("  rejected (503)", &|r| {
        pct(r.outcomes.rejected, r.outcomes.total)
    });
    // Per class, when there is more than one.
    let classes: Vec<String> = runs
        .first()
        .map(|r| r.result.classes.iter().map(|c| c.class.clone()).collect())
        .unwrap_or_default();
    if classes.len() > 1 {
        for (i, name) in classes.iter().enumerate() {
            row(&format!("class {name}"), &|r| {
                r.classes.get(i).map_or("n/a".into(), |c| {
                    let share = |n: u64| n as f64 * 100.0 / c.total.max(1) as f64;
                    format!(
                        "{} req: {:.1}% local, {:.1}% burst, {:.1}% rejected; TTFT p50/p95 {}/{} ms",
                        c.total,
                        share(c.local),
                        share(c.burst),
                        share(c.rejected),
                        c.ttft_p50_ms,
                        c.ttft_p95_ms
                    )
                })
            });
        }
    }
    row("TTFT p50 / p95 / p99", &|r| {
        format!(
            "{} / {} / {} ms",
            r.ttft_p50_ms, r.ttft_p95_ms, r.ttft_p99_ms
        )
    });
    row(&format!("within SLO ({slo_ms} ms)"), &|r| {
        format!("{:.2}%", r.slo_attainment * 100.0)
    });
    if runs.iter().any(|r| r.result.routers > 1) {
        row("spilled with a local slot free", &|r| {
            pct(r.spilled_with_local_free, r.outcomes.total)
        });
        row("engine peak concurrency", &|r| {
            r.engine_peak_concurrency.to_string()
        });
    }
    if runs.iter().any(|r| r.result.rollout.is_some()) {
        row("rollout", &|r| {
            r.rollout.as_ref().map_or("none".into(), |o| {
                let when = o
                    .ended_s
                    .map_or(String::new(), |t| format!(" at {:.0} min", t / 60.0));
                format!("{}{when}", o.phase)
            })
        });
        row("  last", &|r| {
            r.rollout
                .as_ref()
                .map_or(String::new(), |o| o.message.clone())
        });
        row("  stable: requests, errors, TTFT p95", &|r| {
            r.rollout.as_ref().map_or("n/a".into(), |o| {
                format!(
                    "{}, {}, {} ms",
                    o.stable.requests, o.stable.errors, o.stable.ttft_p95_ms
                )
            })
        });
        row("  candidate: requests, errors, TTFT p95", &|r| {
            r.rollout.as_ref().map_or("n/a".into(), |o| {
                format!(
                    "{}, {}, {} ms",
                    o.candidate.requests, o.candidate.errors, o.candidate.ttft_p95_ms
                )
            })
        });
        row("  burst for the candidate", &|r| {
            r.rollout.as_ref().map_or("n/a".into(), |o| {
                format!(
                    "{} requests, {}",
                    o.candidate_burst_requests,
                    money(o.candidate_burst_spend)
                )
            })
        });
    }
    row("replicas peak / mean", &|r| {
        format!("{} / {:.1}", r.peak_replicas, r.mean_replicas)
    });
    row("scale events", &|r| r.scale_events.to_string());
    if runs.iter().any(|r| r.result.cost_break_even.is_some()) {
        row("  a replica pays at (cost)", &|r| {
            r.cost_break_even
                .map_or("n/a".into(), |b| format!("{:.0}% busy", b * 100.0))
        });
    }
    row("capacity exhausted", &|r| {
        format!("{} ticks", r.exhausted_ticks)
    });
    row("GPU-hours", &|r| format!("{:.1}", r.gpu_hours));
    row("GPU cost", &|r| money(r.gpu_cost));
    row("burst spend", &|r| money(r.burst_spend));
    row("total cost", &|r| money(r.total_cost));
    row("  vs all-managed", &|r| {
        r.all_managed_cost.map_or("n/a".into(), money)
    });
    row("  vs all-GPU-at-max", &|r| money(r.all_gpu_at_max_cost));
    row("oracle GPU-hours", &|r| {
        format!("{:.1} (x{:.2})", r.oracle_gpu_hours, r.gpu_hours_vs_oracle)
    });
    row("oracle total cost", &|r| {
        format!(
            "{} (x{:.2})",
            money(r.oracle_total_cost),
            r.total_cost_vs_oracle
        )
    });

    let label_w = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let col_w: Vec<usize> = (0..runs.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v[i].chars().count())
                .chain(std::iter::once(runs[i].policy.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:label_w$}", "");
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(out, "  {:>w$}", r.policy, w = col_w[i]);
    }
    out.push('\n');
    for (label, vals) in &rows {
        let _ = write!(out, "{label:label_w$}");
        for (i, v) in vals.iter().enumerate() {
            let _ = write!(out, "  {v:>w$}", w = col_w[i]);
        }
        out.push('\n');
    }
    out
}

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        return "0".into();
    }
    format!("{n} ({:.1}%)", n as f64 * 100.0 / total as f64)
}

/// The summary as JSON (every figure of the table, per policy).
pub fn json(runs: &[Run]) -> serde_json::Value {
    serde_json::Value::Array(
        runs.iter()
            .map(|r| serde_json::json!({"policy": r.policy, "summary": r.result}))
            .collect(),
    )
}

/// The timeline of one run as CSV.
pub fn timeline_csv(result: &SimResult) -> String {
    let mut out = String::from(
        "t_s,offered_rps,desired,ready,starting,unschedulable,queue,local_in_flight,burst_rps,rejected_total\n",
    );
    for p in &result.timeline {
        let _ = writeln!(
            out,
            "{},{:.2},{},{},{},{},{},{},{:.2},{}",
            p.t_s,
            p.offered_rps,
            p.desired,
            p.ready,
            p.starting,
            p.unschedulable,
            p.queue,
            p.local_in_flight,
            p.burst_rps,
            p.rejected
        );
    }
    out
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
/// A named, coloured line: (label, colour, points).
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One panel: named line series over minutes.
fn panel(
    area: &Area<'_>,
    caption: &str,
    t_max: f64,
    y_max: f64,
    series: Vec<Series<'_>>,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, color, points) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| e.to_string())
}

/// Replicas (desired, ready) on top; offered load, queue depth and burst rate below; one SVG.
pub fn plot_svg(result: &SimResult, title: &str) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(320);
        let tl = &result.timeline;
        let t_max = tl.last().map_or(1.0, |p| p.t_s).max(1.0) / 60.0;
        let series = |f: fn(&super::world::TimelinePoint) -> f64| {
            tl.iter().map(|p| (p.t_s / 60.0, f(p))).collect::<Vec<_>>()
        };
        let r_max = tl
            .iter()
            .map(|p| p.desired.max(p.ready as i32))
            .max()
            .unwrap_or(1)
            .max(1) as f64
            + 1.0;
        panel(
            &top,
            &format!("{title}: replicas"),
            t_max,
            r_max,
            vec![
                ("desired", BLUE, series(|p| p.desired as f64)),
                ("ready", GREEN, series(|p| p.ready as f64)),
            ],
        )?;
        let y_max = tl
            .iter()
            .map(|p| (p.queue as f64).max(p.burst_rps).max(p.offered_rps))
            .fold(1.0, f64::max)
            * 1.1;
        panel(
            &bottom,
            "offered load, queue depth and burst rate",
            t_max,
            y_max,
            vec![
                ("offered req/s", BLACK, series(|p| p.offered_rps)),
                ("queue", RED, series(|p| p.queue as f64)),
                ("burst req/s", MAGENTA, series(|p| p.burst_rps)),
            ],
        )?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
