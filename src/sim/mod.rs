//! `spillway simulate`: replays a traffic trace against an InferenceService and its
//! ScalingPolicy (the YAML you would apply), using the very `decide()` and `admit()` that run in
//! the cluster, and reports latency, replicas, burst and cost.

pub mod oracle;
pub mod report;
pub mod rollout;
pub mod trace;
pub mod world;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::api::{InferenceService, ScalingPolicy, ScalingPolicySpec};
use report::Run;
use trace::{Shape, ShapeParams, Trace};
use world::{ModelParams, simulate};

/// Annotations on the InferenceService that set a scenario's defaults (flags override them), so
/// an example file carries its own trace. The controller ignores them.
pub const ANNOTATION_PREFIX: &str = "sim.spillway.dev/";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// YAML file(s) with one InferenceService and one or more ScalingPolicies (several policies
    /// are simulated side by side).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Trace: step, spike, diurnal, ramp, or a CSV file of `time_seconds,requests_per_second`.
    #[arg(long)]
    pub trace: Option<String>,
    /// Length of a built-in trace (e.g. 90m, 2h, 1d).
    #[arg(long)]
    pub duration: Option<String>,
    /// Base requests per second of a built-in trace.
    #[arg(long)]
    pub rps: Option<f64>,
    /// Peak of a built-in trace as a multiple of `--rps`.
    #[arg(long)]
    pub peak: Option<f64>,
    /// Length of the spike of `--trace spike` (e.g. 10m).
    #[arg(long)]
    pub spike: Option<String>,
    /// Random seed (arrivals, token counts, cold starts).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Engine replicas the cluster can schedule (GPU quota); more stay Unschedulable.
    #[arg(long)]
    pub gpu_quota: Option<u32>,
    /// Cold start range in seconds, `MIN-MAX` or one value (default 180-300).
    #[arg(long)]
    pub cold_start: Option<String>,
    /// Time-to-first-token objective in milliseconds.
    #[arg(long)]
    pub slo_ms: Option<u64>,
    /// Price of one GPU-hour.
    #[arg(long)]
    pub gpu_hour_price: Option<f64>,
    /// Mean output tokens per request.
    #[arg(long)]
    pub output_tokens: Option<u32>,
    /// Output tokens per second per sequence on a replica.
    #[arg(long)]
    pub tokens_per_second: Option<f64>,
    /// Provider time to first token, milliseconds.
    #[arg(long)]
    pub provider_ttft_ms: Option<u64>,
    /// The request class mix, as `CLASS=SHARE,...` over the service's `requestClasses` (e.g.
    /// `restricted=0.3,standard=0.7`); default: every request of the default class.
    #[arg(long)]
    pub classes: Option<String>,
    /// Routers to model one by one (default: the routers as one). With more than one, each
    /// policy runs twice: routers with fixed shares of every engine, and routers sharing one
    /// view of them.
    #[arg(long)]
    pub routers: Option<u32>,
    /// The share of requests reaching the busiest router (default: even).
    #[arg(long)]
    pub router_skew: Option<f64>,
    /// With a shared view: how long after a change a router's report reaches the others, in
    /// milliseconds (default 1, the exchange's gap; reports also go every 50 ms).
    #[arg(long)]
    pub exchange_ms: Option<u64>,
    /// Replay a rollout: a new revision arrives at this time (e.g. 30m) and takes over as the
    /// service's `spec.rollout` says (without it, the default: all at once when as ready as
    /// the stable).
    #[arg(long)]
    pub rollout_at: Option<String>,
    /// The candidate's prefill and decode take this many times the stable's (default 1).
    #[arg(long)]
    pub candidate_slower: Option<f64>,
    /// The share of the candidate's answers that are errors (default 0).
    #[arg(long)]
    pub candidate_errors: Option<f64>,
    /// Summary format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Write the timeline (per autoscaler tick) as CSV here (one file per policy: `NAME-POLICY.csv`).
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Write the plot (SVG) here (one per policy: `NAME-POLICY.svg`); `-` to skip.
    #[arg(long, default_value = "spillway-sim.svg")]
    pub plot: String,
}

/// What the YAML held.
#[derive(Debug)]
pub struct Scenario {
    pub service: InferenceService,
    pub policies: Vec<(String, ScalingPolicySpec)>,
}

