//! deploy/: the example config and rules pass `iotfwd check`; the systemd unit verifies; the
//! Prometheus config, alert rules and their unit tests pass promtool; a real scrape passes
//! `promtool check metrics`; the Grafana dashboard and the alerts only use metrics the daemon
//! exports; the Kubernetes manifests parse and agree with the config; the Dockerfile builds
//! what the config listens on.
//!
//! External tools (promtool, systemd-analyze, python3 with PyYAML): `scripts/test` installs
//! them. Under CI (`CI=true`) a check whose tool is missing fails; elsewhere it prints
//! `SKIPPED: ...` to stderr and the rest still runs on a bare machine.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use iotfwd::config::Config;
use serde_json::Value;

/// What the dashboard must show (issue 7, part 5).
const DASHBOARD_MUST_USE: &[&str] = &[
    "iotfwd_messages_received_total",
    "iotfwd_rule_matched_total",
    "iotfwd_rule_passed_total",
    "iotfwd_rule_no_result_total",
    "iotfwd_rule_failed_total",
    "iotfwd_action_executions_total",
    "iotfwd_action_success_total",
    "iotfwd_action_failed_total",
    "iotfwd_action_retries_total",
    "iotfwd_action_in_flight",
    "iotfwd_throttled_total",
    "iotfwd_batch_size_bucket",
    "iotfwd_batch_eval_seconds_bucket",
    "iotfwd_forward_latency_seconds_bucket",
    "iotfwd_group_connections",
    "iotfwd_group_backlog_messages",
    "iotfwd_group_outcomes_total",
    "iotfwd_broker_connected",
    "iotfwd_rules_loaded",
    "iotfwd_store_queue_records",
];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The example rules that deploy/ ships: every file of the repository's rules/ (the one copy)
/// but `demo_forward.toml`, the embedded default's demo.
fn shipped_rules() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    files(&dir, ".toml")
        .into_iter()
        .filter(|p| !p.ends_with("demo_forward.toml"))
        .collect()
}

/// A directory holding exactly `shipped_rules()`, as /etc/iotfwd/rules holds them.
fn shipped_rules_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for rule in shipped_rules() {
        std::fs::copy(&rule, dir.path().join(rule.file_name().unwrap())).unwrap();
    }
    dir
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn skipped(why: &str) {
    super::harness::tool_missing(why);
}

/// The executable `name` on PATH.
fn tool(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn promtool() -> Option<PathBuf> {
    let found = tool("promtool");
    if found.is_none() {
        skipped("promtool not installed (Debian package `prometheus`; scripts/test installs it)");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The files of `dir` whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// Every YAML document of `path`, as JSON, through python3's PyYAML; None (after a loud
/// SKIPPED) when python3 or PyYAML is missing.
fn yaml_docs(path: &Path) -> Option<Vec<Value>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        json.dump([d for d in yaml.safe_load_all(open(sys.argv[1], encoding='utf-8'))], sys.stdout)";
    let Some(python) = tool("python3") else {
        skipped("python3 not installed: YAML files not parsed");
        return None;
    };
    let probe = run(Command::new(&python).args(["-c", "import yaml"]));
    if !probe.status.success() {
        skipped("python3 has no PyYAML (`apt-get install python3-yaml`): YAML files not parsed");
        return None;
    }
    let out = run(Command::new(&python).arg("-c").arg(SCRIPT).arg(path));
    assert_ok(&format!("parsing {} as YAML", path.display()), &out);
    Some(serde_json::from_slice(&out.stdout).expect("python printed JSON"))
}

/// The example config, parsed the way `iotfwd run` parses it.
fn example_config() -> Config {
    let path = deploy().join("iotfwd.toml");
    Config::load(&path).unwrap_or_else(|errors| {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("{} is invalid:\n{}", path.display(), errors.join("\n"))
    })
}

/// Every environment variable a config file reads secrets from.
fn secret_env_vars(config: &Path) -> BTreeSet<String> {
    let doc: toml::Table = toml::from_str(&read(config)).unwrap();
    let mut vars = BTreeSet::new();
    fn walk(v: &toml::Value, vars: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    if k.ends_with("_env")
                        && let toml::Value::String(s) = v
                    {
                        vars.insert(s.clone());
                    }
                    walk(v, vars);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, vars)),
            _ => {}
        }
    }
    walk(&toml::Value::Table(doc), &mut vars);
    vars
}

fn port_of(listen: &str) -> u16 {
    listen
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{listen:?}: {e}"))
        .port()
}

/// Names that look like metrics (`iotfwd_...`) in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("iotfwd_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "iotfwd_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

// ---------------------------------------------------------------------------------------
// (a) iotfwd check

