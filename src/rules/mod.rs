//! Rules: rule files, the SQL dialect, its functions, compilation and the topic index.

pub mod action;
pub mod compile;
pub mod file;
pub mod functions;
mod load;
mod set;
pub mod sql;
pub mod template;
pub mod topic;

use std::fmt;
use std::path::{Path, PathBuf};

use datafusion::execution::context::{SessionContext, SessionState};

use crate::config::line_col;
use crate::outcome::Code;
pub use action::{ActionSpec, AmqpAction, GroupAction, MqttAction, MqttQos, RetryPolicy};
pub use compile::{Kind, Program};
pub use file::RuleFile;
pub use load::{read_rule_file, rule_files, rule_name};
pub use set::RuleSet;
use sql::Item;

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
    /// The rule file's `ordering`; `None` follows `engine.ordering`.
    pub ordering: Option<crate::config::Ordering>,
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
                ordering: doc.ordering,
            }),
            _ => Err(errors),
        }
    }
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
