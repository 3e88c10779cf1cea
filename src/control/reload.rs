//! Hot reload of rules.
//!
//! The [`Reloader`] owns the rules directory's state: for each rule file, the text the running
//! version of its rule was compiled from, and, when the file's current text does not load, that
//! failure. A reload ([`Reloader::reload`]) rescans the directory and compares texts:
//!
//! - a new file that loads is **added**; a file whose text changed and loads is **changed**;
//! - a file whose text changed and does not load is **failed**: it gets one outcome record
//!   (`ruleengine`, operation = the rule name, usually 9307), an entry in `/api/v1/health`, and
//!   the **previous version of its rule keeps running**;
//! - a file that is gone is **removed**, and its rule with it;
//! - an unchanged file keeps the very same compiled rule (`Arc<Rule>`), so its compiled variants
//!   are kept and nothing about it is reset.
//!
//! When the running set changes, the new [`RuleSet`] is published on a `watch` channel. The
//! engine picks it up between two batches ([`crate::engine::Engine::refresh`]), so a batch runs
//! under one version; a message evaluated under the old version holds the `Arc<Rule>` it
//! matched and finishes its actions with it. Metrics are keyed by rule name and are never reset.
//!
//! Triggers ([`spawn`]): a change in the directory (notify, debounced by [`DEBOUNCE`]; only
//! events about `*.toml` files, or Kubernetes' `..data` swap of a mounted ConfigMap, count),
//! SIGHUP, and `POST /api/v1/rules/reload`. All of them call [`Reloader::reload`]; reloads run
//! one at a time.
//!
//! The config file. When the daemon runs with `--config`, SIGHUP and the reload API (not
//! directory changes) also re-read that file ([`ConfigFile`]). A file that does not load changes
//! nothing: each problem is logged at ERROR with its line and column and the reload's result is
//! `failure`, as is every reload after it (rules-only ones included) until the file loads again;
//! meanwhile `/api/v1/health` is `degraded` and shows the failure under `config`. A file that loads applies its quotas (`[[tenant]]`, `[[instance]]`, `[quota]`) at
//! once through [`Limiter::update`] (unchanged tenants, instances and device classes keep their
//! buckets); every other top-level section that differs from what runs is named in a WARN line
//! and in the reload's `config.restartNeeded`, and applies at the next restart. Each consumer
//! group's secret is read again from its `secret_env` or `secret_file`; a changed one is
//! swapped in for new logins (`config.secretsRotated`), an unreadable one keeps the running
//! secret and fails the reload.
//!
//! Metrics: `iotfwd_rules_reload_total{result}` counts reloads after start (`failure` when some
//! rule file, or the config file, does not load after it), `iotfwd_rules_last_reload_success`
//! and `iotfwd_rules_last_reload_timestamp_seconds` describe the last load, start included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};

use super::health::{ConfigReload, Health, LastReload, RuleFileFailure};
use crate::config::Config;
use crate::config::quota::QuotaSet;
use crate::limits::Limiter;
use crate::outcome::{Code, Outcomes, Record};
use crate::rules::{Compiler, Rule, RuleError, RuleSet};

/// How long the directory must be quiet before a change triggers a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// What started a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Startup,
    /// A change in the rules directory.
    Watch,
    Signal,
    /// `POST /api/v1/rules/reload`.
    Api,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Startup => "startup",
            Cause::Watch => "watch",
            Cause::Signal => "SIGHUP",
            Cause::Api => "api",
        }
    }
}

/// The running version of a file's rule and the text it came from.
#[derive(Clone)]
struct Running {
    text: String,
    rule: Arc<Rule>,
}

/// The file's current text does not load.
#[derive(Clone)]
struct Failed {
    /// `None` when the file could not be read (then every reload tries again and reports).
    text: Option<String>,
    failure: RuleFileFailure,
}

#[derive(Clone, Default)]
struct FileState {
    running: Option<Running>,
    failed: Option<Failed>,
}