#[test]
fn every_deploy_config_passes_iotfwd_check() {
    let deploy = deploy();
    let shipped = shipped_rules_dir();
    let rules = shipped.path().to_owned();
    let rule_files = shipped_rules();
    assert!(rule_files.len() >= 2, "rules/ holds the example rules");
    // Every TOML config under deploy/.
    let mut configs = Vec::new();
    let mut dirs = vec![deploy.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "toml") {
                configs.push(path);
            }
        }
    }
    assert!(configs.contains(&deploy.join("iotfwd.toml")), "{configs:?}");
    for config in &configs {
        let out = run(Command::new(super::harness::daemon_binary())
            .arg("check")
            .arg("--config")
            .arg(config)
            .arg("--rules")
            .arg(&rules));
        assert_ok(&format!("iotfwd check --config {}", config.display()), &out);
        let summary = text(&out.stdout);
        assert!(
            summary.contains(&format!("{} rule(s)", rule_files.len())),
            "every rule file loaded: {summary}"
        );
    }

    // The check is real: one unknown key in the same file fails it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("iotfwd.toml");
    std::fs::write(
        &broken,
        format!("{}\nbogus_key = 1\n", read(&deploy.join("iotfwd.toml"))),
    )
    .unwrap();
    let out = run(Command::new(super::harness::daemon_binary())
        .arg("check")
        .arg("--config")
        .arg(&broken)
        .arg("--rules")
        .arg(&rules));
    assert!(!out.status.success(), "a broken copy must fail the check");
    assert!(
        text(&out.stderr).contains("bogus_key"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn example_config_is_a_production_config() {
    let c = example_config();
    assert!(c.broker.is_some(), "[broker]");
    let broker = c.broker.as_ref().unwrap();
    assert!(
        broker.password_env.is_some(),
        "broker password from the environment"
    );
    let url = url::Url::parse(&broker.url).unwrap();
    assert_eq!(url.password(), None, "no password in broker.url");
    assert!(c.source.amqp.is_some(), "[source.amqp]");
    assert!(!c.tenant.is_empty() && !c.instance.is_empty(), "quotas");
    assert!(c.subscription.tls.is_some(), "[subscription.tls]");
    assert!(c.group.len() >= 2, "consumer groups");
    assert!(c.store.enabled, "the log store");
    // Listening beyond loopback, the API asks for tokens, each read from the environment.
    assert!(!c.http.is_loopback() && !c.http.allow_anonymous);
    assert!(!c.http.token.is_empty(), "[[http.token]]");
    assert!(c.http.token.iter().all(|t| t.token_env.is_some()));
    // Every group a deploy rule forwards to is declared.
    for rule in shipped_rules() {
        let doc: toml::Table = toml::from_str(&read(&rule)).unwrap();
        let actions = doc
            .get("action")
            .and_then(|a| a.as_array())
            .cloned()
            .unwrap_or_default();
        for action in actions.iter().chain(doc.get("error_action")) {
            if action.get("to").and_then(|t| t.as_str()) == Some("group") {
                let id = action["group"].as_str().unwrap();
                assert!(
                    c.group(id).is_some(),
                    "{}: group {id:?} is not in deploy/iotfwd.toml",
                    rule.display()
                );
            }
        }
    }
    // Every product a rule reads is in an instance (unmapped = "refuse" would 9321 it).
    let products: BTreeSet<&str> = c
        .instance
        .iter()
        .flat_map(|i| i.products.iter().map(String::as_str))
        .collect();
    for rule in shipped_rules() {
        let sql = read(&rule);
        let from = sql.split("FROM \"/").nth(1).expect("FROM \"/pk/...\"");
        let product = from.split('/').next().unwrap();
        assert!(
            products.contains(product),
            "{}: product {product} in no [[instance]]",
            rule.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// systemd

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let path = deploy().join("systemd/iotfwd.service");
    let unit = read(&path);
    let mut directives: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line}"));
        directives
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    let one = |k: &str| -> &str {
        let v = directives.get(k).unwrap_or_else(|| panic!("{k}= missing"));
        v.last().unwrap()
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "iotfwd"),
        ("ConfigurationDirectory", "iotfwd"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(k), v, "{k}=");
    }
    assert!(
        directives["SystemCallFilter"]
            .iter()
            .any(|v| v == "@system-service"),
        "SystemCallFilter=@system-service"
    );
    assert!(
        one("ExecReload").contains("-HUP $MAINPID"),
        "reload is SIGHUP"
    );
    assert!(
        one("ExecStart").contains(" run --config "),
        "{}",
        one("ExecStart")
    );
    assert!(
        directives.contains_key("EnvironmentFile"),
        "secrets from an EnvironmentFile"
    );
    // Every secret variable of the config is documented for the EnvironmentFile.
    for var in secret_env_vars(&deploy().join("iotfwd.toml")) {
        assert!(
            unit.contains(&format!("{var}=")),
            "{var} is not in the unit's env file comment"
        );
    }
    // SIGKILL only after the config's grace period.
    let stop = one("TimeoutStopSec");
    let stop_ms: u64 = stop
        .strip_suffix('s')
        .expect("TimeoutStopSec in seconds (30s)")
        .parse::<u64>()
        .unwrap()
        * 1000;
    let c = example_config();
    assert!(
        stop_ms > c.shutdown.grace_ms,
        "TimeoutStopSec {stop} must exceed shutdown.grace_ms {}",
        c.shutdown.grace_ms
    );
    assert_eq!(
        c.data.dir,
        Path::new("/var/lib/iotfwd"),
        "data.dir is the StateDirectory"
    );

    let Some(analyze) = tool("systemd-analyze") else {
        skipped("systemd-analyze not installed: the unit is not verified");
        return;
    };
    // verify wants the executable to exist: point the unit at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("iotfwd.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/iotfwd",
            super::harness::daemon_binary().to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = run(Command::new(analyze).arg("verify").arg(&copy));
    // Unknown or malformed directives are only warnings: any line about our unit fails.
    let about_unit: Vec<String> = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|l| l.contains("iotfwd.service"))
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// (b), (d) promtool on the config, the rules and their unit tests

#[test]
fn prometheus_config_and_alerts_pass_promtool() {
    let dir = deploy().join("prometheus");
    // No metric label clashes with the target labels, so the scrape config needs no
    // relabelling.
    let prometheus_yml = read(&dir.join("prometheus.yml"));
    for word in [
        "metric_relabel_configs",
        "exported_instance",
        "honor_labels",
    ] {
        assert!(
            !prometheus_yml.contains(word),
            "prometheus.yml has {word}: iotfwd's labels need no relabelling"
        );
    }

    let Some(promtool) = promtool() else { return };
    for args in [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = run(Command::new(&promtool).args(args).current_dir(&dir));
        assert_ok(&format!("promtool {}", args.join(" ")), &out);
    }

    // The unit tests prove these alerts fire.
    if let Some(docs) = yaml_docs(&dir.join("alerts_test.yml")) {
        let firing: BTreeSet<&str> = docs[0]["tests"]
            .as_array()
            .expect("tests")
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|case| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
            .map(|case| case["alertname"].as_str().unwrap())
            .collect();
        for alert in [
            "IotfwdForwardFailureRatioHigh",
            "IotfwdDestinationUnavailable",
            "IotfwdThrottled",
            "IotfwdGroupBacklogGrowing",
            "IotfwdGroupAckTimeouts",
            "IotfwdRulesReloadFailed",
            "IotfwdRulesReloadFailures",
            "IotfwdBrokerDisconnected",
        ] {
            assert!(
                firing.contains(alert),
                "alerts_test.yml has no firing case for {alert}"
            );
        }
    }

    // promtool really tests: a test expecting an alert that cannot fire fails.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("alerts.yml"), tmp.path().join("alerts.yml")).unwrap();
    std::fs::write(
        tmp.path().join("t.yml"),
        "rule_files: [alerts.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - series: 'iotfwd_broker_connected{job=\"iotfwd\",instance=\"a:8080\"}'\n        values: '1x10'\n    alert_rule_test:\n      - eval_time: 5m\n        alertname: IotfwdBrokerDisconnected\n        exp_alerts:\n          - exp_labels: {severity: critical, job: iotfwd, instance: \"a:8080\"}\n",
    )
    .unwrap();
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "t.yml"])
        .current_dir(tmp.path()));
    assert!(
        !out.status.success(),
        "promtool test rules must fail on a wrong expectation"
    );
}

