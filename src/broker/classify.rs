//! lapin errors → the platform's codes. One table, so every caller (publisher, group backlog,
//! connection) reports the same failure the same way.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::outcome::Failure;

/// Maps a lapin error to a [`Failure`] (see docs/rabbitmq.md "Retries"):
///
/// | lapin error | code | retried |
/// |---|---|---|
/// | channel closed with 404 NOT_FOUND (exchange missing) | 9332 | no |
/// | 403 ACCESS_REFUSED | 9333 | no |
/// | connection forced closed (broker shutting down) | 9325 | yes |
/// | any other protocol error | 9331 | yes |
/// | I/O error, connection state, missed heartbeat, runtime gone | 9325 | yes |
/// | channel state, channel id, channel limit | 9331 | yes |
/// | anything else | 9399 | no |
pub fn classify(e: &lapin::Error) -> Failure {
    let reason = e.to_string();
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Failure::misconfigured(reason),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Failure::access_refused(reason),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => Failure::unreachable(reason),
            _ => Failure::refused(reason),
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::RuntimeShutdownError(_) => Failure::unreachable(reason),
        ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::ChannelsLimitReached => Failure::refused(reason),
        _ => Failure::internal(reason),
    }
}

/// A failed connection attempt: 9333 when the broker refused the credentials (retrying with
/// the same ones cannot help), otherwise 9325, retried. The reason names the broker.
pub fn connect_failure(e: &lapin::Error, broker: &str) -> Failure {
    let failure = classify(e);
    let reason = format!("cannot connect to {broker}: {}", failure.reason());
    match failure.code() {
        crate::outcome::Code::DestinationAuth => Failure::access_refused(reason),
        _ => Failure::unreachable(reason),
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    use super::*;
    use crate::outcome::Code;

    fn protocol(kind: AMQPErrorKind) -> lapin::Error {
        lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            kind,
            "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
        )))
    }

    #[test]
    fn each_lapin_error_kind_gets_its_code() {
        let cases = [
            (
                protocol(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)),
                Code::DestinationMisconfigured,
                false,
            ),
            (
                protocol(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)),
                Code::DestinationAuth,
                false,
            ),
            (
                protocol(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)),
                Code::DestinationUnavailable,
                true,
            ),
            (
                protocol(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)),
                Code::DestinationError,
                true,
            ),
            (
                lapin::Error::from(std::io::Error::other("connection reset")),
                Code::DestinationUnavailable,
                true,
            ),
            (
                lapin::Error::from(ErrorKind::MissingHeartbeatError),
                Code::DestinationUnavailable,
                true,
            ),
            (
                lapin::Error::from(ErrorKind::ChannelsLimitReached),
                Code::DestinationError,
                true,
            ),
        ];
        for (error, code, retryable) in cases {
            let f = classify(&error);
            assert_eq!((f.code(), f.retryable()), (code, retryable), "{error}");
            assert_eq!(f.reason(), error.to_string());
        }
    }

    #[test]
    fn a_refused_login_is_final_and_anything_else_while_connecting_is_retried() {
        let auth = connect_failure(
            &protocol(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)),
            "amqp://u:***@h",
        );
        assert_eq!(
            (auth.code(), auth.retryable()),
            (Code::DestinationAuth, false)
        );
        assert!(
            auth.reason()
                .starts_with("cannot connect to amqp://u:***@h: ")
        );
        let other = connect_failure(
            &protocol(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)),
            "b",
        );
        assert_eq!(
            (other.code(), other.retryable()),
            (Code::DestinationUnavailable, true)
        );
    }
}
