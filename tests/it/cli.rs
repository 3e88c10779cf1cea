//! The command line, run as a user runs it: the real binary, real files.

use std::path::Path;
use std::process::{Command, Output};

fn iotfwd(args: &[&str], cwd: &Path) -> Output {
    Command::new(super::harness::daemon_binary())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run iotfwd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD_RULE: &str = r#"
description = "hot"
sql = '''
SELECT deviceName() AS device, items.t.value AS t
FROM "/p1/+/thing/event/property/post"
WHERE items.t.value > 38
'''
"#;

#[test]
fn check_reports_every_broken_rule_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.toml"), GOOD_RULE).unwrap();
    // A syntax error on the SQL's third line (line 5 of the file).
    std::fs::write(
        dir.path().join("broken_sql.toml"),
        "description = \"x\"\nsql = '''\nSELECT a\nFROM \"/p/+/x\"\nWHERE a > > 3\n'''\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("unknown_fn.toml"),
        "sql = 'SELECT nosuchfn(a) FROM \"/p/d/x\"'\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad_toml.toml"),
        "sql = \"SELECT a FROM \\\"/p/+/x\\\"\"\nbogus = 1\n",
    )
    .unwrap();
    let out = iotfwd(
        &["check", "--rules", dir.path().to_str().unwrap()],
        dir.path(),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "check must fail: {err}");
    assert!(
        err.contains("broken_sql.toml:5:"),
        "line of the SQL error: {err}"
    );
    assert!(err.contains("unknown_fn.toml"), "{err}");
    assert!(
        err.contains("bad_toml.toml:2"),
        "unknown key with its line: {err}"
    );
    assert!(err.contains("[9307]"), "{err}");
    assert!(err.contains("3 problem(s); 1 rule(s)"), "{err}");
}

#[test]
fn check_reports_config_and_rule_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/r.toml"), "sql = 'SELECT FROM'\n").unwrap();
    std::fs::write(
        dir.path().join("iotfwd.toml"),
        "[http]\nlisten = \"nope\"\n[engine]\nbatch_max_messages = 0\n",
    )
    .unwrap();
    let out = iotfwd(&["check", "--config", "iotfwd.toml"], dir.path());
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("iotfwd.toml:2"), "{err}");
    assert!(err.contains("http.listen"), "{err}");
    assert!(err.contains("engine.batch_max_messages"), "{err}");
    assert!(err.contains("r.toml"), "{err}");
}

#[test]
fn check_passes_on_the_shipped_rules() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = iotfwd(&["check"], repo);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
    assert!(stdout.starts_with("ok:"), "{stdout}");
}

/// A rule forwarding to group `nosuch` (no config has it), with error action to `demo` (the
/// embedded default's group).
const TO_GROUPS: &str = r#"
sql = '''SELECT * FROM "/p1/+/post"'''
[[action]]
to = "group"
group = "nosuch"
[error_action]
to = "group"
group = "demo"
"#;

