//! Loading rules from disk: a rule file's name and text, the files of a rules directory, and
//! [`Compiler::load_file`] / [`Compiler::load_dir`] on top of [`Compiler::compile_text`].

use std::path::{Path, PathBuf};

use super::{Compiler, Rule, RuleError};
use crate::outcome::Code;

impl Compiler {
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
