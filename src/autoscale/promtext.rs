//! A zero-copy parser for the Prometheus text exposition format (0.0.4).
//!
//! Written here rather than taken from crates.io: `prometheus-parse` matches names with
//! `\w+`, so it cannot read vLLM's `vllm:num_requests_waiting`, splits labels on every
//! comma and allocates per line; `openmetrics-parser` is LGPL-3.0 and builds owned trees.
//! An engine page is scraped every tick for every pod, so samples borrow from the page and
//! label values are unescaped only when someone asks.
//!
//! Accepted beyond 0.0.4, so OpenMetrics pages parse too: `# EOF` and every other `#` line
//! is ignored, an exemplar (` # {...} v`) after the value is skipped, a timestamp may be a
//! float, and `_created` series are ordinary samples. Not supported: UTF-8 quoted metric
//! names (`{"my.metric"}`), which the engines we read do not emit.
//!
//! Whitespace (spaces, tabs) is allowed between tokens and a trailing comma inside a label
//! set, as in Prometheus' own parser; unknown escapes in label values (`\t`) are kept as
//! written rather than failing the whole scrape.

use std::borrow::Cow;

/// Why a metrics page could not be read, with the 1-based line it happened on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong on that line.
    pub kind: ParseErrorKind,
}

/// What was wrong on a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("invalid metric name")]
    InvalidMetricName,
    #[error("invalid label name")]
    InvalidLabelName,
    #[error("expected '=' after label name")]
    ExpectedEquals,
    #[error("expected '\"' to open a label value")]
    ExpectedQuote,
    #[error("unterminated label value")]
    UnterminatedLabelValue,
    #[error("expected ',' or '}}' after a label value")]
    ExpectedCommaOrBrace,
    #[error("unterminated label set")]
    UnterminatedLabels,
    #[error("missing sample value")]
    MissingValue,
    #[error("invalid sample value")]
    InvalidValue,
    #[error("invalid timestamp")]
    InvalidTimestamp,
    #[error("unexpected text after the sample")]
    TrailingText,
}

/// One sample line, borrowing from the page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Metric name as written, e.g. `vllm:num_requests_waiting` or `..._bucket`.
    pub name: &'a str,
    /// The value; `NaN`, `+Inf` and `-Inf` are kept as such.
    pub value: f64,
    /// Timestamp as written: milliseconds in 0.0.4, seconds in OpenMetrics.
    pub timestamp: Option<f64>,
    labels: &'a str,
}

impl<'a> Sample<'a> {
    /// The label text between the braces, still escaped (empty without labels).
    pub fn raw_labels(&self) -> &'a str {
        self.labels
    }

    /// The labels in the order written.
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            text: self.labels,
            pos: 0,
        }
    }

    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<LabelValue<'a>> {
        self.labels().find(|l| l.name == name).map(|l| l.value)
    }
}

/// One `name="value"` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label<'a> {
    pub name: &'a str,
    pub value: LabelValue<'a>,
}

/// A label value as written between the quotes; unescape on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelValue<'a> {
    raw: &'a str,
}

impl<'a> LabelValue<'a> {
    /// The value still escaped, as on the page.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The value with `\\`, `\"` and `\n` unescaped; borrows when there is nothing to unescape.
    pub fn unescaped(&self) -> Cow<'a, str> {
        if !self.raw.contains('\\') {
            return Cow::Borrowed(self.raw);
        }
        let bytes: Vec<u8> = Unescape::new(self.raw).collect();
        // Only ASCII sequences are replaced by ASCII bytes, so this stays UTF-8.
        match String::from_utf8(bytes) {
            Ok(s) => Cow::Owned(s),
            Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }

    /// Whether the unescaped value equals `expected`, without allocating.
    pub fn matches(&self, expected: &str) -> bool {
        if !self.raw.contains('\\') {
            return self.raw == expected;
        }
        Unescape::new(self.raw).eq(expected.bytes())
    }
}

/// Byte-wise unescaping of a raw label value.
struct Unescape<'a> {
    bytes: &'a [u8],
    pos: usize,
    pending: Option<u8>,
}

impl<'a> Unescape<'a> {
    fn new(raw: &'a str) -> Self {
        Self {
            bytes: raw.as_bytes(),
            pos: 0,
            pending: None,
        }
    }
}

impl Iterator for Unescape<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        if let Some(b) = self.pending.take() {
            return Some(b);
        }
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        if b != b'\\' {
            return Some(b);
        }
        let Some(&e) = self.bytes.get(self.pos) else {
            return Some(b'\\');
        };
        self.pos += 1;
        Some(match e {
            b'\\' => b'\\',
            b'"' => b'"',
            b'n' => b'\n',
            other => {
                // Unknown escape: keep it as written.
                self.pending = Some(other);
                b'\\'
            }
        })
    }
}

/// Iterator over a sample's labels.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = Label<'a>;

    fn next(&mut self) -> Option<Label<'a>> {
        // The text was validated when the sample was parsed, so an error cannot happen here.
        let (label, next) = next_label(self.text, self.pos).ok()?;
        self.pos = next;
        label
    }
}

/// Iterator over the samples of a page; yields the first error, then stops.
#[derive(Debug, Clone)]
pub struct Samples<'a> {
    lines: std::str::Split<'a, char>,
    line: usize,
    failed: bool,
}

impl<'a> Iterator for Samples<'a> {
    type Item = Result<Sample<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        for line in self.lines.by_ref() {
            self.line += 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            match parse_line(line) {
                Ok(None) => continue,
                Ok(Some(s)) => return Some(Ok(s)),
                Err(kind) => {
                    self.failed = true;
                    return Some(Err(ParseError {
                        line: self.line,
                        kind,
                    }));
                }
            }
        }
        None
    }
}