#[test]
fn every_alert_is_documented_with_a_runbook() {
    let Some(docs) = yaml_docs(&deploy().join("prometheus/alerts.yml")) else {
        return;
    };
    let runbooks = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"));
    // GitHub's anchors of docs/operations.md's headings.
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut alerts = 0;
    for group in docs[0]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            alerts += 1;
            let ann = &rule["annotations"];
            for key in ["summary", "description", "runbook"] {
                assert!(
                    ann[key].as_str().is_some_and(|s| !s.trim().is_empty()),
                    "{name}: annotation {key}"
                );
            }
            assert!(
                rule["labels"]["severity"].is_string(),
                "{name}: severity label"
            );
            let runbook = ann["runbook"].as_str().unwrap();
            let anchor = runbook
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{name}: runbook {runbook}"));
            assert_eq!(
                anchor,
                name.to_lowercase(),
                "{name}: runbook anchor is the alert's name"
            );
            assert!(
                anchors.contains(anchor),
                "{name}: docs/operations.md has no heading for #{anchor}"
            );
        }
    }
    assert!(alerts >= 7, "{alerts} alerts");
}

// ---------------------------------------------------------------------------------------
// A running daemon's scrape: (c) promtool check metrics, (e) the dashboard's metric names

/// Starts the daemon in-process on the deploy rules with quotas and consumer groups, posts
/// messages that make every kind of labelled series exist, and returns `/metrics`.
async fn scrape() -> String {
    let dir = tempfile::tempdir().unwrap();
    let shipped = shipped_rules_dir();
    let secret = dir.path().join("group.secret");
    let toml = format!(
        r#"
[rules]
dir = '{rules}'
[data]
dir = '{data}'
[engine]
batch_max_wait_ms = 1
[subscription]
listen = "127.0.0.1:0"
[[tenant]]
id = "acme"
forward_tps = 1
burst = 3
[[instance]]
id = "iot-acme-1"
tenant = "acme"
products = ["a1b2c3", "meterPK", "gwDoor01"]
{groups}
"#,
        rules = shipped.path().display(),
        data = dir.path().join("data").display(),
        groups = ["billing", "ops-dashboard", "security"]
            .map(|g| format!("[[group]]\nid = \"{g}\"\naccess_key_id = \"{g}\"\nsecret_file = '{}'\ncreate_secret = true\n", secret.display()))
            .join("\n"),
    );
    let config = Config::from_toml_str(&toml, None).unwrap_or_else(|e| panic!("{e:?}"));
    let listeners = iotfwd::daemon::Listeners::loopback(&config).await.unwrap();
    let base = format!("http://{}", listeners.http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(iotfwd::daemon::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let messages = [
        // passes: amqp actions fail (no broker), the second forward is throttled
        r#"{"topic":"/a1b2c3/s1/thing/event/property/post","payload":{"items":{"temperature":{"value":40.5,"time":1}}}}"#,
        r#"{"topic":"/a1b2c3/s2/thing/event/property/post","payload":{"items":{"temperature":{"value":41,"time":1}}}}"#,
        // no_result
        r#"{"topic":"/a1b2c3/s1/thing/event/property/post","payload":{"items":{"temperature":{"value":20,"time":1}}}}"#,
        // failed: 9320, the payload is not an object
        r#"{"topic":"/meterPK/m1/user/reading","payload":[1,2,3]}"#,
        r#"{"topic":"/gwDoor01/door7/thing/event/alarm","payload":{"params":{"state":"open","forced":true}}}"#,
        // 1903
        r#"{"topic":"nonsense","payload":{}}"#,
    ]
    .join("\n");
    let mut posted = false;
    for _ in 0..100 {
        match client
            .post(format!("{base}/api/v1/messages"))
            .body(messages.clone())
            .send()
            .await
        {
            Ok(r) => {
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                posted = true;
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert!(posted, "daemon did not answer");
    let scrape = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    scrape
}

/// Starts the daemon in-process with no rules, `[broker] url = broker` when given, and returns
/// `/metrics`: at once, or once `/readyz` answers 200 when `ready`.
async fn scrape_bare(broker: Option<&str>, ready: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let broker = broker
        .map(|url| format!("[broker]\nurl = \"{url}\"\nreconnect_max_delay_ms = 500\n"))
        .unwrap_or_default();
    let toml = format!(
        "[rules]\ndir = '{}'\n[data]\ndir = '{}'\n[subscription]\nlisten = \"127.0.0.1:0\"\n{broker}",
        rules.display(),
        dir.path().join("data").display(),
    );
    let config = Config::from_toml_str(&toml, None).unwrap_or_else(|e| panic!("{e:?}"));
    let listeners = iotfwd::daemon::Listeners::loopback(&config).await.unwrap();
    let base = format!("http://{}", listeners.http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(iotfwd::daemon::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let path = if ready { "readyz" } else { "healthz" };
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{base}/{path}")).send().await
            && r.status().is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "no 200 from /{path} within 10 s");
    let scrape = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    scrape
}

/// The value of the unlabelled series `name` in a scrape; None when it is not there.
fn unlabelled(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `iotfwd_broker_connected` exists only with a `[broker]`: a broker-less process exports no
/// such series (so IotfwdBrokerDisconnected cannot fire for it); with one it is 0 until the
/// broker is connected and 1 once it is (the real RabbitMQ at 127.0.0.1:5672).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_gauge_exists_only_with_a_broker() {
    let gauge = "iotfwd_broker_connected";

    let without = scrape_bare(None, true).await;
    assert!(
        !without.contains(gauge),
        "{gauge} in a broker-less scrape:\n{without}"
    );
    assert_eq!(
        unlabelled(&without, "iotfwd_rules_loaded"),
        Some(0.0),
        "a real scrape:\n{without}"
    );

    // Nothing listens on port 1: configured but never connected, so 0.
    let down = scrape_bare(Some("amqp://guest:guest@127.0.0.1:1/%2f"), false).await;
    assert_eq!(unlabelled(&down, gauge), Some(0.0), "{down}");
    assert!(down.contains(&format!("# TYPE {gauge} gauge")), "{down}");

    let up = scrape_bare(Some("amqp://guest:guest@127.0.0.1:5672/%2f"), true).await;
    assert_eq!(unlabelled(&up, gauge), Some(1.0), "{up}");
}

fn has_series(scrape: &str, name: &str, label: &str) -> bool {
    scrape
        .lines()
        .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_is_clean_on_a_real_scrape() {
    let scrape = scrape().await;
    // The labelled families are there, so the lint covers them.
    for (name, label) in [
        ("iotfwd_messages_received_total", "source=\"http\""),
        ("iotfwd_rule_matched_total", "rule=\"overheat_alert\""),
        ("iotfwd_rule_no_result_total", "rule=\"overheat_alert\""),
        ("iotfwd_rule_failed_total", "code=\"9320\""),
        ("iotfwd_action_executions_total", "action=\"amqp:alerts\""),
        ("iotfwd_action_failed_total", "code="),
        ("iotfwd_throttled_total", "scope=\"tenant\""),
        ("iotfwd_throttled_total", "iot_instance=\"iot-acme-1\""),
        ("iotfwd_outcomes_total", "code=\"1903\""),
        ("iotfwd_group_backlog_messages", "group=\"billing\""),
    ] {
        assert!(
            has_series(&scrape, name, label),
            "no {name}{{{label}}} in the scrape:\n{scrape}"
        );
    }
    // No series has a label Prometheus sets on every target (`job`, `instance`): it would
    // come out as `exported_job` / `exported_instance`.
    let clashing: Vec<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let Some((_, labels)) = l.split_once('{') else {
                return false;
            };
            let labels = labels.rsplit_once('}').map_or(labels, |(ls, _)| ls);
            labels
                .split(',')
                .any(|kv| matches!(kv.split('=').next(), Some("job" | "instance")))
        })
        .collect();
    assert!(
        clashing.is_empty(),
        "series labelled job or instance: {clashing:?}"
    );
    // A broker-less process has no broker gauge.
    assert!(!scrape.contains("iotfwd_broker_connected"), "{scrape}");
    let Some(promtool) = promtool() else { return };
    // The lint is real: a counter without _total and a bad HELP are reported.
    let problems = check_metrics(
        &promtool,
        "# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n",
    );
    assert!(
        problems.is_some(),
        "promtool check metrics must flag a counter without _total"
    );
    if let Some(problems) = check_metrics(&promtool, &scrape) {
        panic!("promtool check metrics:\n{problems}\n--- scrape:\n{scrape}");
    }
}

/// `promtool check metrics` on an exposition: None when clean, else what it reported.
fn check_metrics(promtool: &Path, exposition: &str) -> Option<String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (!out.status.success() || !problems.trim().is_empty())
        .then(|| format!("({}) {problems}", out.status))
}

/// The metric names declared in src/ (string literals `"iotfwd_..."`): a labelled family
/// only shows in a scrape once it has a series, and some need a broker or a consumer.
fn declared_in_src() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let src = read(&path);
                for rest in src.split("\"iotfwd_").skip(1) {
                    if let Some((tail, _)) = rest.split_once('"') {
                        let name = format!("iotfwd_{tail}");
                        if metric_names(&name).contains(&name) {
                            names.insert(name);
                        }
                    }
                }
            }
        }
    }
    names
}