#[test]
fn check_warns_about_a_group_action_naming_no_group() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/good.toml"), GOOD_RULE).unwrap();
    std::fs::write(dir.path().join("rules/to_groups.toml"), TO_GROUPS).unwrap();
    let warning = |group: &str| {
        format!(
            "warning: rules/to_groups.toml: group {group:?} is not a [[group]] of the config; \
             its forwards will fail with 9325\n"
        )
    };

    // The embedded default hosts `demo`: one warning, and the check passes.
    let out = iotfwd(&["check", "--rules", "rules"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok: embedded default config, 2 rule(s) in rules (good, to_groups)\n"
    );
    assert_eq!(text(&out.stderr), warning("nosuch"));

    // A config file hosts only its own [[group]]s: none here.
    std::fs::write(dir.path().join("iotfwd.toml"), "").unwrap();
    let out = iotfwd(
        &["check", "--config", "iotfwd.toml", "--rules", "rules"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok: iotfwd.toml, 2 rule(s) in rules (good, to_groups)\n"
    );
    assert_eq!(
        text(&out.stderr),
        format!("{}{}", warning("nosuch"), warning("demo"))
    );

    // A failing check lists its problems only, and exits 1.
    std::fs::write(dir.path().join("rules/bad.toml"), "sql = 'SELECT FROM'\n").unwrap();
    let out = iotfwd(&["check", "--rules", "rules"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    let err = text(&out.stderr);
    assert!(err.starts_with("error: rules/bad.toml:1"), "{err}");
    assert!(
        err.ends_with("\n1 problem(s); 2 rule(s) in rules loaded\n"),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn rules_test_prints_the_output_or_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rule = dir.path().join("hot.toml");
    std::fs::write(&rule, GOOD_RULE).unwrap();
    let rule = rule.to_str().unwrap();
    let topic = "/p1/dev9/thing/event/property/post";

    let out = iotfwd(
        &[
            "rules",
            "test",
            rule,
            "--topic",
            topic,
            "--payload",
            r#"{"items":{"t":{"value":40}}}"#,
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"device\":\"dev9\",\"t\":40}\n");

    // WHERE false: nothing on stdout, the reason on stderr, exit 0.
    let out = iotfwd(
        &[
            "rules",
            "test",
            rule,
            "--topic",
            topic,
            "--payload",
            r#"{"items":{"t":{"value":1}}}"#,
        ],
        dir.path(),
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("WHERE is false or NULL"),
        "{}",
        text(&out.stderr)
    );

    // Topic mismatch.
    let out = iotfwd(
        &[
            "rules",
            "test",
            rule,
            "--topic",
            "/p2/d/x",
            "--payload",
            "{}",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("does not match"),
        "{}",
        text(&out.stderr)
    );

    // Payload from a file, and a bad payload: 9320, non-zero.
    std::fs::write(dir.path().join("p.json"), "not json").unwrap();
    let out = iotfwd(
        &[
            "rules",
            "test",
            rule,
            "--topic",
            topic,
            "--payload",
            "@p.json",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("9320"), "{}", text(&out.stderr));

    // A bad rule: 9307, non-zero.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "sql = 'SELECT a FROM \"/p1/+/x\" WHERE'\n").unwrap();
    let out = iotfwd(
        &[
            "rules",
            "test",
            bad.to_str().unwrap(),
            "--topic",
            topic,
            "--payload",
            "{}",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("9307"), "{}", text(&out.stderr));
}

#[test]
fn codes_prints_the_catalog_and_one_code() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = iotfwd(&["codes"], here);
    assert!(out.status.success());
    let all = text(&out.stdout);
    for code in [
        "1903", "9203", "9307", "9320", "9324", "9325", "9326", "9600", "9650", "9652",
    ] {
        assert!(all.contains(code), "catalog lists {code}");
    }
    let out = iotfwd(&["codes", "9307"], here);
    assert!(out.status.success());
    let one = text(&out.stdout);
    assert!(one.contains("Troubleshooting"), "{one}");
    assert!(one.contains("iotfwd check"), "{one}");
    let out = iotfwd(&["codes", "1234"], here);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown code 1234"));
}

#[test]
fn run_starts_nothing_on_a_config_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("iotfwd.toml"),
        "[engine]\nbatch_max_messages = 0\n",
    )
    .unwrap();
    for args in [
        &["run", "--config", "iotfwd.toml"][..],
        &["bench", "logs", "--config", "iotfwd.toml"],
        &["bench", "pipeline", "--config", "iotfwd.toml"],
        &["bench", "ingest", "--config", "iotfwd.toml"],
    ] {
        let out = iotfwd(args, dir.path());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
        assert!(
            err.starts_with("error: iotfwd.toml:2:"),
            "{args:?}, the problem with its line: {err}"
        );
        assert!(
            err.ends_with("\n1 problem(s) in the config; nothing started\n"),
            "{args:?}: {err}"
        );
    }
    // The data directory the config would have used was never created.
    assert!(!dir.path().join("data").exists());
}

#[test]
fn codes_exits_2_for_an_unknown_code() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = iotfwd(&["codes", "1234"], here);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("known codes: 200, 1903,"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn send_and_rules_test_exit_2_when_the_payload_file_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hot.toml"), GOOD_RULE).unwrap();
    for args in [
        &[
            "send",
            "--topic",
            "/p1/d/post",
            "--payload",
            "@missing.json",
        ][..],
        &[
            "rules",
            "test",
            "hot.toml",
            "--topic",
            "/p1/d/post",
            "--payload",
            "@missing.json",
        ],
    ] {
        let out = iotfwd(args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).starts_with("error: cannot read payload file missing.json: "),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn send_exits_1_when_no_daemon_answers() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 (tcpmux) is reserved and nothing on a test machine listens there.
    let url = "http://127.0.0.1:1".to_owned();
    let out = iotfwd(
        &[
            "send",
            "--topic",
            "/p1/d/post",
            "--payload",
            "{}",
            "--url",
            &url,
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the daemon at {url}/api/v1/messages?verbose=true: "
        )),
        "{err}"
    );
}

#[test]
fn consume_exits_2_without_credentials_or_with_an_unknown_sign_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = iotfwd(&["consume", "--group", "nosuch"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: no consumer group \"nosuch\" in the embedded default (groups: demo); pass \
         --access-key-id and --secret to connect anyway\n"
    );
    let out = iotfwd(
        &[
            "consume",
            "--group",
            "g1",
            "--access-key-id",
            "ak",
            "--secret",
            "s",
            "--sign-method",
            "md5",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: --sign-method \"md5\" is not hmacsha1 or hmacsha256\n"
    );
}

/// `iotfwd send` to a daemon, `iotfwd consume` from its consumer group: the binaries against
/// the real daemon, the consumer's credentials found in the daemon's config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_posts_to_the_daemon_and_consume_receives_from_its_group() {
    use std::io::BufRead as _;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    std::fs::create_dir(root.join("rules")).unwrap();
    std::fs::write(
        root.join("rules/to_g1.toml"),
        "sql = '''SELECT deviceName() AS device, t FROM \"/p1/+/post\"'''\n\
         [[action]]\nto = \"group\"\ngroup = \"g1\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("rules/all.toml"),
        "sql = '''SELECT * FROM \"/p2/+/post\"'''\n",
    )
    .unwrap();
    std::fs::write(root.join("g1.secret"), "cli-test-secret\n").unwrap();
    let config = root.join("iotfwd.toml");
    std::fs::write(
        &config,
        format!(
            "[rules]\ndir = {rules:?}\n[data]\ndir = {data:?}\n[engine]\nbatch_max_wait_ms = 1\n\
             [subscription]\nlisten = \"127.0.0.1:0\"\n\
             [[group]]\nid = \"g1\"\naccess_key_id = \"ak-g1\"\nsecret_file = {secret:?}\n",
            rules = root.join("rules"),
            data = root.join("data"),
            secret = root.join("g1.secret"),
        ),
    )
    .unwrap();
    let daemon = super::harness::Daemon::start_from_file(&config).await;
    daemon.wait_ready().await;
    let amqp = format!("amqp://{}", daemon.amqp.expect("the endpoint listens"));
    let base = daemon.base.clone();

    let mut consumer = Command::new(super::harness::daemon_binary())
        .args(["consume", "--group", "g1", "--url", &amqp, "--count", "1"])
        .arg("--config")
        .arg(&config)
        .current_dir(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run iotfwd consume");
    let stderr = consumer.stderr.take().unwrap();
    let (first, mut stderr) = tokio::task::spawn_blocking(move || {
        let mut stderr = std::io::BufReader::new(stderr);
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        (line, stderr)
    })
    .await
    .unwrap();
    assert!(
        first.starts_with("consuming group \"g1\" at amqp://127.0.0.1:"),
        "{first}"
    );

    let send = |args: Vec<String>| {
        let root = root.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            iotfwd(&args, &root)
        })
    };
    let args = |topic: &str, payload: &str, more: &[&str]| -> Vec<String> {
        [
            "send",
            "--topic",
            topic,
            "--payload",
            payload,
            "--url",
            &base,
        ]
        .iter()
        .chain(more)
        .map(|s| s.to_string())
        .collect()
    };

    // A JSON payload: the answer (pretty JSON) holds the rule's output; the group gets it.
    let out = send(args("/p1/dev7/post", r#"{"t":21}"#, &[]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(text(&out.stdout).contains("\n  \"accepted\": 1,"), "pretty");
    assert_eq!(
        answer["messages"][0]["rules"][0]["output"],
        serde_json::json!({"device": "dev7", "t": 21}),
        "{answer}"
    );
    let consumed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let status = consumer.wait().unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut consumer.stdout.take().unwrap(), &mut out).unwrap();
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
            (status, out, rest)
        }),
    )
    .await
    .expect("consume stops after --count 1")
    .unwrap();
    let (status, out, rest) = consumed;
    assert_eq!(status.code(), Some(0), "{rest}");
    assert_eq!(rest, "1 message(s)\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        line["body"],
        serde_json::json!({"device": "dev7", "t": 21}),
        "{line}"
    );

    // Not JSON: sent as payload_base64, so the daemon takes it (200) and the rule sees the
    // very bytes, which are no JSON (9320).
    let out = send(args("/p2/dev7/post", "not json", &[])).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["messages"][0]["code"], 200, "{answer}");
    let rule = &answer["messages"][0]["rules"][0];
    assert_eq!(rule["code"], 9320, "{answer}");
    assert!(
        rule["reason"]
            .as_str()
            .unwrap()
            .starts_with("payload is not valid JSON: expected ident at line 1 column 2"),
        "{answer}"
    );

    // --verbose false: the result without the output.
    let out = send(args("/p1/dev7/post", r#"{"t":1}"#, &["--verbose", "false"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["messages"][0]["rules"][0]["result"], "passed");
    assert!(
        answer["messages"][0]["rules"][0].get("output").is_none(),
        "{answer}"
    );

    // A topic not of the platform's form is the daemon's answer (1903), not a failed send.
    let out = send(args("nope", "{}", &[])).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["messages"][0]["code"], 1903, "{answer}");

    daemon.stop().await;
}

/// Every command and option says what it does; --help points at docs/ pages (and sections)
/// that exist, never at the README sections that moved there.
#[test]
fn help_explains_every_command_and_points_at_docs_that_exist() {
    use clap::CommandFactory;

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut root = iotfwd::cli::Cli::command();
    root.build();
    let mut commands = vec![("iotfwd".to_owned(), root)];
    let mut seen = 0;
    while let Some((name, mut command)) = commands.pop() {
        seen += 1;
        assert!(command.get_about().is_some(), "{name}: no description");
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "{name} --{id}: no help");
        }
        // Whitespace folded: a section name may wrap.
        let help = command.render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(!help.contains("README"), "{name} --help: {help}");
        for (start, _) in help.match_indices("docs/") {
            let rest = &help[start..];
            let end = rest.find(".md").unwrap_or_else(|| panic!("{name}: {rest}")) + 3;
            let page = &rest[..end];
            let text = std::fs::read_to_string(repo.join(page))
                .unwrap_or_else(|e| panic!("{name} --help names {page}: {e}"));
            // `docs/x.md, "Section"` names a heading of that page.
            if let Some(quoted) = rest[end..].strip_prefix(", \"") {
                let section = &quoted[..quoted.find('"').unwrap()];
                assert!(
                    text.lines()
                        .any(|l| l.trim_start_matches('#').trim() == section && l.starts_with('#')),
                    "{name} --help: {page} has no section {section:?}"
                );
            }
        }
        for sub in command.get_subcommands() {
            if sub.get_name() != "help" {
                commands.push((format!("{name} {}", sub.get_name()), sub.clone()));
            }
        }
    }
    assert!(seen >= 15, "every command was looked at: {seen}");
}

