//! The verdict on one message's trace: did it arrive, and if not, why. Computed here once, so
//! `iotfwd logs trace`, the HTTP API and the console say the same thing.

use serde::Serialize;

use super::{BizCode, Record};

/// What a message's records, in time order, add up to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// `failed` (some step failed), `not_forwarded` (received, and no rule forwarded it) or
    /// `delivered` (every step succeeded).
    pub status: &'static str,
    /// One sentence for a person.
    pub summary: String,
    /// How many steps failed.
    pub failed_steps: usize,
}

/// The verdict on a message's records (oldest first, as a trace query returns them). No
/// records: nothing is known of the message.
pub fn verdict(records: &[Record]) -> Verdict {
    let failures: Vec<&Record> = records.iter().filter(|r| !r.code.is_success()).collect();
    let forwarded = records
        .iter()
        .any(|r| r.biz_code != BizCode::Uplink && r.code.is_success());
    let only_uplink = records.iter().all(|r| r.biz_code == BizCode::Uplink);
    if records.is_empty() {
        Verdict {
            status: "unknown",
            summary: "no record of this message: it never reached iotfwd, or its records are \
                      older than the store's retention"
                .to_owned(),
            failed_steps: 0,
        }
    } else if !failures.is_empty() {
        let list: Vec<String> = failures
            .iter()
            .map(|r| format!("{} {} ({})", r.operation, r.code, r.code.info().name))
            .collect();
        Verdict {
            status: "failed",
            summary: format!(
                "{} step(s) failed: {}{}",
                failures.len(),
                list.join(", "),
                if forwarded {
                    "; the other steps succeeded"
                } else {
                    ""
                }
            ),
            failed_steps: failures.len(),
        }
    } else if only_uplink {
        Verdict {
            status: "not_forwarded",
            summary: format!(
                "received, but no rule forwarded it: no rule's FROM matched the topic, or \
                 every matching rule's WHERE was false or NULL (that writes no record). Check \
                 with `iotfwd rules test RULE_FILE --topic {} --payload '...'`.",
                crate::text::escape_controls(&records[0].operation)
            ),
            failed_steps: 0,
        }
    } else {
        Verdict {
            status: "delivered",
            summary: "every step succeeded.".to_owned(),
            failed_steps: 0,
        }
    }
}
