//! `iotfwd rules test`: one message through one rule with the daemon's engine.

use std::process::ExitCode;
use std::sync::Arc;

use super::RuleTestArgs;
use super::support::payload_arg;
use crate::engine::{Engine, RuleOutcome};
use crate::message::{Identity, Message};
use crate::rules::{Compiler, RuleSet};

pub(super) fn test(args: RuleTestArgs) -> ExitCode {
    let payload = match payload_arg(&args.payload) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let compiler = Arc::new(Compiler::new(32));
    let mut rule = match compiler.load_file(&args.rule_file) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let rule_name = rule.name.clone();
    let message = match Message::new(
        args.topic,
        payload.into(),
        Identity {
            timestamp_ms: args.timestamp,
            ..Identity::default()
        },
    ) {
        Ok(m) => m,
        Err(rejection) => {
            eprintln!("error: {}", crate::outcome::Failure::rejected(&rejection));
            return ExitCode::FAILURE;
        }
    };
    // `rules test` runs a disabled rule too: the point is to try it before enabling it.
    rule.enabled = true;
    let engine = Engine::new(compiler, Arc::new(RuleSet::new(vec![rule])));
    let results = engine.evaluate(std::slice::from_ref(&message)).remove(0);
    let Some(result) = results.into_iter().next() else {
        eprintln!(
            "no match: topic {:?} does not match the rule's FROM filter {:?}",
            message.topic,
            engine.rules().rules()[0].program.parsed.filter.as_str()
        );
        return ExitCode::SUCCESS;
    };
    match result.outcome {
        RuleOutcome::Passed(output) => {
            println!("{}", serde_json::Value::Object(output));
            ExitCode::SUCCESS
        }
        RuleOutcome::NoResult => {
            eprintln!("no match: WHERE is false or NULL for this message (rule {rule_name})");
            ExitCode::SUCCESS
        }
        RuleOutcome::Failed(failure) => {
            let code = failure.code();
            eprintln!("error: {failure}");
            eprintln!("{}: {}", code, code.info().meaning);
            ExitCode::FAILURE
        }
    }
}
