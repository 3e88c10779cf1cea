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
///
/// A message replayed from the dead-letter queue is judged by its last replay (the records
/// from that replay's `uplink` on); the summary says how many replays there were. A
/// dead-letter step that went through (200) is no delivery: the summary says where the
/// message waits.
pub fn verdict(records: &[Record]) -> Verdict {
    let replays = records.iter().filter(|r| r.is_replay()).count();
    let last = records.iter().rposition(Record::is_replay).unwrap_or(0);
    let mut verdict = judge(&records[last.min(records.len())..]);
    let waiting: Vec<&str> = records[last.min(records.len())..]
        .iter()
        .filter(|r| r.is_dead_lettered())
        .map(|r| r.operation.as_str())
        .collect();
    if !waiting.is_empty() {
        verdict.summary.push_str(&format!(
            "; dead-lettered ({}): `iotfwd dlq list`, then `iotfwd dlq replay` once fixed",
            waiting.join(", ")
        ));
    }
    if replays > 0 {
        verdict.summary.push_str(&format!(
            " (as of its replay {replays} from the dead-letter queue)"
        ));
    }
    verdict
}

fn judge(records: &[Record]) -> Verdict {
    let failures: Vec<&Record> = records.iter().filter(|r| !r.code.is_success()).collect();
    let forwarded = records
        .iter()
        .any(|r| r.biz_code != BizCode::Uplink && r.code.is_success() && !r.is_dead_lettered());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Identity, Message};
    use crate::outcome::{Code, Failure};

    #[test]
    fn a_dead_letter_keeps_its_failure_and_a_replay_is_judged_on_its_own() {
        let m = Message::new(
            "/p/d/post".into(),
            b"{}".to_vec().into(),
            Identity::default(),
        )
        .unwrap();
        let failed = Err(Failure::misconfigured("exchange \"x\" missing"));
        let mut records = vec![
            Record::uplink(&m),
            Record::action(&m, "r", "amqp:x", &failed, String::new()),
            Record::dead_letter(
                &m,
                "r",
                "amqp:x",
                Code::DestinationMisconfigured,
                "missing",
                "amqp:iotfwd.dead",
                &Ok(()),
            ),
        ];
        let v = verdict(&records);
        assert_eq!((v.status, v.failed_steps), ("failed", 1), "{v:?}");
        assert!(v.summary.contains("dead-lettered (r/dead-letter)"), "{v:?}");
        records.push(Record::replay(
            &m,
            "rule r, amqp:x failed with 9332, replay 1",
        ));
        records.push(Record::action(&m, "r", "amqp:x", &Ok(()), String::new()));
        let v = verdict(&records);
        assert_eq!((v.status, v.failed_steps), ("delivered", 0), "{v:?}");
        assert!(v.summary.contains("replay 1"), "{v:?}");
        let could_not = Record::dead_letter(
            &m,
            "r",
            "amqp:x",
            Code::DestinationMisconfigured,
            "missing",
            "amqp:iotfwd.dead",
            &Err(Failure::unreachable("broker down")),
        );
        assert!(!could_not.is_dead_lettered());
        assert_eq!(could_not.code, Code::DestinationUnavailable);
        assert_eq!(
            records[2].code,
            Code::Ok,
            "the failure is counted once, by its step"
        );
    }
}
