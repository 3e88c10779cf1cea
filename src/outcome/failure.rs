//! [`Failure`]: why a step failed, typed. Each constructor decides its status code, so a code
//! is chosen in exactly one place; callers say what happened, never which number it is.

use std::fmt;

use super::Code;
use crate::message::{Rejection, RejectionKind};

/// A failed step: its code, why (one line, for the record and the operator), and whether
/// trying the same thing again can help (a dropped connection can; a missing exchange cannot).
/// Built only through the named constructors below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    code: Code,
    reason: String,
    retryable: bool,
}

impl Failure {
    fn new(code: Code, reason: impl Into<String>, retryable: bool) -> Failure {
        Failure {
            code,
            reason: reason.into(),
            retryable,
        }
    }

    /// 1903 or 9321: a source could not accept the message (see [`RejectionKind`]).
    pub fn rejected(rejection: &Rejection) -> Failure {
        let code = match rejection.kind {
            RejectionKind::Topic => Code::TopicInvalid,
            RejectionKind::Envelope => Code::ParamInvalid,
        };
        Failure::new(code, rejection.reason.clone(), false)
    }

    /// 9307: a rule's SQL does not load, or a function got arguments it cannot use.
    pub fn sql(reason: impl Into<String>) -> Failure {
        Failure::new(Code::SqlError, reason, false)
    }

    /// 9320: the payload is not the JSON object a rule reads.
    pub fn payload_invalid(reason: impl Into<String>) -> Failure {
        Failure::new(Code::PayloadInvalid, reason, false)
    }

    /// 9321: an action's parameters resolved to something invalid (an empty routing key, a
    /// template that does not render), or a forward no quota scope can take.
    pub fn invalid_parameter(reason: impl Into<String>) -> Failure {
        Failure::new(Code::ParamInvalid, reason, false)
    }

    /// 9324: a tenant or device is over its forwarding quota.
    pub fn throttled(reason: impl Into<String>) -> Failure {
        Failure::new(Code::Throttled, reason, false)
    }

    /// 9326: an instance is over its specification (forwarding TPS).
    pub fn instance_spec_exceeded(reason: impl Into<String>) -> Failure {
        Failure::new(Code::InstanceSpecExceeded, reason, false)
    }

    /// 9325, retryable: the destination cannot be reached now (connection down, timed out).
    pub fn unreachable(reason: impl Into<String>) -> Failure {
        Failure::new(Code::DestinationUnavailable, reason, true)
    }

    /// 9325, final: the destination is not there to be reached from this process (not
    /// configured, not hosted, its backlog full); retrying the same forward cannot help.
    pub fn not_available(reason: impl Into<String>) -> Failure {
        Failure::new(Code::DestinationUnavailable, reason, false)
    }

    /// 9331, retryable: the destination refused the message (publisher nack, channel error).
    pub fn refused(reason: impl Into<String>) -> Failure {
        Failure::new(Code::DestinationError, reason, true)
    }

    /// 9332: the destination is misconfigured (exchange missing).
    pub fn misconfigured(reason: impl Into<String>) -> Failure {
        Failure::new(Code::DestinationMisconfigured, reason, false)
    }

    /// 9332: the broker returned a mandatory publish as unroutable: no queue is bound to the
    /// exchange for the routing key. The destination's configuration (its bindings) is wrong
    /// for this message; retrying the same publish cannot help.
    pub fn unroutable(exchange: &str, routing_key: &str, broker_says: &str) -> Failure {
        Failure::new(
            Code::DestinationMisconfigured,
            format!(
                "no queue is bound to exchange {exchange:?} for routing key {routing_key:?}: \
                 the broker returned the message ({broker_says})"
            ),
            false,
        )
    }

    /// 9333: the destination refused iotfwd's credentials.
    pub fn access_refused(reason: impl Into<String>) -> Failure {
        Failure::new(Code::DestinationAuth, reason, false)
    }

    /// 9399: something that should not happen did (a panic, an unclassified error).
    pub fn internal(reason: impl Into<String>) -> Failure {
        Failure::new(Code::Internal, reason, false)
    }

    /// 9652: a consumer rejected a group delivery.
    pub fn consumer_rejected(reason: impl Into<String>) -> Failure {
        Failure::new(Code::Rejected, reason, false)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether trying again can help.
    pub fn retryable(&self) -> bool {
        self.retryable
    }

    /// The same failure with its reason rewritten (for context: "after 3 attempts", the queue
    /// it concerns, ...).
    pub fn map_reason(mut self, f: impl FnOnce(String) -> String) -> Failure {
        self.reason = f(self.reason);
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code, self.reason)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_constructor_decides_its_code_and_retryability() {
        let cases = [
            (Failure::sql("x"), Code::SqlError, false),
            (Failure::payload_invalid("x"), Code::PayloadInvalid, false),
            (Failure::invalid_parameter("x"), Code::ParamInvalid, false),
            (Failure::throttled("x"), Code::Throttled, false),
            (
                Failure::instance_spec_exceeded("x"),
                Code::InstanceSpecExceeded,
                false,
            ),
            (
                Failure::unreachable("x"),
                Code::DestinationUnavailable,
                true,
            ),
            (
                Failure::not_available("x"),
                Code::DestinationUnavailable,
                false,
            ),
            (Failure::refused("x"), Code::DestinationError, true),
            (
                Failure::misconfigured("x"),
                Code::DestinationMisconfigured,
                false,
            ),
            (Failure::access_refused("x"), Code::DestinationAuth, false),
            (
                Failure::unroutable("e", "k", "NO_ROUTE"),
                Code::DestinationMisconfigured,
                false,
            ),
            (Failure::internal("x"), Code::Internal, false),
            (Failure::consumer_rejected("x"), Code::Rejected, false),
        ];
        for (failure, code, retryable) in cases {
            assert_eq!(
                (failure.code(), failure.retryable()),
                (code, retryable),
                "{failure}"
            );
        }
        let topic = Failure::rejected(&Rejection {
            kind: RejectionKind::Topic,
            reason: "bad".into(),
        });
        assert_eq!(topic.code(), Code::TopicInvalid);
        let envelope = Failure::rejected(&Rejection {
            kind: RejectionKind::Envelope,
            reason: "bad".into(),
        });
        assert_eq!(envelope.code(), Code::ParamInvalid);
        assert_eq!(
            Failure::access_refused("no")
                .map_reason(|r| format!("{r}!"))
                .reason(),
            "no!"
        );
    }
}
