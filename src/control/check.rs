//! The check behind `iotfwd check`: would the daemon start on this config and these rules, and
//! what would fail once it runs?
//!
//! [`check`] loads the config file (or takes the embedded default), reads the PEM files its TLS
//! sections name, and loads every rule file of the rules directory the way the daemon does, and returns a [`CheckReport`]: every problem with
//! its file and line (all of them, not the first), the warnings about what loads but would fail
//! at run time, and what loaded. It prints nothing, so the CLI, the API or the console can each
//! show the same report their own way.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::outcome::Code;
use crate::rules::{ActionSpec, Compiler, Rule, RuleError};

/// What [`check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// The config file checked; `None` for the embedded default.
    pub config_file: Option<PathBuf>,
    /// The rules directory checked: the one asked for, else the config's `rules.dir` (the
    /// built-in default's when the config file did not load).
    pub rules_dir: PathBuf,
    /// Every problem of the config file, then of the rule files. Any problem fails the check;
    /// a rule file with problems is not loaded, as the daemon would not load it.
    pub problems: Vec<Problem>,
    /// What loads but would fail at run time. Looked for only when the config loaded: without
    /// it, which consumer groups exist is unknown.
    pub warnings: Vec<Warning>,
    /// The names of the rules that loaded, in file name order.
    pub rules: Vec<String>,
}

impl CheckReport {
    /// Whether the daemon would start on this config and these rules: no problem at all.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One problem: in the config file or in a rule file, each with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Config(ConfigError),
    Rule(RuleError),
}

impl Problem {
    /// The file the problem is in, when known (a config error may have none).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Problem::Config(e) => e.file.as_deref(),
            Problem::Rule(e) => Some(&e.file),
        }
    }

    /// The 1-based line of the problem, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Problem::Config(e) => e.line,
            Problem::Rule(e) => e.line,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Config(e) => e.fmt(f),
            Problem::Rule(e) => e.fmt(f),
        }
    }
}

/// Something that loads but would fail once the daemon runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warning {
    /// A rule's action or error action forwards to a consumer group that is not a `[[group]]`
    /// of the config: every such forward would end in 9325.
    UnknownGroup {
        rule: String,
        file: PathBuf,
        group: String,
    },
    /// A `[[http.token]]` whose value cannot be read here (its env variable is not set, its
    /// file is missing or too short): `iotfwd run` in the same environment would refuse to
    /// start. A warning, not a problem: the check may run where the secrets are not.
    TokenUnreadable(String),
    /// A PEM file a TLS section names does not exist here: `iotfwd run` in the same place would
    /// not start. A warning for the same reason: the file may be a secret mounted only where
    /// the daemon runs.
    TlsFileMissing(ConfigError),
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::UnknownGroup { file, group, .. } => write!(
                f,
                "{}: group {group:?} is not a [[group]] of the config; its forwards will fail with {}",
                file.display(),
                Code::DestinationUnavailable
            ),
            Warning::TokenUnreadable(why) => write!(
                f,
                "{why}; `iotfwd run` here would not start (fine if the token exists only where it runs)"
            ),
            Warning::TlsFileMissing(e) => write!(
                f,
                "{e}; `iotfwd run` here would not start (fine if the file exists only where it runs)"
            ),
        }
    }
}

/// Checks the config file `config_file` (`None`: the embedded default) and the rule files of
/// `rules_dir` (`None`: the config's `rules.dir`). A config file that does not load is reported
/// and the rules are still checked, against the built-in defaults, so one run shows every
/// problem.
pub fn check(config_file: Option<&Path>, rules_dir: Option<&Path>) -> CheckReport {
    let mut problems = Vec::new();
    let mut tls_missing = Vec::new();
    let config = match config_file {
        None => Some(Config::embedded_default()),
        Some(path) => match Config::load(path) {
            Ok(config) => {
                // The PEM files of the TLS sections must parse (and a key fit its
                // certificate): `iotfwd run` reads them before it starts. One that is missing
                // here is a warning: it may exist only where the daemon runs.
                let text = std::fs::read_to_string(path).ok();
                let of = |missing: bool| {
                    config.check_tls_files(text.as_deref(), Some(path), |section| {
                        (crate::tls::check_section(section).into_iter())
                            .filter(|p| p.missing == missing)
                            .map(|p| (p.key, p.message))
                            .collect()
                    })
                };
                problems.extend(of(false).into_iter().map(Problem::Config));
                tls_missing.extend(of(true).into_iter().map(Warning::TlsFileMissing));
                Some(config)
            }
            Err(errors) => {
                problems.extend(errors.into_iter().map(Problem::Config));
                None
            }
        },
    };
    let fallback = Config::default();
    let settings = config.as_ref().unwrap_or(&fallback);
    let rules_dir = rules_dir.map_or_else(|| settings.rules.dir.clone(), Path::to_path_buf);
    let compiler = Compiler::new(settings.engine.max_variants_per_rule);
    let (rules, errors) = compiler.load_dir(&rules_dir);
    problems.extend(errors.into_iter().map(Problem::Rule));
    let warnings = match &config {
        Some(config) => {
            let mut warnings = unknown_groups(config, &rules);
            warnings.extend(unreadable_tokens(config));
            warnings.extend(tls_missing);
            warnings
        }
        None => Vec::new(),
    };
    CheckReport {
        config_file: config_file.map(Path::to_path_buf),
        rules_dir,
        problems,
        warnings,
        rules: rules.into_iter().map(|r| r.name).collect(),
    }
}

