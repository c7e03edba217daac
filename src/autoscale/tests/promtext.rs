//! The Prometheus text parser: samples, escapes, errors, and properties over any input.

use crate::autoscale::promtext::*;
use proptest::prelude::*;
use std::borrow::Cow;

const VLLM_PAGE: &str = include_str!("../testdata/vllm.prom");

fn all(text: &str) -> Vec<Sample<'_>> {
    let mut v = Vec::new();
    for_each_sample(text, |s| v.push(s)).expect("page parses");
    v
}

fn one(text: &str) -> Sample<'_> {
    let v = all(text);
    assert_eq!(v.len(), 1, "{v:?}");
    v[0]
}

fn err(text: &str) -> ParseError {
    for_each_sample(text, |_| {}).expect_err("page must not parse")
}

fn labels_of<'a>(s: &Sample<'a>) -> Vec<(&'a str, String)> {
    s.labels()
        .map(|l| (l.name, l.value.unescaped().into_owned()))
        .collect()
}

#[test]
fn vllm_page_parses_every_sample() {
    let samples = all(VLLM_PAGE);
    let lines = VLLM_PAGE
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(samples.len(), lines);

    let waiting = samples
        .iter()
        .find(|s| s.name == "vllm:num_requests_waiting")
        .unwrap();
    assert_eq!(waiting.value, 3.0);
    assert!(
        waiting
            .label("model_name")
            .unwrap()
            .matches("meta-llama/Llama-3.1-8B-Instruct")
    );
    assert_eq!(waiting.label("engine").unwrap().raw(), "0");
    assert_eq!(waiting.label("nope"), None);

    let inf_bucket = samples
        .iter()
        .find(|s| {
            s.name == "vllm:time_to_first_token_seconds_bucket"
                && s.label("le").is_some_and(|l| l.matches("+Inf"))
        })
        .unwrap();
    assert_eq!(inf_bucket.value, 8660.0);
    let created = samples
        .iter()
        .find(|s| s.name == "vllm:prompt_tokens_created")
        .unwrap();
    assert_eq!(created.value, 1.7471234912345e9);
    let unlabelled = samples
        .iter()
        .find(|s| s.name == "process_open_fds")
        .unwrap();
    assert_eq!((unlabelled.value, unlabelled.raw_labels()), (87.0, ""));
}

