//! The operator assets in `deploy/components/{prometheus-rules,grafana-dashboards}`, as
//! the production overlay renders them: the alerts the issue asks for, each with a
//! runbook section in docs/operations.md; a dashboard that is valid JSON whose panels
//! all query something. (That every metric they name is really exported is checked
//! against live scrapes by the e2e scenario `observability`.)

use serde_json::Value;

use crate::deploy::{render, repo_root};

const ALERTS: [&str; 6] = [
    "StreamSpaceAgentOffline",
    "StreamSpaceCommandsWaiting",
    "StreamSpaceRedeliveriesHigh",
    "StreamSpaceCommandsQuarantined",
    "StreamSpaceDispatcherWithoutDatabase",
    "StreamSpaceLeasesExpiring",
];

#[test]
fn production_ships_the_alerts_with_runbooks_and_the_dashboard() {
    let objects = render(&repo_root().join("deploy/overlays/production"));
    let rules: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "PrometheusRule")
        .collect();
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    let alerts: Vec<&Value> = rules[0]["spec"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .collect();
    let names: Vec<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    assert_eq!(names, ALERTS);
    let runbook = std::fs::read_to_string(repo_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        let expr = alert["expr"].as_str().unwrap_or_default();
        assert!(expr.contains("streamspace_"), "{name}: {expr}");
        assert!(
            matches!(
                alert["labels"]["severity"].as_str(),
                Some("warning" | "critical")
            ),
            "{name}"
        );
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = name.to_lowercase();
        assert!(
            url.ends_with(&format!("docs/operations.md#{anchor}")),
            "{name}: {url}"
        );
        assert!(
            runbook.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no runbook section `### {name}`"
        );
    }

    let dashboards: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "streamspace-dashboards")
        .collect();
    assert_eq!(dashboards.len(), 1);
    assert_eq!(
        dashboards[0]["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    let json = dashboards[0]["data"]["streamspace.json"]
        .as_str()
        .expect("the dashboard file");
    let dashboard: Value = serde_json::from_str(json).expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {} queries nothing",
            panel["title"]
        );
        for t in targets {
            assert!(
                t["expr"]
                    .as_str()
                    .is_some_and(|e| e.contains("streamspace_") || e.contains("process_")),
                "panel {}: {t}",
                panel["title"]
            );
        }
    }
}