/// Each `[[http.token]]` whose value cannot be read in this environment.
fn unreadable_tokens(config: &Config) -> Vec<Warning> {
    (config.http.token.iter().enumerate())
        .filter_map(|(i, t)| t.secret(i).err())
        .map(Warning::TokenUnreadable)
        .collect()
}

/// A group action (or error action) naming no `[[group]]` would end in 9325 at run time.
fn unknown_groups(config: &Config, rules: &[Rule]) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for rule in rules {
        for action in rule.actions.iter().chain(rule.error_action.as_ref()) {
            if let ActionSpec::Group(g) = action
                && config.group(&g.group).is_none()
            {
                warnings.push(Warning::UnknownGroup {
                    rule: rule.name.clone(),
                    file: rule.file.clone(),
                    group: g.group.clone(),
                });
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO_GROUPS: &str = "sql = '''SELECT * FROM \"/p1/+/post\"'''\n\
        [[action]]\nto = \"group\"\ngroup = \"nosuch\"\n\
        [error_action]\nto = \"group\"\ngroup = \"demo\"\n";

    #[test]
    fn a_group_action_naming_no_group_is_a_warning_not_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("to_groups.toml"), TO_GROUPS).unwrap();
        // The embedded default hosts group `demo` only.
        let report = check(None, Some(dir.path()));
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!(report.rules, ["to_groups"]);
        assert_eq!(
            report.warnings,
            [Warning::UnknownGroup {
                rule: "to_groups".into(),
                file: dir.path().join("to_groups.toml"),
                group: "nosuch".into(),
            }]
        );
        assert!(
            report.warnings[0]
                .to_string()
                .ends_with("group \"nosuch\" is not a [[group]] of the config; its forwards will fail with 9325"),
            "{}",
            report.warnings[0]
        );
    }

    #[test]
    fn a_config_file_has_only_its_own_groups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/to_groups.toml"), TO_GROUPS).unwrap();
        let file = dir.path().join("iotfwd.toml");
        std::fs::write(
            &file,
            format!("[rules]\ndir = {:?}\n", dir.path().join("rules")),
        )
        .unwrap();
        let report = check(Some(&file), None);
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!(report.config_file.as_deref(), Some(file.as_path()));
        assert_eq!(report.rules_dir, dir.path().join("rules"));
        let groups: Vec<&str> = report
            .warnings
            .iter()
            .filter_map(|w| match w {
                Warning::UnknownGroup { group, .. } => Some(group.as_str()),
                Warning::TokenUnreadable(_) | Warning::TlsFileMissing(_) => None,
            })
            .collect();
        assert_eq!(groups, ["nosuch", "demo"]);
    }

    #[test]
    fn config_and_rule_problems_come_together_with_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(rules.join("to_groups.toml"), TO_GROUPS).unwrap();
        std::fs::write(rules.join("broken.toml"), "sql = 'SELECT FROM'\n").unwrap();
        let file = dir.path().join("iotfwd.toml");
        std::fs::write(&file, "[engine]\nbatch_max_messages = 0\n").unwrap();
        let report = check(Some(&file), Some(&rules));
        assert!(!report.passed());
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert!(matches!(report.problems[0], Problem::Config(_)));
        assert_eq!(report.problems[0].file(), Some(file.as_path()));
        assert_eq!(report.problems[0].line(), Some(2));
        assert!(matches!(&report.problems[1], Problem::Rule(e) if e.code == Code::SqlError));
        assert_eq!(
            report.problems[1].file(),
            Some(rules.join("broken.toml").as_path())
        );
        // The rule that loads is still reported; without a config, groups are unknown.
        assert_eq!(report.rules, ["to_groups"]);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }

    #[test]
    fn an_unreadable_rules_directory_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let report = check(None, Some(&dir.path().join("missing")));
        assert!(!report.passed());
        assert_eq!(report.problems.len(), 1);
        assert!(report.rules.is_empty());
    }
}
