//! `iotfwd consume`: a consumer-group client for debugging and demos.

use std::process::ExitCode;

use super::ConsumeArgs;
use super::support::{Runtime, block_on};
use crate::client::{Consumer, ConsumerOptions, describe};
use crate::config::Config;
use crate::subscription::auth::SignMethod;

/// How each message is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    Accept,
    Release,
    Reject,
    None,
}

impl Settle {
    /// From the flags --release, --reject and --no-ack (clap lets one through at most).
    fn from_flags(args: &ConsumeArgs) -> Settle {
        if args.release {
            Settle::Release
        } else if args.reject {
            Settle::Reject
        } else if args.no_ack {
            Settle::None
        } else {
            Settle::Accept
        }
    }
}

/// The AccessKey id and secret: from the flags, else from the group in the config.
fn credentials(args: &ConsumeArgs) -> Result<(String, String), String> {
    if let (Some(id), Some(secret)) = (&args.access_key_id, &args.secret) {
        return Ok((id.clone(), secret.clone()));
    }
    let config = match &args.config {
        None => Config::embedded_default(),
        Some(p) => Config::load(p).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?,
    };
    let Some(group) = config.group(&args.group) else {
        let known: Vec<&str> = config.group.iter().map(|g| g.id.as_str()).collect();
        return Err(format!(
            "no consumer group {:?} in {} (groups: {}); pass --access-key-id and --secret to connect anyway",
            args.group,
            args.config
                .as_ref()
                .map_or("the embedded default".to_owned(), |p| p
                    .display()
                    .to_string()),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
    };
    let mut group = group.clone();
    // The daemon creates a missing secret file; a client must not invent one.
    group.create_secret = false;
    let secret = match &args.secret {
        Some(s) => s.clone(),
        None => group.secret().map_err(|e| {
            format!(
                "{e} (is the daemon running? it creates the embedded default's secret on start)"
            )
        })?,
    };
    Ok((
        args.access_key_id
            .clone()
            .unwrap_or(group.access_key_id.clone()),
        secret,
    ))
}

pub(super) fn run(args: ConsumeArgs) -> ExitCode {
    let settle = Settle::from_flags(&args);
    let (access_key_id, secret) = match credentials(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let sign_method = match args.sign_method.as_str() {
        "hmacsha1" => SignMethod::HmacSha1,
        "hmacsha256" => SignMethod::HmacSha256,
        other => {
            eprintln!("error: --sign-method {other:?} is not hmacsha1 or hmacsha256");
            return ExitCode::from(2);
        }
    };
    let mut options = ConsumerOptions::new(&args.url, &args.group, &access_key_id, &secret);
    options.sign_method = sign_method;
    options.idle_timeout_ms = args.idle_timeout_ms;
    options.ca = args.ca_file.clone();
    if let Some(id) = &args.client_id {
        options.client_id = id.clone();
    }
    block_on(Runtime::CurrentThread, async move {
        let mut consumer = match Consumer::connect(&options).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "error: cannot consume group {:?} at {}: {e:#}",
                    options.group, options.url
                );
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "consuming group {:?} at {} as {} ({:?} each message; Ctrl-C to stop)",
            options.group, options.url, options.client_id, settle
        );
        let mut received = 0u64;
        loop {
            let delivery = tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                d = consumer.receiver.recv() => d,
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: the endpoint closed the link: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", describe(&delivery));
            let settled = match settle {
                Settle::Accept => consumer.receiver.accept(&delivery).await,
                Settle::Release => consumer.receiver.release(&delivery).await,
                Settle::Reject => consumer.receiver.reject(&delivery, None).await,
                Settle::None => Ok(()),
            };
            if let Err(e) = settled {
                eprintln!("error: cannot settle: {e}");
                return ExitCode::FAILURE;
            }
            received += 1;
            if args.count.is_some_and(|n| received >= n) {
                break;
            }
        }
        consumer.close().await;
        eprintln!("{received} message(s)");
        ExitCode::SUCCESS
    })
}