/// The directory as of the last reload, by file path (the order rules run in).
#[derive(Clone, Default)]
struct Files {
    by_path: BTreeMap<PathBuf, FileState>,
    /// The directory itself could not be read at the last reload.
    dir_failure: Option<RuleFileFailure>,
}

impl Files {
    fn rule_set(&self) -> RuleSet {
        RuleSet::from_shared(
            self.by_path
                .values()
                .filter_map(|f| f.running.as_ref().map(|r| Arc::clone(&r.rule)))
                .collect(),
        )
    }

    fn failures(&self) -> Vec<RuleFileFailure> {
        self.dir_failure
            .iter()
            .cloned()
            .chain(
                self.by_path
                    .values()
                    .filter_map(|f| f.failed.as_ref().map(|f| f.failure.clone())),
            )
            .collect()
    }
}

/// The result of rescanning the directory.
struct Scan {
    files: Files,
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
    unchanged: usize,
    /// Failures first seen in this scan: each gets a record.
    new_failures: Vec<RuleFileFailure>,
}

/// Loads the rules directory and reloads it on demand. See the module docs.
pub struct Reloader {
    dir: PathBuf,
    compiler: Arc<Compiler>,
    outcomes: Outcomes,
    health: Arc<Health>,
    publish: watch::Sender<Arc<RuleSet>>,
    /// Held for the whole of a reload, so reloads run one at a time.
    files: Mutex<Files>,
    /// The config file, re-read on SIGHUP and the API (set by [`Reloader::follow_config`]).
    config: std::sync::OnceLock<ConfigFile>,
}

/// The config file the daemon started with, and what of it runs now.
pub struct ConfigFile {
    path: PathBuf,
    limiter: Limiter,
    /// The consumer groups, whose secrets are re-read.
    groups: Option<Arc<crate::subscription::Hub>>,
    /// The start-up config with the quotas of the last good reload.
    running: std::sync::Mutex<Config>,
}

impl ConfigFile {
    /// Re-reads the file; applies its quotas when it loads. See the module docs.
    async fn reload(&self) -> ConfigReload {
        let file = self.path.display().to_string();
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| {
                vec![format!(
                    "{file}: internal error while reading the config: {e}"
                )]
            })
            .and_then(|r| r.map_err(|errors| errors.iter().map(ToString::to_string).collect()));
        let new = match loaded {
            Ok(new) => new,
            Err(errors) => {
                for e in &errors {
                    tracing::error!(config = %file, "config not reloaded, the running config stays: {e}");
                }
                return ConfigReload {
                    file,
                    result: "failure",
                    errors,
                    quotas_changed: false,
                    restart_needed: Vec::new(),
                    secrets_rotated: Vec::new(),
                };
            }
        };
        let (secrets_rotated, secret_errors) = match &self.groups {
            Some(hub) => hub.reload_secrets(),
            None => Default::default(),
        };
        for group in &secrets_rotated {
            tracing::info!(config = %file, group = %group, "consumer group secret rotated: new logins need the new secret");
        }
        for e in &secret_errors {
            tracing::error!(config = %file, "consumer group secret not reloaded: {e}");
        }
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let quotas = QuotaSet::from(&new);
        let quotas_changed = quotas != QuotaSet::from(&*running);
        if quotas_changed {
            self.limiter.update(&quotas);
            running.tenant = new.tenant.clone();
            running.instance = new.instance.clone();
            running.quota = new.quota.clone();
            tracing::info!(
                config = %file,
                tenants = new.tenant.len(),
                instances = new.instance.len(),
                "quotas reloaded"
            );
        }
        let restart_needed = differing_sections(&running, &new);
        if !restart_needed.is_empty() {
            tracing::warn!(
                config = %file,
                sections = %restart_needed.join(","),
                "config changes that apply at the next restart (only [[tenant]], [[instance]], [quota] and group secrets reload)"
            );
        }
        ConfigReload {
            file,
            result: if secret_errors.is_empty() {
                "success"
            } else {
                "failure"
            },
            errors: secret_errors,
            quotas_changed,
            restart_needed,
            secrets_rotated,
        }
    }
}