/// Reads InferenceService and ScalingPolicy documents; other kinds are an error (a typo in a
/// kind would otherwise be silently ignored).
pub fn parse_scenario(texts: &[(String, String)]) -> anyhow::Result<Scenario> {
    let mut service = None;
    let mut policies = Vec::new();
    for (file, text) in texts {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| anyhow::anyhow!("{file}: not YAML: {e}"))?;
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            match doc.get("kind").and_then(|k| k.as_str()) {
                Some("InferenceService") => {
                    if service.is_some() {
                        bail!(
                            "{file}: more than one InferenceService; simulate one service at a time"
                        );
                    }
                    let s: InferenceService = serde_json::from_value(doc)
                        .with_context(|| format!("{file}: invalid InferenceService"))?;
                    let name = s.metadata.name.clone().unwrap_or_default();
                    s.spec
                        .validate(&name)
                        .map_err(|e| anyhow::anyhow!("{file}: InferenceService {name}: {e}"))?;
                    service = Some(s);
                }
                Some("ScalingPolicy") => {
                    let p: ScalingPolicy = serde_json::from_value(doc)
                        .with_context(|| format!("{file}: invalid ScalingPolicy"))?;
                    let name = p.metadata.name.clone().unwrap_or_else(|| "policy".into());
                    p.spec
                        .validate()
                        .map_err(|e| anyhow::anyhow!("{file}: ScalingPolicy {name}: {e}"))?;
                    policies.push((name, p.spec));
                }
                other => bail!(
                    "{file}: unexpected document kind {other:?} (want InferenceService or ScalingPolicy)"
                ),
            }
        }
    }
    let service = service.context("no InferenceService found in the given files")?;
    if policies.is_empty() {
        let name = service
            .spec
            .scaling_policy_ref
            .as_ref()
            .map_or("defaults".to_string(), |r| {
                format!("{} (missing: defaults)", r.name)
            });
        policies.push((name, ScalingPolicySpec::default()));
    } else if let Some(r) = &service.spec.scaling_policy_ref {
        // The referenced policy first; the others are alternatives to compare.
        policies.sort_by_key(|(n, _)| *n != r.name);
    }
    Ok(Scenario { service, policies })
}

fn cold_start(s: &str) -> anyhow::Result<(f64, f64)> {
    let parse = |v: &str| {
        v.trim()
            .trim_end_matches('s')
            .parse::<f64>()
            .ok()
            .filter(|x| *x >= 0.0)
    };
    let range = match s.split_once('-') {
        Some((a, b)) => parse(a).zip(parse(b)),
        None => parse(s).map(|v| (v, v)),
    };
    match range {
        Some((a, b)) if a <= b => Ok((a, b)),
        _ => bail!("invalid cold start {s:?} (seconds, e.g. 180-300 or 240)"),
    }
}

