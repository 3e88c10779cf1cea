//! Robustness of the config loader (docs/security.md, "Robustness"): mutations of the example
//! configs (the production example in deploy/ and the TOML blocks of docs/) load, or are
//! refused with every problem placed at a line of the file, the way `iotfwd check` prints them.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::Config;
use crate::robustness;

/// Tokens the mutations insert: TOML's punctuation and literals at their edges, and section
/// headers.
const TOML_VOCABULARY: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    ",",
    "{",
    "}",
    "#",
    "\n",
    ".",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e3",
    "nan",
    "inf",
    "0x10",
    "0o7",
    "1979-05-27T07:32:00Z",
    "\"\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:99999\"",
    "\"0.0.0.0:8080\"",
    "\"amqp://h:1/%2f\"",
    "\"mqtts://h\"",
    "\"redis://\"",
    "[http]",
    "[broker]",
    "[mqtt]",
    "[redis]",
    "[quota]",
    "[quota.device]",
    "[[tenant]]",
    "[[instance]]",
    "[[group]]",
    "[[http.token]]",
    "[subscription]",
    "[subscription.tls]",
    "[source.amqp]",
    "[source.mqtt]",
    "[store]",
    "[engine]",
    "é",
    "\t",
    " ",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The configs to mutate: the production example, the embedded default written out, and the
/// ```toml blocks of docs/ (some are rule files: mutated, they are configs gone wrong too).
fn seeds() -> Vec<String> {
    let mut seeds = vec![
        std::fs::read_to_string(repo().join("deploy/iotfwd.toml")).unwrap(),
        toml::to_string(&Config::embedded_default()).unwrap(),
    ];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    for doc in docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for block in text.split("```toml\n").skip(1) {
            if let Some((toml, _)) = block.split_once("```") {
                seeds.push(toml.to_owned());
            }
        }
    }
    seeds
}

/// A config loads, and then validates alone, gives its listen address and MQTT broker, and
/// survives being written out and read back; or it is refused with problems that each say
/// what, in which file and at which line of it.
fn check(text: &str) -> Result<&'static str, String> {
    let file = Path::new("iotfwd.toml");
    let errors = match Config::from_toml_str(text, Some(file)) {
        Ok(config) => {
            let problems = config.validate(None, None);
            if !problems.is_empty() {
                return Err(format!("loaded, yet without its text: {problems:?}"));
            }
            let _ = config.listen_addr();
            if let Some(mqtt) = &config.mqtt {
                mqtt.host_port()
                    .map_err(|e| format!("loaded with a bad [mqtt] url: {e}"))?;
            }
            let written = toml::to_string(&config).map_err(|e| format!("cannot write it: {e}"))?;
            return match Config::from_toml_str(&written, None) {
                Ok(back) if back == config => Ok("loaded"),
                Ok(back) => Err(format!("written and read back it is {back:?}")),
                Err(e) => Err(format!("written out it does not load: {e:?}\n{written}")),
            };
        }
        Err(errors) => errors,
    };
    if errors.is_empty() {
        return Err("refused without a problem".into());
    }
    let lines = text.lines().count() + 1;
    for e in &errors {
        let shown = e.to_string();
        if e.message.trim().is_empty() || e.file.as_deref() != Some(file) {
            return Err(format!("a problem without a message or file: {shown:?}"));
        }
        if !shown.starts_with("iotfwd.toml") {
            return Err(format!("printed as {shown:?}"));
        }
        if let Some(line) = e.line
            && (!(1..=lines).contains(&line) || e.column == Some(0))
        {
            return Err(format!("{shown:?}: line {line} is not in the file"));
        }
    }
    Ok("refused")
}

/// Robustness: mutated configs through the loader (docs/security.md, "Robustness").
#[test]
fn robustness_config_loader() {
    let seeds = seeds();
    assert!(seeds.len() >= 5, "the example configs are missing");
    let text = prop_oneof![
        12 => robustness::mutated_text(seeds, TOML_VOCABULARY),
        1 => robustness::text(),
    ];
    let seen = robustness::Seen::default();
    robustness::run("config-loader", 1500, text, |text| {
        seen.outcome(check(&text))
    });
    seen.print("config-loader");
}