/// Every metric name (with histogram suffixes) that a scrape shows or src/ declares.
fn known_metrics(scrape: &str) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = declared_in_src();
    for line in scrape.lines() {
        let name = match line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
        {
            Some(rest) => rest.split(' ').next().unwrap(),
            None if line.starts_with('#') => continue,
            None => line.split(['{', ' ']).next().unwrap(),
        };
        known.insert(name.to_owned());
    }
    // Histograms are used through their series.
    for name in known.clone() {
        for suffix in ["_bucket", "_sum", "_count"] {
            known.insert(format!("{name}{suffix}"));
        }
    }
    known
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let path = deploy().join("grafana/iotfwd-dashboard.json");
    let dash: Value = serde_json::from_str(&read(&path)).expect("the dashboard is valid JSON");

    // A datasource variable, and every panel and query uses it.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a Prometheus datasource variable named datasource"
    );
    let mut panels: Vec<&Value> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let mut ids = BTreeSet::new();
    let mut exprs: Vec<String> = Vec::new();
    for p in &panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {:?}",
            p["title"]
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {:?} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {:?}", p["title"]);
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {:?}",
                p["title"]
            );
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in vars {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in DASHBOARD_MUST_USE {
        assert!(used.contains(*name), "the dashboard does not show {name}");
    }

    let scrape = scrape().await;
    let known = known_metrics(&scrape);
    let unknown: Vec<&String> = used.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics iotfwd does not export: {unknown:?}"
    );

    let alerts = read(&deploy().join("prometheus/alerts.yml"));
    let in_alerts = metric_names(&alerts);
    let unknown: Vec<&String> = in_alerts.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml uses metrics iotfwd does not export: {unknown:?}"
    );
}