/// Flag, else the service's `sim.spillway.dev/<key>` annotation, else `default`.
fn setting(
    flag: Option<String>,
    ann: &BTreeMap<String, String>,
    key: &str,
    default: &str,
) -> String {
    flag.or_else(|| ann.get(&format!("{ANNOTATION_PREFIX}{key}")).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn number<T: std::str::FromStr>(what: &str, v: &str) -> anyhow::Result<T> {
    v.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid {what} {v:?}"))
}

/// Builds the trace and model parameters from flags and annotations.
pub fn settings(
    args: &SimulateArgs,
    service: &InferenceService,
) -> anyhow::Result<(Trace, ModelParams)> {
    let ann = service.metadata.annotations.clone().unwrap_or_default();
    let d = ModelParams::default();
    let trace_spec = setting(args.trace.clone(), &ann, "trace", "spike");
    let duration = trace::parse_duration(&setting(args.duration.clone(), &ann, "duration", "2h"))
        .map_err(anyhow::Error::msg)?;
    let rps: f64 = number(
        "rps",
        &setting(args.rps.map(|v| v.to_string()), &ann, "rps", "20"),
    )?;
    let peak: f64 = number(
        "peak",
        &setting(args.peak.map(|v| v.to_string()), &ann, "peak", "4"),
    )?;
    let spike = trace::parse_duration(&setting(args.spike.clone(), &ann, "spike", "20m"))
        .map_err(anyhow::Error::msg)?;
    if !(rps >= 0.0 && rps.is_finite() && peak > 0.0 && peak.is_finite()) {
        bail!("--rps must be >= 0 and --peak > 0");
    }
    let trace = match trace_spec.parse::<Shape>() {
        Ok(shape) => trace::built_in(
            shape,
            &ShapeParams {
                duration_s: duration,
                rps,
                peak,
                spike_s: spike,
            },
        ),
        Err(_) if trace_spec.ends_with(".csv") => {
            let text = std::fs::read_to_string(&trace_spec)
                .with_context(|| format!("reading trace {trace_spec}"))?;
            trace::from_csv(&trace_spec, &text).map_err(anyhow::Error::msg)?
        }
        Err(e) => bail!(e),
    };
    let params = ModelParams {
        seed: number(
            "seed",
            &setting(args.seed.map(|v| v.to_string()), &ann, "seed", "1"),
        )?,
        gpu_quota: match setting(args.gpu_quota.map(|v| v.to_string()), &ann, "gpu-quota", "")
            .as_str()
        {
            "" => None,
            q => Some(number("gpu quota", q)?),
        },
        cold_start_s: cold_start(&setting(
            args.cold_start.clone(),
            &ann,
            "cold-start",
            "180-300",
        ))?,
        slo_ms: number(
            "SLO",
            &setting(
                args.slo_ms.map(|v| v.to_string()),
                &ann,
                "slo-ms",
                &d.slo_ms.to_string(),
            ),
        )?,
        gpu_hour_price: number(
            "GPU-hour price",
            &setting(
                args.gpu_hour_price.map(|v| v.to_string()),
                &ann,
                "gpu-hour-price",
                &d.gpu_hour_price.to_string(),
            ),
        )?,
        output_tokens: number(
            "output tokens",
            &setting(
                args.output_tokens.map(|v| v.to_string()),
                &ann,
                "output-tokens",
                &d.output_tokens.to_string(),
            ),
        )?,
        tokens_per_second: number(
            "tokens per second",
            &setting(
                args.tokens_per_second.map(|v| v.to_string()),
                &ann,
                "tokens-per-second",
                &d.tokens_per_second.to_string(),
            ),
        )?,
        provider_ttft_ms: number(
            "provider TTFT",
            &setting(
                args.provider_ttft_ms.map(|v| v.to_string()),
                &ann,
                "provider-ttft-ms",
                &d.provider_ttft_ms.to_string(),
            ),
        )?,
        ..d
    };
    if params.tokens_per_second <= 0.0 || params.output_tokens == 0 {
        bail!("tokens per second and output tokens must be positive");
    }
    let classes = class_mix(&setting(args.classes.clone(), &ann, "classes", ""), service)?;
    let routers: u32 = number(
        "routers",
        &setting(args.routers.map(|v| v.to_string()), &ann, "routers", "1"),
    )?;
    let router_skew = match setting(
        args.router_skew.map(|v| v.to_string()),
        &ann,
        "router-skew",
        "",
    )
    .as_str()
    {
        "" => None,
        s => Some(number::<f64>("router skew", s)?),
    };
    if routers == 0 || routers > 64 {
        bail!("--routers must be in 1..=64");
    }
    if router_skew.is_some_and(|s| !(s > 0.0 && s <= 1.0)) {
        bail!("--router-skew is the busiest router's share of requests, in (0, 1]");
    }
    let exchange_ms: u64 = number(
        "exchange delay",
        &setting(
            args.exchange_ms.map(|v| v.to_string()),
            &ann,
            "exchange-ms",
            &d.exchange_ms.to_string(),
        ),
    )?;
    let rollout = candidate(args, &ann, service.spec.rollout.as_ref())?;
    Ok((
        trace,
        ModelParams {
            classes,
            routers,
            router_skew,
            exchange_ms: exchange_ms.max(1),
            rollout,
            ..params
        },
    ))
}

/// The rollout to replay, if `--rollout-at` (or its annotation) is given: by the service's
/// `spec.rollout`, or the `sim.spillway.dev/rollout` annotation (files written before the
/// field existed).
fn candidate(
    args: &SimulateArgs,
    ann: &BTreeMap<String, String>,
    in_spec: Option<&crate::api::RolloutSpec>,
) -> anyhow::Result<Option<rollout::Candidate>> {
    let at = setting(args.rollout_at.clone(), ann, "rollout-at", "");
    if at.is_empty() {
        return Ok(None);
    }
    let at_s = trace::parse_duration(&at).map_err(anyhow::Error::msg)?;
    let slower: f64 = number(
        "candidate slowdown",
        &setting(
            args.candidate_slower.map(|v| v.to_string()),
            ann,
            "candidate-slower",
            "1",
        ),
    )?;
    let error_rate: f64 = number(
        "candidate error rate",
        &setting(
            args.candidate_errors.map(|v| v.to_string()),
            ann,
            "candidate-errors",
            "0",
        ),
    )?;
    if !(slower > 0.0 && slower.is_finite() && (0.0..=1.0).contains(&error_rate)) {
        bail!("--candidate-slower must be positive and --candidate-errors in [0, 1]");
    }
    let spec = match ann.get(&format!("{ANNOTATION_PREFIX}rollout")) {
        Some(text) => Some(
            serde_saphyr::from_str::<crate::api::RolloutSpec>(text)
                .map_err(|e| anyhow::anyhow!("{ANNOTATION_PREFIX}rollout: {e}"))?,
        ),
        None => in_spec.cloned(),
    };
    if let Some(spec) = &spec {
        spec.validate()
            .map_err(|e| anyhow::anyhow!("rollout: {e}"))?;
        if spec.shadow_percent > 0 {
            // Nothing would be mirrored, and the shadow's gate would wait for ever.
            bail!("rollout: the simulator does not model shadowPercent (the routers mirror it)");
        }
    }
    Ok(Some(rollout::Candidate {
        at_ms: at_s as i64 * 1000,
        slower,
        error_rate,
        spec,
    }))
}

/// Parses `CLASS=SHARE,...`: each class one of the service's, each share positive.
fn class_mix(text: &str, service: &InferenceService) -> anyhow::Result<Vec<(String, f64)>> {
    let known = crate::router::classes::Classes::new(service.spec.request_classes.as_ref());
    let mut mix: Vec<(String, f64)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, share)) = part.split_once('=') else {
            bail!("invalid class mix {part:?} (want CLASS=SHARE, e.g. restricted=0.3)");
        };
        let name = name.trim();
        known
            .resolve(Some(name.as_bytes()))
            .map_err(|e| anyhow::anyhow!("--classes: {e}"))?;
        let share: f64 = number("class share", share)?;
        if !(share > 0.0 && share.is_finite()) {
            bail!("class {name:?}: share must be positive");
        }
        if mix.iter().any(|(n, _)| n == name) {
            bail!("class {name:?} is in the mix twice");
        }
        mix.push((name.to_string(), share));
    }
    Ok(mix)
}

