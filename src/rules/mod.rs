//! Rules: rule files, the SQL dialect, its functions, compilation and the topic index.

pub mod action;
pub mod compile;
pub mod file;
pub mod functions;
pub mod sql;
pub mod template;
pub mod topic;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::execution::context::{SessionContext, SessionState};

use crate::config::line_col;
use crate::outcome::Code;
pub use action::{ActionSpec, AmqpAction, GroupAction, MqttAction, MqttQos, RetryPolicy};
pub use compile::{Kind, Program};
pub use file::RuleFile;
use sql::Item;
use topic::TopicIndex;

/// A loaded rule: its file, its compiled SQL and its actions.
pub struct Rule {
    /// The file's stem.
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    pub sql: String,
    pub enabled: bool,
    pub program: Program,
    pub actions: Vec<ActionSpec>,
    pub error_action: Option<ActionSpec>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish()
    }
}

/// One problem with a rule file, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// 9307 for SQL that does not parse or plan; 9321 for an invalid action parameter.
    pub code: Code,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": [{}] {}", self.code, self.message)
    }
}

/// Compiles rules. Holds the DataFusion session with the platform UDFs registered; one per
/// daemon, shared by loading and evaluation.
pub struct Compiler {
    state: SessionState,
    max_variants: usize,
}

impl Compiler {
    pub fn new(max_variants: usize) -> Compiler {
        let ctx = SessionContext::new();
        for udf in functions::all() {
            ctx.register_udf(udf);
        }
        Compiler {
            state: ctx.state(),
            max_variants,
        }
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Compiles a rule from the text of its file. Reports every problem found, not the first.
    pub fn compile_text(
        &self,
        name: &str,
        file: &Path,
        text: &str,
    ) -> Result<Rule, Vec<RuleError>> {
        let err =
            |line: Option<usize>, column: Option<usize>, code: Code, message: String| RuleError {
                file: file.to_owned(),
                line,
                column,
                code,
                message,
            };
        let doc: RuleFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unzip();
            vec![err(
                line,
                column,
                Code::SqlError,
                format!("invalid rule file: {}", e.message()),
            )]
        })?;
        let sql_span = doc.sql.span();
        let sql_text = doc.sql.into_inner();
        // Lines inside the SQL count from the line its string starts on ('''\n skips one).
        let (sql_line, _) = line_col(text, sql_span.start);
        let starts_with_newline = text[sql_span.clone()]
            .trim_start_matches(['\'', '"'])
            .starts_with('\n');
        let first_sql_line = if starts_with_newline {
            sql_line + 1
        } else {
            sql_line
        };
        let mut errors = Vec::new();
        let program = match sql::parse(&sql_text, name) {
            Err(e) => {
                let line = Some(e.line.map_or(sql_line, |l| first_sql_line + l - 1));
                errors.push(err(
                    line,
                    e.column,
                    Code::SqlError,
                    format!("SQL: {}", e.message),
                ));
                None
            }
            Ok(parsed) => match Program::new(parsed, &self.state, self.max_variants) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(err(
                        Some(sql_line),
                        None,
                        Code::SqlError,
                        format!("SQL: {e}"),
                    ));
                    None
                }
            },
        };
        if let Some(program) = &program {
            let outputs: Option<Vec<&str>> = output_keys(&program.parsed.items);
            let all_actions = doc
                .actions
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("action {}", i + 1), a))
                .chain(
                    doc.error_action
                        .iter()
                        .map(|a| ("error_action".to_owned(), a)),
                );
            for (label, action) in all_actions {
                for (field, template) in action.templates() {
                    let Some(outputs) = &outputs else { continue };
                    for key in template.keys() {
                        if !outputs.contains(&key)
                            && !outputs.iter().any(|o| key.starts_with(&format!("{o}.")))
                        {
                            errors.push(err(
                                None,
                                None,
                                Code::ParamInvalid,
                                format!(
                                    "{label}: {field} uses ${{{key}}}, which the SELECT does not \
                                     produce (it produces: {})",
                                    outputs.join(", ")
                                ),
                            ));
                        }
                    }
                }
                if let ActionSpec::Group(g) = action
                    && g.group.trim().is_empty()
                {
                    errors.push(err(
                        None,
                        None,
                        Code::ParamInvalid,
                        format!("{label}: group is empty"),
                    ));
                }
            }
        }
        match program {
            Some(program) if errors.is_empty() => Ok(Rule {
                name: name.to_owned(),
                file: file.to_owned(),
                description: doc.description,
                sql: sql_text,
                enabled: doc.enabled,
                program,
                actions: doc.actions,
                error_action: doc.error_action,
            }),
            _ => Err(errors),
        }
    }

    /// Loads one rule file; the rule is named by the file's stem.
    pub fn load_file(&self, path: &Path) -> Result<Rule, Vec<RuleError>> {
        let name = rule_name(path).map_err(|e| vec![e])?;
        let text = read_rule_file(path).map_err(|e| vec![e])?;
        self.compile_text(&name, path, &text)
    }

    /// Loads every `*.toml` file of `dir`, in name order. Returns the rules that loaded and every
    /// problem of the others; one bad file never stops the rest.
    pub fn load_dir(&self, dir: &Path) -> (Vec<Rule>, Vec<RuleError>) {
        let paths = match rule_files(dir) {
            Ok(paths) => paths,
            Err(e) => return (Vec::new(), vec![e]),
        };
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            match self.load_file(&path) {
                Ok(rule) => rules.push(rule),
                Err(e) => errors.extend(e),
            }
        }
        (rules, errors)
    }
}

