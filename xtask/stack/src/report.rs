//! Scenario results: a summary table in the style of the seed report's "Success Metrics"
//! and a machine-readable `target/e2e/report.json`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// How a metric is judged.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// The value must be at most this.
    AtMost { value: f64 },
    /// The value must be at least this.
    AtLeast { value: f64 },
    /// The value must equal this.
    Equals { value: f64 },
    /// Recorded for the report, not judged.
    Info,
}

impl Target {
    fn passes(&self, v: f64) -> bool {
        match self {
            Target::AtMost { value } => v <= *value,
            Target::AtLeast { value } => v >= *value,
            Target::Equals { value } => (v - value).abs() < f64::EPSILON,
            Target::Info => true,
        }
    }

    fn describe(&self, unit: &str) -> String {
        match self {
            Target::AtMost { value } => format!("≤ {} {unit}", fmt_num(*value)),
            Target::AtLeast { value } => format!("≥ {} {unit}", fmt_num(*value)),
            Target::Equals { value } => format!("= {} {unit}", fmt_num(*value)),
            Target::Info => "(recorded)".into(),
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub target: Target,
    pub pass: bool,
}

/// One scenario's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub pass: bool,
    pub duration_s: f64,
    pub metrics: Vec<Metric>,
    /// Expected-versus-actual sentences for each failed check.
    pub failures: Vec<String>,
}

impl ScenarioReport {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            pass: true,
            ..Default::default()
        }
    }

    /// Records a metric and judges it.
    pub fn metric(&mut self, name: &str, value: f64, unit: &str, target: Target) {
        let pass = target.passes(value);
        if !pass {
            self.fail(format!(
                "{name}: expected {}, measured {} {unit}",
                target.describe(unit),
                fmt_num(value)
            ));
        }
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit: unit.into(),
            target,
            pass,
        });
    }

    /// Records a yes/no check as a metric (1 = yes).
    pub fn check(&mut self, name: &str, ok: bool, expected: &str, actual: impl std::fmt::Display) {
        self.metrics.push(Metric {
            name: name.into(),
            value: if ok { 1.0 } else { 0.0 },
            unit: "bool".into(),
            target: Target::Equals { value: 1.0 },
            pass: ok,
        });
        if !ok {
            self.fail(format!("{name}: expected {expected}, but {actual}"));
        }
    }

    pub fn fail(&mut self, why: String) {
        self.pass = false;
        self.failures.push(why);
    }
}

/// The table printed at the end of a run.
pub fn summary(reports: &[ScenarioReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n| Scenario | Metric | Target | Actual | Status |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in reports {
        for m in &r.metrics {
            let actual = if m.unit == "bool" {
                (if m.value == 1.0 { "yes" } else { "no" }).to_string()
            } else {
                format!("{} {}", fmt_num(m.value), m.unit)
            };
            let target = if m.unit == "bool" {
                "yes".into()
            } else {
                m.target.describe(&m.unit)
            };
            let status = if m.pass { "✅ PASS" } else { "❌ FAIL" };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                r.name, m.name, target, actual, status
            );
        }
        if r.metrics.is_empty() {
            let _ = writeln!(
                out,
                "| {} | (no metrics) | | | {} |",
                r.name,
                if r.pass { "✅ PASS" } else { "❌ FAIL" }
            );
        }
    }
    for r in reports.iter().filter(|r| !r.pass) {
        let _ = writeln!(out, "\n{} FAILED:", r.name);
        for f in &r.failures {
            let _ = writeln!(out, "  - {f}");
        }
    }
    let passed = reports.iter().filter(|r| r.pass).count();
    let _ = writeln!(
        out,
        "\ne2e: {passed} passed, {} failed",
        reports.len() - passed
    );
    out
}

pub fn write_json(path: &Path, reports: &[ScenarioReport]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let doc = serde_json::json!({
        "generated_at": chrono::Utc::now().to_rfc3339(),
        "machine": machine(),
        "scenarios": reports,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    serde_json::json!({ "cpus": cpus, "memory_gib": mem_kib as f64 / 1024.0 / 1024.0 })
}