#[test]
fn sglang_page() {
    let page = "\
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 162.0
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.28
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 2826.0
sglang:time_to_first_token_seconds_bucket{le=\"0.001\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.0
sglang:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 11008.0
sglang:time_to_first_token_seconds_sum{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 2.3518979474117756e+06
";
    let s = all(page);
    let got: Vec<(&str, f64)> = s.iter().map(|s| (s.name, s.value)).collect();
    assert_eq!(
        got,
        [
            ("sglang:num_running_reqs", 162.0),
            ("sglang:token_usage", 0.28),
            ("sglang:num_queue_reqs", 2826.0),
            ("sglang:time_to_first_token_seconds_bucket", 0.0),
            ("sglang:time_to_first_token_seconds_bucket", 11008.0),
            ("sglang:time_to_first_token_seconds_sum", 2351897.9474117756),
        ]
    );
}

#[test]
fn tgi_page() {
    let page = "\
# TYPE tgi_queue_size gauge
tgi_queue_size 7
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 32
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le=\"0.5\"} 10
tgi_request_duration_bucket{le=\"+Inf\"} 12
tgi_request_duration_sum 4.25
tgi_request_duration_count 12
";
    let s = all(page);
    assert_eq!(s.len(), 6);
    assert_eq!((s[0].name, s[0].value), ("tgi_queue_size", 7.0));
    assert_eq!((s[1].name, s[1].value), ("tgi_batch_current_size", 32.0));
    assert_eq!(labels_of(&s[3]), [("le", "+Inf".to_string())]);
}

#[test]
fn triton_page_with_spaces_between_labels() {
    // Triton's docs show `{model="m",version="1", le="100"}`; DCGM writes `{gpu="0", UUID=...}`.
    let page = "\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model=\"resnet50\",version=\"1\"} 4
nv_inference_pending_request_count{model=\"bert\",version=\"2\"} 0
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-b54bd4e1-4e1c-4ad9-9e6a-3b7c2f9b1e3a\"} 85899345920
nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-b54bd4e1-4e1c-4ad9-9e6a-3b7c2f9b1e3a\"} 7.2e+10
nv_inference_first_response_histogram_ms{model=\"my_model\",version=\"1\", le=\"+Inf\"} 37
";
    let s = all(page);
    assert_eq!(s.len(), 5);
    assert_eq!(s[2].value, 85899345920.0);
    assert_eq!(s[3].value, 7.2e10);
    assert_eq!(
        labels_of(&s[4]),
        [
            ("model", "my_model".to_string()),
            ("version", "1".to_string()),
            ("le", "+Inf".to_string())
        ]
    );
}

#[test]
fn dcgm_page() {
    let page = "\
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu=\"0\", UUID=\"GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52\", device=\"nvidia0\", modelName=\"NVIDIA H100 80GB HBM3\", Hostname=\"node-1\", container=\"engine\", namespace=\"ml\", pod=\"chat-engine-0\"} 12288
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu=\"0\", UUID=\"GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52\", device=\"nvidia0\", modelName=\"NVIDIA H100 80GB HBM3\", Hostname=\"node-1\", container=\"engine\", namespace=\"ml\", pod=\"chat-engine-0\"} 69632
";
    let s = all(page);
    assert_eq!(s.len(), 2);
    assert!(
        s[1].label("modelName")
            .unwrap()
            .matches("NVIDIA H100 80GB HBM3")
    );
    assert!(s[1].label("pod").unwrap().matches("chat-engine-0"));
    assert_eq!(s[1].value, 69632.0);
}

#[test]
fn label_escapes_are_unescaped_lazily() {
    let s = one(r#"m{path="C:\\dir",quote="say \"hi\"",nl="a\nb",odd="\t",plain="x"} 1"#);
    assert_eq!(s.label("path").unwrap().raw(), r"C:\\dir");
    assert_eq!(s.label("path").unwrap().unescaped(), r"C:\dir");
    assert_eq!(s.label("quote").unwrap().unescaped(), r#"say "hi""#);
    assert!(s.label("quote").unwrap().matches(r#"say "hi""#));
    assert!(!s.label("quote").unwrap().matches(r#"say \"hi\""#));
    assert_eq!(s.label("nl").unwrap().unescaped(), "a\nb");
    // Unknown escapes are kept as written.
    assert_eq!(s.label("odd").unwrap().unescaped(), r"\t");
    assert!(s.label("odd").unwrap().matches(r"\t"));
    assert!(matches!(
        s.label("plain").unwrap().unescaped(),
        Cow::Borrowed("x")
    ));
}

#[test]
fn utf8_label_values() {
    let s = one("m{who=\"Zoë \\\"ü\\\" 模型\"} 2");
    assert_eq!(s.label("who").unwrap().unescaped(), "Zoë \"ü\" 模型");
}

#[test]
fn special_and_scientific_values() {
    let v: Vec<f64> = all("a NaN\nb +Inf\nc -Inf\nd 1.5e-3\ne -2E+4\nf 0\ng .5\nh 42\n")
        .iter()
        .map(|s| s.value)
        .collect();
    assert!(v[0].is_nan());
    assert_eq!(
        &v[1..],
        [
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0015,
            -20000.0,
            0.0,
            0.5,
            42.0
        ]
    );
}

#[test]
fn timestamps() {
    let s = one("m{a=\"b\"} 3 1712345678901");
    assert_eq!((s.value, s.timestamp), (3.0, Some(1712345678901.0)));
    // OpenMetrics writes seconds as a float.
    assert_eq!(one("m 3 1712345678.901").timestamp, Some(1712345678.901));
    assert_eq!(one("m 3").timestamp, None);
    assert_eq!(one("m 3 -5").timestamp, Some(-5.0));
}

#[test]
fn crlf_line_endings() {
    let s = all("# HELP m x\r\n# TYPE m gauge\r\nm{a=\"b\"} 1\r\nn 2\r\n");
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].value, s[1].value), (1.0, 2.0));
    assert_eq!(s[1].name, "n");
}

#[test]
fn empty_and_comment_only_pages() {
    assert!(all("").is_empty());
    assert!(all("\n\n  \n\t\n").is_empty());
    assert!(all("# HELP m help\n# TYPE m gauge\n# EOF\n").is_empty());
}

#[test]
fn openmetrics_extras() {
    let page = "\
# TYPE foo histogram
foo_bucket{le=\"0.01\"} 0
foo_bucket{le=\"0.1\"} 8 # {trace_id=\"KOO5S4vxi0o\"} 0.67
foo_bucket{le=\"+Inf\"} 17 1520879607.789 # {trace_id=\"oHg5SJYRHA0\"} 9.8 1520879607.789
foo_created 1520430000.123
# EOF
";
    let s = all(page);
    assert_eq!(s.len(), 4);
    assert_eq!(s[1].value, 8.0);
    assert_eq!((s[2].value, s[2].timestamp), (17.0, Some(1520879607.789)));
    assert_eq!((s[3].name, s[3].value), ("foo_created", 1520430000.123));
}

#[test]
fn lenient_spacing_and_trailing_comma() {
    let s = one("  m {a = \"1\" , b=\"2\",} \t 5 ");
    assert_eq!(s.name, "m");
    assert_eq!(s.value, 5.0);
    assert_eq!(
        labels_of(&s),
        [("a", "1".to_string()), ("b", "2".to_string())]
    );
    assert!(one("m{} 1").labels().next().is_none());
}

#[test]
fn error_unterminated_label_value() {
    let e = err("ok 1\nm{a=\"oops} 1\n");
    assert_eq!(
        e,
        ParseError {
            line: 2,
            kind: ParseErrorKind::UnterminatedLabelValue
        }
    );
    assert_eq!(e.to_string(), "metrics line 2: unterminated label value");
    // An escaped closing quote does not close the value.
    assert_eq!(
        err("m{a=\"x\\\"} 1").kind,
        ParseErrorKind::UnterminatedLabelValue
    );
}

#[test]
fn error_missing_value() {
    assert_eq!(
        err("# c\n\nm{a=\"b\"}\n"),
        ParseError {
            line: 3,
            kind: ParseErrorKind::MissingValue
        }
    );
    assert_eq!(err("m").kind, ParseErrorKind::MissingValue);
    assert_eq!(err("m   ").kind, ParseErrorKind::MissingValue);
    assert_eq!(err("m # {a=\"b\"} 1").kind, ParseErrorKind::MissingValue);
}

#[test]
fn error_garbage_value() {
    for bad in [
        "m one",
        "m 1.2.3",
        "m 0x",
        "m{a=\"b\"} 12abc",
        "m {a=\"b\"}}",
    ] {
        assert_eq!(
            err(bad),
            ParseError {
                line: 1,
                kind: ParseErrorKind::InvalidValue
            },
            "{bad}"
        );
    }
}

#[test]
fn error_bad_label_syntax() {
    let cases = [
        ("m{a} 1", ParseErrorKind::ExpectedEquals),
        ("m{a=b} 1", ParseErrorKind::ExpectedQuote),
        ("m{1a=\"b\"} 1", ParseErrorKind::InvalidLabelName),
        ("m{a:b=\"c\"} 1", ParseErrorKind::ExpectedEquals),
        ("m{,} 1", ParseErrorKind::InvalidLabelName),
        ("m{a=\"b\" c=\"d\"} 1", ParseErrorKind::ExpectedCommaOrBrace),
        ("m{a=\"b\"", ParseErrorKind::UnterminatedLabels),
        ("m{a=\"b\",", ParseErrorKind::UnterminatedLabels),
    ];
    for (text, kind) in cases {
        assert_eq!(err(text), ParseError { line: 1, kind }, "{text}");
    }
}

#[test]
fn error_bad_name_timestamp_and_trailing_text() {
    assert_eq!(err("1m 1").kind, ParseErrorKind::InvalidMetricName);
    assert_eq!(err("foo-bar 1").kind, ParseErrorKind::InvalidMetricName);
    assert_eq!(err("{a=\"b\"} 1").kind, ParseErrorKind::InvalidMetricName);
    assert_eq!(err("m 1 soon").kind, ParseErrorKind::InvalidTimestamp);
    assert_eq!(err("m 1 NaN").kind, ParseErrorKind::InvalidTimestamp);
    assert_eq!(err("m 1 2 3").kind, ParseErrorKind::TrailingText);
}

#[test]
fn samples_before_an_error_are_delivered_and_iteration_stops() {
    let mut it = samples("a 1\nb x\nc 3\n");
    assert_eq!(it.next().unwrap().unwrap().name, "a");
    assert_eq!(it.next().unwrap().unwrap_err().line, 2);
    assert!(it.next().is_none());
}

/// Renders a label value the way Prometheus client libraries escape it.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v:?}")
    }
}

fn same_value(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

#[derive(Debug, Clone)]
struct GenSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    timestamp: Option<i64>,
}

fn gen_sample() -> impl Strategy<Value = GenSample> {
    (
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,30}",
        prop::collection::vec(("[a-zA-Z_][a-zA-Z0-9_]{0,12}", any::<String>()), 0..5),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            (0u32..10_000).prop_map(f64::from),
        ],
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(name, labels, value, timestamp)| GenSample {
            name,
            labels,
            value,
            timestamp,
        })
}

fn mutation() -> impl Strategy<Value = (usize, u8, Vec<u8>)> {
    let interesting = prop::sample::select(b"{}\",=\\\n\r# \t:_aZ09.+-eEnNIf\xc3\xa9\xff".to_vec());
    (
        any::<usize>(),
        0u8..3,
        prop::collection::vec(interesting, 0..6),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let lines = text.split('\n').count();
        match for_each_sample(&text, |s| {
            for l in s.labels() {
                let _ = l.value.unescaped();
            }
        }) {
            Ok(()) => {}
            Err(e) => prop_assert!(e.line >= 1 && e.line <= lines),
        }
    }

    #[test]
    fn mutated_pages_never_panic(muts in prop::collection::vec(mutation(), 1..8)) {
        let mut bytes = VLLM_PAGE.as_bytes().to_vec();
        for (at, op, data) in muts {
            let at = at % (bytes.len() + 1);
            match op {
                0 => { bytes.splice(at..at, data); }
                1 => { let end = (at + data.len()).min(bytes.len()); bytes.drain(at..end); }
                _ => { let end = (at + data.len()).min(bytes.len()); bytes.splice(at..end, data); }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines = text.split('\n').count();
        let mut seen = 0usize;
        let res = for_each_sample(&text, |s| {
            seen += 1;
            for l in s.labels() {
                let _ = l.value.unescaped();
            }
        });
        if let Err(e) = res {
            prop_assert!(e.line >= 1 && e.line <= lines);
        }
        prop_assert!(seen <= lines);
    }

    #[test]
    fn rendered_samples_parse_back(
        gens in prop::collection::vec(gen_sample(), 0..20),
        crlf in any::<bool>(),
        spaced in any::<bool>(),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let sep = if spaced { ", " } else { "," };
        let mut page = String::from("# HELP x some help\n");
        for g in &gens {
            page.push_str(&g.name);
            if !g.labels.is_empty() {
                let parts: Vec<String> = g
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                page.push('{');
                page.push_str(&parts.join(sep));
                page.push('}');
            }
            page.push(' ');
            page.push_str(&render_value(g.value));
            if let Some(ts) = g.timestamp {
                page.push_str(&format!(" {ts}"));
            }
            page.push_str(eol);
        }
        let parsed: Vec<Sample<'_>> = samples(&page).collect::<Result<_, _>>().map_err(|e| {
            TestCaseError::fail(format!("{e} in {page:?}"))
        })?;
        prop_assert_eq!(parsed.len(), gens.len());
        for (p, g) in parsed.iter().zip(&gens) {
            prop_assert_eq!(p.name, g.name.as_str());
            prop_assert!(same_value(p.value, g.value), "{} vs {}", p.value, g.value);
            prop_assert_eq!(p.timestamp, g.timestamp.map(|t| t as f64));
            let labels: Vec<(String, String)> = p
                .labels()
                .map(|l| (l.name.to_string(), l.value.unescaped().into_owned()))
                .collect();
            prop_assert_eq!(&labels, &g.labels);
            for (k, v) in &g.labels {
                // The first label of that name wins, as with a duplicate on the page.
                let first = &g.labels.iter().find(|(k2, _)| k2 == k).unwrap().1;
                prop_assert!(p.label(k).unwrap().matches(first));
                prop_assert_eq!(p.label(k).unwrap().unescaped() == v.as_str(), first == v);
            }
        }
    }
}