/// The samples of `text`, in order.
pub fn samples(text: &str) -> Samples<'_> {
    Samples {
        lines: text.split('\n'),
        line: 0,
        failed: false,
    }
}

/// Calls `f` for every sample of `text`, stopping at the first malformed line.
///
/// Samples before the bad line have already been passed to `f`; callers that need
/// all-or-nothing should discard what they gathered when this returns an error.
pub fn for_each_sample<'a>(text: &'a str, mut f: impl FnMut(Sample<'a>)) -> Result<(), ParseError> {
    for s in samples(text) {
        f(s?);
    }
    Ok(())
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_blank(b[i]) {
        i += 1;
    }
    i
}

fn is_metric_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_metric_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn is_label_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses one line; `None` for blank and `#` lines.
fn parse_line(line: &str) -> Result<Option<Sample<'_>>, ParseErrorKind> {
    let b = line.as_bytes();
    let mut i = skip_blank(b, 0);
    if i == b.len() || b[i] == b'#' {
        return Ok(None);
    }
    let start = i;
    if !is_metric_start(b[i]) {
        return Err(ParseErrorKind::InvalidMetricName);
    }
    while i < b.len() && is_metric_char(b[i]) {
        i += 1;
    }
    let name = &line[start..i];

    let after_name = skip_blank(b, i);
    let mut labels = "";
    if after_name < b.len() && b[after_name] == b'{' {
        let open = after_name + 1;
        let close = scan_labels(line, open)?;
        labels = &line[open..close];
        i = close + 1;
    } else if after_name == i && i < b.len() {
        // A character that can neither continue the name nor follow it, e.g. `foo-bar`.
        return Err(ParseErrorKind::InvalidMetricName);
    }

    i = skip_blank(b, i);
    if i == b.len() || b[i] == b'#' {
        return Err(ParseErrorKind::MissingValue);
    }
    let (value_text, next) = token(line, i);
    let value = parse_float(value_text).ok_or(ParseErrorKind::InvalidValue)?;
    i = skip_blank(b, next);

    let mut timestamp = None;
    if i < b.len() && b[i] != b'#' {
        let (ts_text, next) = token(line, i);
        let ts = parse_float(ts_text)
            .filter(|t| t.is_finite())
            .ok_or(ParseErrorKind::InvalidTimestamp)?;
        timestamp = Some(ts);
        i = skip_blank(b, next);
    }
    // Anything left must be an OpenMetrics exemplar, which we do not use.
    if i < b.len() && b[i] != b'#' {
        return Err(ParseErrorKind::TrailingText);
    }
    Ok(Some(Sample {
        name,
        value,
        timestamp,
        labels,
    }))
}

/// The run of non-blank characters at `i` and the index after it.
fn token(line: &str, i: usize) -> (&str, usize) {
    let b = line.as_bytes();
    let mut end = i;
    while end < b.len() && !is_blank(b[end]) {
        end += 1;
    }
    (&line[i..end], end)
}

/// A float as Prometheus writes it: decimal, scientific, `NaN`, `+Inf`, `-Inf`.
fn parse_float(s: &str) -> Option<f64> {
    // Rust's parser also takes `inf`/`infinity` in any case, as Go's ParseFloat does.
    s.parse().ok()
}

/// Validates the label set opening at `open` (just past `{`); returns the index of `}`.
fn scan_labels(line: &str, open: usize) -> Result<usize, ParseErrorKind> {
    let mut i = open;
    loop {
        let (label, next) = next_label(line, i)?;
        i = next;
        if label.is_none() {
            break;
        }
    }
    if i < line.len() && line.as_bytes()[i] == b'}' {
        Ok(i)
    } else {
        Err(ParseErrorKind::UnterminatedLabels)
    }
}

/// Reads the `name="value"` pair at `i` and a following comma.
///
/// Returns `None` (and the index) at `}` or at the end of `text`; the caller decides
/// whether the end is allowed.
fn next_label(text: &str, i: usize) -> Result<(Option<Label<'_>>, usize), ParseErrorKind> {
    let b = text.as_bytes();
    let mut i = skip_blank(b, i);
    if i >= b.len() || b[i] == b'}' {
        return Ok((None, i));
    }
    let name_start = i;
    if !is_label_start(b[i]) {
        return Err(ParseErrorKind::InvalidLabelName);
    }
    while i < b.len() && is_label_char(b[i]) {
        i += 1;
    }
    let name = &text[name_start..i];
    i = skip_blank(b, i);
    if i >= b.len() || b[i] != b'=' {
        return Err(ParseErrorKind::ExpectedEquals);
    }
    i = skip_blank(b, i + 1);
    if i >= b.len() || b[i] != b'"' {
        return Err(ParseErrorKind::ExpectedQuote);
    }
    i += 1;
    let value_start = i;
    loop {
        match b.get(i) {
            None => return Err(ParseErrorKind::UnterminatedLabelValue),
            Some(b'"') => break,
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
        }
    }
    let raw = &text[value_start..i];
    i = skip_blank(b, i + 1);
    match b.get(i) {
        Some(b',') => i += 1,
        None | Some(b'}') => {}
        Some(_) => return Err(ParseErrorKind::ExpectedCommaOrBrace),
    }
    Ok((
        Some(Label {
            name,
            value: LabelValue { raw },
        }),
        i,
    ))
}
