//! The command line, run as a user runs it: the real binary, real files.

use std::path::Path;
use std::process::{Command, Output};

fn iotfwd(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotfwd"))
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