/// The top-level sections of `b` that differ from `a`, in name order.
fn differing_sections(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

impl Reloader {
    /// Loads `dir` for the first time (cause `startup`): a file that does not load gets its
    /// record and health entry like on any reload.
    pub async fn start(
        compiler: Arc<Compiler>,
        dir: &Path,
        outcomes: Outcomes,
        health: Arc<Health>,
    ) -> Arc<Reloader> {
        let (publish, _) = watch::channel(Arc::new(RuleSet::new(Vec::new())));
        let reloader = Arc::new(Reloader {
            dir: dir.to_owned(),
            compiler,
            outcomes,
            health,
            publish,
            files: Mutex::new(Files::default()),
            config: std::sync::OnceLock::new(),
        });
        reloader.reload(Cause::Startup).await;
        reloader
    }

    /// From now on, SIGHUP and the reload API also re-read the config file at `path`, which
    /// `running` was loaded from, apply its quotas to `limiter` and re-read the secrets of
    /// `groups`. Once per reloader.
    pub fn follow_config(
        &self,
        path: &Path,
        running: Config,
        limiter: Limiter,
        groups: Option<Arc<crate::subscription::Hub>>,
    ) {
        let _ = self.config.set(ConfigFile {
            path: path.to_owned(),
            limiter,
            groups,
            running: std::sync::Mutex::new(running),
        });
    }

    /// The rule set running now.
    pub fn current(&self) -> Arc<RuleSet> {
        Arc::clone(&self.publish.borrow())
    }

    /// Every rule set published from now on (the current one counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.publish.subscribe()
    }

    /// The rule files that do not load, as of the last reload.
    pub fn failed(&self) -> Vec<RuleFileFailure> {
        self.health.failed_rules()
    }

    /// Rescans the directory and swaps in what changed. Returns what it did. Waits for a reload
    /// already running.
    pub async fn reload(&self, cause: Cause) -> LastReload {
        let mut files = self.files.lock().await;
        // The config file first: a reload of the rules the operator asked for by signal or API
        // is also a reload of the quotas. Directory changes concern the rules only.
        let config = match (cause, self.config.get()) {
            (Cause::Signal | Cause::Api, Some(file)) => Some(file.reload().await),
            _ => None,
        };
        let previous = files.clone();
        let dir = self.dir.clone();
        let compiler = Arc::clone(&self.compiler);
        let scan = tokio::task::spawn_blocking(move || scan(&previous, &dir, &compiler))
            .await
            .unwrap_or_else(|e| {
                // A panic while compiling: keep everything as it was and say so.
                let mut files = files.clone();
                let failure = RuleFileFailure {
                    file: self.dir.display().to_string(),
                    rule: String::new(),
                    code: Code::Internal,
                    reason: format!("internal error while loading the rules: {e}"),
                    time_ms: crate::message::now_ms(),
                    previous_running: true,
                };
                files.dir_failure = Some(failure.clone());
                Scan {
                    files,
                    added: Vec::new(),
                    changed: Vec::new(),
                    removed: Vec::new(),
                    unchanged: 0,
                    new_failures: vec![failure],
                }
            });
        *files = scan.files;
        let metrics = self.outcomes.metrics();
        let swapped =
            !(scan.added.is_empty() && scan.changed.is_empty() && scan.removed.is_empty());
        let next = (swapped || cause == Cause::Startup).then(|| Arc::new(files.rule_set()));
        let loaded = next
            .as_ref()
            .map_or_else(|| self.publish.borrow().len(), |set| set.len());
        for name in &scan.removed {
            let _ = metrics.rule_variants.remove_label_values(&[name]);
        }
        for failure in &scan.new_failures {
            tracing::error!(
                code = failure.code.as_u16(),
                file = %failure.file,
                previous_running = failure.previous_running,
                "rule not loaded: {}",
                failure.reason
            );
            self.outcomes.record(failure_record(failure)).await;
        }
        let failures = files.failures();
        let now = crate::message::now_ms();
        // A config file that did not load at the last pass still fails a rules-only reload:
        // what runs is not what is on disk until it is fixed.
        let config_failed = match &config {
            Some(c) => c.result != "success",
            None => self
                .health
                .config_reload()
                .is_some_and(|c| c.result != "success"),
        };
        let result = if failures.is_empty() && !config_failed {
            "success"
        } else {
            "failure"
        };
        let last = LastReload {
            time_ms: now,
            cause: cause.as_str(),
            result,
            added: scan.added,
            changed: scan.changed,
            removed: scan.removed,
            failed: failures
                .iter()
                .map(|f| {
                    if f.rule.is_empty() {
                        f.file.clone()
                    } else {
                        f.rule.clone()
                    }
                })
                .collect(),
            unchanged: scan.unchanged,
            loaded,
            config,
        };
        metrics.rules_loaded.set(loaded as i64);
        if cause != Cause::Startup {
            metrics.rules_reload.with_label_values(&[result]).inc();
        }
        metrics
            .rules_last_reload_success
            .set(i64::from(result == "success"));
        metrics.rules_last_reload_timestamp.set(now as f64 / 1000.0);
        self.health.set_rules(loaded, failures, last.clone());
        // Published last, so whoever sees the new rules also sees the records, health and
        // metrics of the reload that made them.
        if let Some(set) = next {
            self.publish.send_replace(set);
        }
        drop(files);
        let quiet = cause == Cause::Watch && !swapped && scan.new_failures.is_empty();
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        if quiet {
            tracing::debug!(cause = cause.as_str(), "rules reloaded: nothing changed");
        } else {
            tracing::info!(
                cause = cause.as_str(),
                result,
                loaded,
                added = %list(&last.added),
                changed = %list(&last.changed),
                removed = %list(&last.removed),
                failed = %list(&last.failed),
                unchanged = last.unchanged,
                "rules reloaded"
            );
        }
        last
    }
}

