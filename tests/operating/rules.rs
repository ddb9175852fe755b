//! The alert rules are valid and their unit tests pass (promtool).

use super::*;

/// Runs `promtool ARGS…` in deploy/prometheus; panics with its output on
/// any failure.
fn promtool(promtool: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(promtool)
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let Some(bin) = tool("promtool") else { return };
    let checked = promtool(&bin, &["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&bin, &["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The shipped Prometheus config loads the rules (check config also
    // checks the rule files it names).
    let config = promtool(&bin, &["check", "config", "prometheus.yml"]);
    assert!(config.contains("alerts.yml"), "{config}");
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/alerts_test.yml")).unwrap();
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        // Every test case names its alert; a firing expectation follows
        // one of them with exp_labels.
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(!cases.is_empty(), "{name} has no unit test");
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "no unit test of {name} makes it fire"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "no unit test of {name} checks that it stays quiet"
        );
        let rule = rules
            .split("- alert: ")
            .find(|r| r.starts_with(name))
            .unwrap();
        for needed in [
            "for: ",
            "severity: ",
            "summary: ",
            "description: ",
            "runbook",
        ] {
            assert!(rule.contains(needed), "{name} has no {needed}");
        }
    }
}
