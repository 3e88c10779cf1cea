//! `iotfwd check`: prints the [`crate::control::check`] report. Exit 1 on any problem.

use std::path::Path;
use std::process::ExitCode;

use crate::control::check::check;

pub(super) fn run(config_path: Option<&Path>, rules_dir: Option<&Path>) -> ExitCode {
    let report = check(config_path, rules_dir);
    if !report.passed() {
        for p in &report.problems {
            eprintln!("error: {p}");
        }
        eprintln!(
            "{} problem(s); {} rule(s) in {} loaded",
            report.problems.len(),
            report.rules.len(),
            report.rules_dir.display()
        );
        return ExitCode::FAILURE;
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let config_name = report
        .config_file
        .as_ref()
        .map_or("embedded default config".to_owned(), |p| {
            p.display().to_string()
        });
    println!(
        "ok: {config_name}, {} rule(s) in {} ({})",
        report.rules.len(),
        report.rules_dir.display(),
        report.rules.join(", ")
    );
    ExitCode::SUCCESS
}