/// `bench ingest` runs end to end on a small load and prints every figure it promises: each
/// client count with the store on and off, each beside the engine's rate.
#[test]
fn bench_ingest_prints_each_rate_beside_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let out = iotfwd(
        &[
            "bench",
            "ingest",
            "--messages",
            "2000",
            "--per-request",
            "500",
            "--clients",
            "1,2",
        ],
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("engine baseline:"), "{stdout}");
    for clients in ["1", "2"] {
        for store in ["on ", "off"] {
            let line = format!("{clients} client(s), store {store}:");
            let found = stdout
                .lines()
                .find(|l| l.starts_with(&line))
                .unwrap_or_else(|| panic!("no line {line:?} in:\n{stdout}"));
            assert!(found.contains("ratio to engine"), "{found}");
        }
        assert!(
            stdout.contains(&format!("{clients} client(s): ratio store on / off")),
            "{stdout}"
        );
    }
}

/// `bench engine --quotas --redis URL` runs end to end on a small load against the machine's
/// Redis and prints the shared buckets' rate, its Redis calls per forward, and the ratio to
/// the local buckets.
#[test]
fn bench_engine_quotas_on_redis_prints_the_ratio_to_local_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let out = iotfwd(
        &[
            "bench",
            "engine",
            "--quotas",
            "--redis",
            "redis://127.0.0.1:6379/0",
            "--messages",
            "2000",
            "--devices",
            "100",
        ],
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let shared = stdout
        .lines()
        .find(|l| l.starts_with("quotas on, buckets in Redis (lease 10, lease_rate_ms 100):"))
        .unwrap_or_else(|| panic!("no Redis line in:\n{stdout}"));
    assert!(shared.contains("(0 throttled;"), "{shared}");
    assert!(shared.contains("per forward)"), "{shared}");
    let ratio = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ratio Redis / local: "))
        .unwrap_or_else(|| panic!("no ratio line in:\n{stdout}"));
    let ratio: f64 = ratio.parse().unwrap_or_else(|e| panic!("{ratio:?}: {e}"));
    assert!(ratio > 0.0, "{ratio}");
}