// ---------------------------------------------------------------------------------------
// (f) Kubernetes

#[test]
fn k8s_manifests_parse_and_agree_with_the_config() {
    let dir = deploy().join("k8s");
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for path in files(&dir, ".yaml") {
        let Some(docs) = yaml_docs(&path) else { return };
        assert!(!docs.is_empty(), "{}: no document", path.display());
        for doc in docs {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()))
                .to_owned();
            by_kind.entry(kind).or_default().push(doc);
        }
    }
    let c = example_config();
    let one = |kind: &str| -> &Value {
        let docs = by_kind.get(kind).unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(docs.len(), 1, "one {kind}");
        &docs[0]
    };

    // The kustomization lists every manifest but the Secret example.
    let kustomization = one("Kustomization");
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for path in files(&dir, ".yaml") {
        let name = path.file_name().unwrap().to_str().unwrap();
        if name != "kustomization.yaml" && name != "secret.example.yaml" {
            assert!(listed.contains(name), "kustomization.yaml misses {name}");
        }
    }

    // ConfigMaps: deploy/iotfwd.toml and the shipped rules of rules/, verbatim.
    let configmaps = &by_kind["ConfigMap"];
    let cm = |name: &str| -> &Value {
        configmaps
            .iter()
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ConfigMap {name}"))
    };
    assert_eq!(
        cm("iotfwd-config")["data"]["iotfwd.toml"].as_str(),
        Some(read(&deploy().join("iotfwd.toml")).as_str()),
        "configmap-config.yaml is not deploy/iotfwd.toml: regenerate it"
    );
    let rules_cm = cm("iotfwd-rules")["data"].as_object().unwrap();
    let rule_files = shipped_rules();
    assert_eq!(
        rules_cm.len(),
        rule_files.len(),
        "configmap-rules.yaml holds every rule file"
    );
    for path in rule_files {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            rules_cm.get(name).and_then(Value::as_str),
            Some(read(&path).as_str()),
            "configmap-rules.yaml: {name} differs from rules/{name}: regenerate it"
        );
    }

    // Deployment.
    let deployment = one("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0)
    );
    let grace_s = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace_s * 1000 > c.shutdown.grace_ms,
        "terminationGracePeriodSeconds must exceed shutdown.grace_ms"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let ctr = &containers[0];
    let sc = &ctr["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let ports: BTreeMap<&str, u64> = ctr["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports.get("http").copied(),
        Some(u64::from(port_of(&c.http.listen))),
        "http port = http.listen"
    );
    assert_eq!(
        ports.get("amqps").copied(),
        Some(u64::from(port_of(&c.subscription.listen))),
        "amqps = subscription.listen"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &ctr[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "http", "{probe} on the HTTP port");
    }
    // The volumes put everything where the config says.
    let mounts: BTreeMap<&str, &str> = ctr["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let volume_at = |path: &Path| -> &Value {
        let name = mounts
            .get(path.to_str().unwrap())
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
        volumes[name]
    };
    assert!(
        volume_at(&c.data.dir)["persistentVolumeClaim"].is_object()
            || volume_at(&c.data.dir)["emptyDir"].is_object(),
        "a data volume at data.dir"
    );
    assert_eq!(volume_at(&c.rules.dir)["configMap"]["name"], "iotfwd-rules");
    assert_eq!(
        volume_at(Path::new("/etc/iotfwd/iotfwd.toml"))["configMap"]["name"],
        "iotfwd-config"
    );
    // Every file of every TLS section ([http.tls], [subscription.tls], [broker.tls]) comes
    // from the TLS secret.
    let sections = c.tls_sections();
    assert!(
        sections.len() >= 3,
        "the example uses TLS on HTTP, the endpoint and the broker"
    );
    for (section, tls) in sections {
        for (key, file, _) in tls.files() {
            let items: BTreeSet<&str> = volume_at(file.parent().unwrap())["secret"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["path"].as_str().unwrap())
                .collect();
            assert!(
                items.contains(file.file_name().unwrap().to_str().unwrap()),
                "{section}.tls.{key} {} from the TLS secret",
                file.display()
            );
        }
    }
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            ctr[probe]["httpGet"]["scheme"], "HTTPS",
            "{probe} over HTTPS"
        );
    }
    let args: Vec<&str> = ctr["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/iotfwd/iotfwd.toml"]);

    // Secrets: every variable the config reads is in the Secret the pod takes its env from.
    let secret = one("Secret");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert!(
        ctr["envFrom"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["secretRef"]["name"] == secret_name)
    );
    for var in secret_env_vars(&deploy().join("iotfwd.toml")) {
        assert!(
            secret["stringData"][&var].is_string(),
            "the Secret example lacks {var}"
        );
    }

    // Service: http and amqps to the container's named ports.
    let service = one("Service");
    let svc_ports: BTreeMap<&str, (u64, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                (
                    p["port"].as_u64().unwrap(),
                    p["targetPort"].as_str().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(svc_ports.get("http"), Some(&(8080, "http")));
    assert_eq!(svc_ports.get("amqps"), Some(&(5671, "amqps")));
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

// ---------------------------------------------------------------------------------------
// Docker

#[test]
fn dockerfile_builds_and_runs_what_the_config_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = read(&deploy().join("Dockerfile"));
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let instr = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .collect()
    };
    let from = instr("FROM");
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(
        from[0].starts_with("rust:") && from[0].ends_with("-bookworm AS build"),
        "{}",
        from[0]
    );
    assert_eq!(from[1], "debian:bookworm-slim");
    // The builder's Rust is at least the crate's rust-version.
    let image_rust: Vec<u32> = from[0]["rust:".len()..]
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let manifest: toml::Table = toml::from_str(&read(&root.join("Cargo.toml"))).unwrap();
    let msrv: Vec<u32> = manifest["package"]["rust-version"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        image_rust >= msrv,
        "rust image {image_rust:?} older than rust-version {msrv:?}"
    );
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "a locked release build"
    );
    let user = instr("USER");
    assert_eq!(user.len(), 1);
    assert!(
        !user[0].starts_with('0') && !user[0].starts_with("root"),
        "non-root user: {}",
        user[0]
    );
    // Each COPY from the build context names something that exists.
    for copy in instr("COPY") {
        if copy.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = copy.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(root.join(src).exists(), "COPY {src}: not in the repository");
        }
    }
    // EXPOSE the ports the example config listens on.
    let c = example_config();
    let exposed: BTreeSet<u16> = instr("EXPOSE")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([port_of(&c.http.listen), port_of(&c.subscription.listen)])
    );
    // ENTRYPOINT + CMD run the daemon on the config the image ships.
    let exec = |s: &str| -> Vec<String> {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("exec form {s}: {e}"))
    };
    let mut argv = exec(instr("ENTRYPOINT")[0]);
    argv.extend(exec(instr("CMD")[0]));
    assert_eq!(
        argv,
        [
            "/usr/local/bin/iotfwd",
            "run",
            "--config",
            "/etc/iotfwd/iotfwd.toml"
        ]
    );
    assert!(dockerfile.contains("COPY deploy/iotfwd.toml /etc/iotfwd/iotfwd.toml"));

    let ignore = read(&root.join(".dockerignore"));
    let patterns: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for p in ["target/", "data/"] {
        assert!(patterns.contains(p), ".dockerignore must exclude {p}");
    }
}