/// `NAME.ext` for one policy, `NAME-POLICY.ext` when several are compared.
fn per_policy(path: &str, policy: &str, several: bool) -> String {
    if !several {
        return path.to_string();
    }
    let p = std::path::Path::new(path);
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = p.extension().and_then(|s| s.to_str()).unwrap_or("");
    let safe: String = policy
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    p.with_file_name(format!("{stem}-{safe}.{ext}"))
        .display()
        .to_string()
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let texts = args
        .files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| (f.display().to_string(), t))
                .with_context(|| format!("reading {}", f.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let scenario = parse_scenario(&texts)?;
    let (trace, params) = settings(&args, &scenario.service)?;
    let name = scenario.service.metadata.name.clone().unwrap_or_default();
    let several = scenario.policies.len() > 1 || params.routers > 1;
    let started = std::time::Instant::now();
    // Several routers: each policy with fixed shares, then with one shared view.
    let views: &[(bool, &str)] = if params.routers > 1 {
        &[(false, ", fixed shares"), (true, ", shared view")]
    } else {
        &[(false, "")]
    };
    let (service, base, trace_ref) = (&scenario.service, &params, &trace);
    let runs: Vec<Run> = scenario
        .policies
        .iter()
        .flat_map(|(policy_name, policy)| {
            views.iter().map(move |&(shared_view, label)| {
                let p = ModelParams {
                    shared_view,
                    ..base.clone()
                };
                Run {
                    policy: format!("{policy_name}{label}"),
                    result: simulate(service, policy, trace_ref, &p),
                }
            })
        })
        .collect();
    let elapsed = started.elapsed();

    for r in &runs {
        if let Some(path) = &args.timeline {
            let path = per_policy(&path.display().to_string(), &r.policy, several);
            std::fs::write(&path, report::timeline_csv(&r.result))
                .with_context(|| format!("writing {path}"))?;
            eprintln!("timeline: {path}");
        }
        if args.plot != "-" {
            let path = per_policy(&args.plot, &r.policy, several);
            let svg = report::plot_svg(&r.result, &format!("{name} / {}", r.policy))
                .map_err(anyhow::Error::msg)?;
            std::fs::write(&path, svg).with_context(|| format!("writing {path}"))?;
            eprintln!("plot: {path}");
        }
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "service": name,
                "trace": {"name": trace.name, "durationSeconds": trace.duration_s(), "meanRps": trace.mean_rps()},
                "model": params,
                "runs": report::json(&runs),
            }))?
        ),
        Output::Table => {
            println!(
                "{name}: trace {} for {} s (mean {:.1} req/s), seed {}, cold start {:.0}-{:.0} s{}",
                trace.name,
                trace.duration_s(),
                trace.mean_rps(),
                params.seed,
                params.cold_start_s.0,
                params.cold_start_s.1,
                params
                    .gpu_quota
                    .map_or(String::new(), |q| format!(", GPU quota {q} replicas")),
            );
            println!();
            print!("{}", report::table(&runs, params.slo_ms));
            println!();
            println!("simulated in {:.2} s", elapsed.as_secs_f64());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