/// The outcome record of a rule file that does not load.
/// The record of a rule file that does not load: the code the rule compiler gave it (9307,
/// 9321) or 9399 for a panic while loading.
fn failure_record(f: &RuleFileFailure) -> Record {
    Record::rule_file_failed(
        &f.rule,
        &f.file,
        f.code,
        &f.reason,
        f.previous_running,
        f.time_ms,
    )
}

/// One line per problem of a file, positions first.
fn describe(errors: &[RuleError]) -> String {
    errors
        .iter()
        .map(|e| match (e.line, e.column) {
            (Some(l), Some(c)) => format!("line {l}, column {c}: {}", e.message),
            (Some(l), None) => format!("line {l}: {}", e.message),
            _ => e.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Rescans `dir` against the state of the last reload. Blocking: reads files and compiles.
fn scan(previous: &Files, dir: &Path, compiler: &Compiler) -> Scan {
    let now = crate::message::now_ms();
    let mut out = Scan {
        files: Files::default(),
        added: Vec::new(),
        changed: Vec::new(),
        removed: Vec::new(),
        unchanged: 0,
        new_failures: Vec::new(),
    };
    let paths = match crate::rules::rule_files(dir) {
        Ok(paths) => paths,
        Err(e) => {
            // Keep running what runs; report the directory.
            let failure = RuleFileFailure {
                file: dir.display().to_string(),
                rule: String::new(),
                code: e.code,
                reason: e.message,
                time_ms: now,
                previous_running: previous.by_path.values().any(|f| f.running.is_some()),
            };
            if previous.dir_failure.as_ref().map(|f| &f.reason) != Some(&failure.reason) {
                out.new_failures.push(failure.clone());
            }
            out.files = previous.clone();
            out.files.dir_failure = Some(failure);
            return out;
        }
    };
    for path in paths {
        let prev = previous.by_path.get(&path).cloned().unwrap_or_default();
        let name = crate::rules::rule_name(&path);
        let text = crate::rules::read_rule_file(&path);
        let mut state = FileState {
            running: prev.running.clone(),
            failed: None,
        };
        let label = name.clone().unwrap_or_default();
        let compiled = match (&name, &text) {
            (Ok(_), Ok(text)) if prev.running.as_ref().is_some_and(|r| &r.text == text) => {
                out.unchanged += 1;
                None
            }
            (Ok(_), Ok(text))
                if prev
                    .failed
                    .as_ref()
                    .is_some_and(|f| f.text.as_ref() == Some(text)) =>
            {
                // Still the text that failed last time: still failed, already reported.
                state.failed = prev.failed.clone();
                None
            }
            (Ok(name), Ok(text)) => Some(
                compiler
                    .compile_text(name, &path, text)
                    .map(|rule| (text.clone(), rule)),
            ),
            (Err(e), _) | (_, Err(e)) => Some(Err(vec![e.clone()])),
        };
        match compiled {
            None => {}
            Some(Ok((text, rule))) => {
                if prev.running.is_some() {
                    out.changed.push(rule.name.clone());
                } else {
                    out.added.push(rule.name.clone());
                }
                state.running = Some(Running {
                    text,
                    rule: Arc::new(rule),
                });
            }
            Some(Err(errors)) => {
                let failure = RuleFileFailure {
                    file: path.display().to_string(),
                    rule: label,
                    code: errors.first().map_or(Code::SqlError, |e| e.code),
                    reason: describe(&errors),
                    time_ms: now,
                    previous_running: state.running.is_some(),
                };
                out.new_failures.push(failure.clone());
                state.failed = Some(Failed {
                    text: text.ok(),
                    failure,
                });
            }
        }
        out.files.by_path.insert(path, state);
    }
    for (path, state) in &previous.by_path {
        if !out.files.by_path.contains_key(path)
            && let Some(running) = &state.running
        {
            out.removed.push(running.rule.name.clone());
        }
    }
    out
}

/// Starts the reload triggers: the directory watcher (when `watch`), SIGHUP, until `stop`
/// turns true. Returns the task's handle.
pub fn spawn(
    reloader: Arc<Reloader>,
    watch: bool,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let watcher = if watch {
        match watch_dir(&reloader.dir, changed_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    dir = %reloader.dir.display(),
                    "cannot watch the rules directory ({e}); reload with SIGHUP or POST /api/v1/rules/reload"
                );
                None
            }
        }
    } else {
        None
    };
    // Registered before the task starts, so a SIGHUP sent once the daemon answers is handled.
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}); rules reload on changes only");
            None
        }
    };
    tokio::spawn(async move {
        // Dropping the watcher stops it.
        let _watcher = watcher;
        loop {
            #[cfg(unix)]
            let hup = async {
                match &mut hangup {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
                Some(()) = changed.recv() => {
                    reloader.reload(Cause::Watch).await;
                }
                Some(()) = hup => {
                    reloader.reload(Cause::Signal).await;
                }
            }
        }
    })
}

type Watcher = notify_debouncer_full::Debouncer<
    notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// Watches `dir` (not its subdirectories); each quiet period after a relevant change sends one
/// `()` (coalesced while a reload is pending).
fn watch_dir(dir: &Path, changed: mpsc::Sender<()>) -> notify::Result<Watcher> {
    use notify::EventKind;
    let mut debouncer = notify_debouncer_full::new_debouncer(
        DEBOUNCE,
        None,
        move |result: notify_debouncer_full::DebounceEventResult| match result {
            Ok(events) => {
                let relevant = events.iter().any(|e| {
                    !matches!(e.kind, EventKind::Access(_))
                        && e.paths.iter().any(|p| is_rule_path(p))
                });
                if relevant {
                    let _ = changed.try_send(());
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!("watching the rules directory: {e}");
                }
                let _ = changed.try_send(());
            }
        },
    )?;
    debouncer.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}

/// A rule file, or Kubernetes' `..data` link of a mounted ConfigMap (swapped on update).
fn is_rule_path(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "toml")
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."))
}