/// deploy/k8s-cluster: a kustomize overlay of deploy/k8s with three replicas, a data volume per
/// pod, and a config (its ConfigMap verbatim) whose queues are quorum queues, quotas in Redis
/// and records in PostgreSQL, with the passwords from the environment only.
#[test]
fn k8s_cluster_overlay_is_three_replicas_on_shared_engines() {
    use iotfwd::config::broker::QueueType;
    use iotfwd::config::store::StoreBackend;
    let dir = deploy().join("k8s-cluster");
    let mut docs = BTreeMap::new();
    for path in files(&dir, ".yaml") {
        let Some(d) = yaml_docs(&path) else { return };
        assert_eq!(d.len(), 1, "{}", path.display());
        docs.insert(
            path.file_name().unwrap().to_str().unwrap().to_owned(),
            d.into_iter().next().unwrap(),
        );
    }
    let kustomization = &docs["kustomization.yaml"];
    assert_eq!(kustomization["resources"][0], "../k8s");
    let patches: BTreeSet<&str> = kustomization["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for name in docs
        .keys()
        .filter(|n| *n != "kustomization.yaml" && *n != "secret.example.yaml")
    {
        assert!(
            patches.contains(name.as_str()) || resources.contains(name.as_str()),
            "kustomization.yaml misses {name}"
        );
    }
    let deployment = &docs["deployment-patch.yaml"];
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let data = &deployment["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(data["name"], "data");
    assert!(data["persistentVolumeClaim"].is_null() && data["emptyDir"].is_object());
    assert_eq!(docs["pvc-delete.yaml"]["$patch"], "delete");

    let toml_path = dir.join("iotfwd.toml");
    assert_eq!(
        docs["configmap-config.yaml"]["data"]["iotfwd.toml"].as_str(),
        Some(read(&toml_path).as_str()),
        "configmap-config.yaml is not deploy/k8s-cluster/iotfwd.toml: regenerate it"
    );
    let c = Config::load(&toml_path).unwrap_or_else(|errors| {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("{} is invalid:\n{}", toml_path.display(), errors.join("\n"))
    });
    assert_eq!(
        c.source.amqp.as_ref().unwrap().queue_type,
        QueueType::Quorum
    );
    assert!(!c.group.is_empty());
    assert!(c.group.iter().all(|g| g.queue_type == QueueType::Quorum));
    let redis = c.redis.as_ref().expect("[redis]");
    assert!(redis.password_env.is_some() && !redis.url.contains('@'));
    assert_eq!(c.store.backend, StoreBackend::Postgres);
    assert!(c.store.password_env.is_some());
    let store_url = url::Url::parse(c.store.url.as_deref().expect("store.url")).unwrap();
    assert!(store_url.password().is_none(), "no password in store.url");
    assert!(redis.is_tls() && redis.tls.is_some(), "Redis over TLS");
    assert!(c.store.tls.is_some(), "PostgreSQL over TLS");

    // As many replicas as the quota fallback divides by; a drain takes one at a time.
    assert_eq!(
        c.quota.processes.map(u64::from),
        deployment["spec"]["replicas"].as_u64(),
        "[quota] processes = the Deployment's replicas"
    );
    let pdb = &docs["poddisruptionbudget.yaml"];
    assert!(
        pdb["spec"]["minAvailable"].as_u64().unwrap()
            < deployment["spec"]["replicas"].as_u64().unwrap()
    );
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "iotfwd"
    );

    // The config is deploy/iotfwd.toml plus the cluster's keys only, so the two cannot drift.
    let strip = |text: &str| -> toml::Table {
        let mut t: toml::Table = toml::from_str(text).unwrap();
        t.remove("redis");
        let mut remove = |table: &str, keys: &[&str]| {
            if let Some(toml::Value::Table(x)) = t.get_mut(table) {
                for key in keys {
                    x.remove(*key);
                }
            }
        };
        remove(
            "quota",
            &[
                "backend",
                "processes",
                "on_backend_down",
                "lease",
                "lease_ttl_ms",
            ],
        );
        // checkpoint_mib is SQLite's own.
        remove(
            "store",
            &["backend", "url", "password_env", "tls", "checkpoint_mib"],
        );
        if let Some(toml::Value::Table(src)) = t.get_mut("source")
            && let Some(toml::Value::Table(a)) = src.get_mut("amqp")
        {
            a.remove("queue_type");
        }
        if let Some(toml::Value::Array(groups)) = t.get_mut("group") {
            for g in groups.iter_mut() {
                if let toml::Value::Table(g) = g {
                    g.remove("queue_type");
                }
            }
        }
        t
    };
    assert_eq!(
        strip(&read(&toml_path)),
        strip(&read(&deploy().join("iotfwd.toml"))),
        "deploy/k8s-cluster/iotfwd.toml differs from deploy/iotfwd.toml in more than the \
         cluster's keys: bring the change to both"
    );

    // Every secret the cluster config reads is in its Secret example.
    let secret = &docs["secret.example.yaml"];
    let vars = secret_env_vars(&toml_path);
    assert!(vars.contains("IOTFWD_REDIS_PASSWORD") && vars.contains("IOTFWD_PG_PASSWORD"));
    for var in vars {
        assert!(
            secret["stringData"][&var].is_string(),
            "deploy/k8s-cluster/secret.example.yaml lacks {var}"
        );
    }
}