/// A load problem of `file` with no position, code 9307.
fn file_error(file: &Path, message: String) -> RuleError {
    RuleError {
        file: file.to_owned(),
        line: None,
        column: None,
        code: Code::SqlError,
        message,
    }
}

/// The rule name of a rule file: its stem, which may use only letters, digits, `_`, `-` and `.`.
pub fn rule_name(path: &Path) -> Result<String, RuleError> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(file_error(
            path,
            format!(
                "rule name {name:?} (the file's stem) may use only letters, digits, '_', '-' and '.'"
            ),
        ));
    }
    Ok(name.to_owned())
}

/// The text of a rule file.
pub fn read_rule_file(path: &Path) -> Result<String, RuleError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// The rule files of `dir` (`*.toml`, regular files or links to them), in name order.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| file_error(dir, format!("cannot read the rules directory: {e}")))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths)
}

/// The output keys a rule produces, or None when `*` makes them depend on the payload.
fn output_keys(items: &[Item]) -> Option<Vec<&str>> {
    items
        .iter()
        .map(|i| match i {
            Item::Wildcard => None,
            Item::Path { key, .. } | Item::Expr { key, .. } => Some(key.as_str()),
        })
        .collect()
}

/// The enabled rules and their topic index. Immutable: a reload builds a new one and swaps it
/// in between batches, so a message is evaluated under exactly one version.
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
    index: TopicIndex<usize>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        RuleSet::from_shared(rules.into_iter().map(Arc::new).collect())
    }

    /// A rule set of rules that may also be in other versions of the set (a reload keeps the
    /// very same `Arc<Rule>` of every rule whose file did not change). Disabled rules are left
    /// out.
    pub fn from_shared(rules: Vec<Arc<Rule>>) -> RuleSet {
        let rules: Vec<Arc<Rule>> = rules.into_iter().filter(|r| r.enabled).collect();
        let mut index = TopicIndex::new();
        for (i, rule) in rules.iter().enumerate() {
            index.insert(&rule.program.parsed.filter, i);
        }
        RuleSet { rules, index }
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// The rule named `name`, if it is in this set.
    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| r.name == name)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The indexes (into [`Self::rules`]) of the rules whose topic filter matches `topic`.
    pub fn candidates_into(&self, topic: &str, out: &mut Vec<usize>) {
        self.index.matches_into(topic, out);
    }
}
