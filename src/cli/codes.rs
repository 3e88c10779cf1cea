//! `iotfwd codes`: the status code catalog.

use std::process::ExitCode;

use crate::outcome::{Code, codes};

pub(super) fn run(code: Option<u16>) -> ExitCode {
    match code {
        None => {
            print!("{}", codes::render_catalog());
            ExitCode::SUCCESS
        }
        Some(c) => match codes::lookup(c) {
            Some(info) => {
                print!("{}", codes::render_one(info));
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "error: unknown code {c}; known codes: {}",
                    Code::ALL
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::from(2)
            }
        },
    }
}
