//! `iotfwd send`: posts one message to a running daemon's ingest route.

use std::process::ExitCode;

use super::SendArgs;
use super::support::{Runtime, block_on, payload_arg};
use crate::client::http;

pub(super) fn run(args: SendArgs) -> ExitCode {
    let payload = match payload_arg(&args.payload) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Send JSON payloads as JSON; anything else as base64, so binary payloads go through too.
    let envelope = match serde_json::from_slice::<serde_json::Value>(&payload) {
        Ok(value) => serde_json::json!({ "topic": args.topic, "payload": value }),
        Err(_) => {
            use base64::Engine as _;
            serde_json::json!({
                "topic": args.topic,
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&payload),
            })
        }
    };
    let endpoint = format!(
        "{}/api/v1/messages?verbose={}",
        args.url.trim_end_matches('/'),
        args.verbose
    );
    block_on(Runtime::CurrentThread, async {
        let url = match url::Url::parse(&endpoint) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("error: --url: {endpoint} is not a URL: {e}");
                return ExitCode::from(2);
            }
        };
        let call = http::Call {
            method: hyper::Method::POST,
            url: &url,
            json: Some(envelope.to_string().into_bytes()),
            token: args.token.as_deref(),
            ca_file: args.ca_file.as_deref(),
        };
        match http::call(call).await {
            Ok((status, body)) => {
                let pretty = serde_json::from_str::<serde_json::Value>(&body)
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or(body.clone()))
                    .unwrap_or(body);
                println!("{pretty}");
                if status.is_success() {
                    ExitCode::SUCCESS
                } else {
                    eprintln!("error: the daemon answered {status}");
                    if status == hyper::StatusCode::UNAUTHORIZED {
                        eprintln!(
                            "hint: the daemon asks for a token: pass --token or set IOTFWD_TOKEN"
                        );
                    }
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: cannot reach the daemon at {endpoint}: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
