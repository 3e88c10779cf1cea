//! One MQTT connection, in MQTT 3.1.1 or MQTT 5, behind one small interface: the source and
//! the destination are written once against it, and only this file knows which protocol
//! `[mqtt] protocol` chose. Each protocol's part is a match arm: the options it connects with,
//! how it subscribes, publishes and acknowledges, and how its events and errors read.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Event, Outgoing, Packet};

use crate::config::mqtt::MqttConfig;
use crate::message::Identity;

/// The largest packet iotfwd sends or takes.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// How long a persistent MQTT 5 session outlives its connection: 0xFFFFFFFF is "never
/// expires", what a 3.1.1 persistent session does (the broker's own limit, e.g. Mosquitto's
/// `persistent_client_expiration`, still applies). MQTT 5 ends a session when its connection
/// closes unless this is non-zero, and redelivery needs the session.
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// What a connection is for: the knobs that differ between the source and the destination.
pub struct Role {
    pub client_id: String,
    /// Start a new session (true), or resume the broker's persistent one (false).
    pub clean_start: bool,
    /// Acknowledge received publishes only when told (the source).
    pub manual_acks: bool,
    /// QoS 1 publishes in flight at once, each way: what the broker may send before iotfwd
    /// acknowledges (MQTT 5: the receive maximum in CONNECT), and what iotfwd sends before the
    /// broker acknowledges.
    pub inflight: u16,
}

/// Connection options for one protocol, built once (the password read) and cloned per
/// connection.
#[derive(Clone)]
pub enum Options {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<v5::MqttOptions>),
}

impl Options {
    /// The options of `mqtt` for `role`; errors name the config key.
    pub fn new(mqtt: &MqttConfig, role: Role) -> Result<Options, String> {
        let (host, port) = mqtt.host_port().map_err(|e| format!("mqtt.url: {e}"))?;
        let keep_alive = Duration::from_secs(u64::from(mqtt.keep_alive_s.max(1)));
        let login = match &mqtt.username {
            Some(user) => Some((user.clone(), mqtt.password()?.unwrap_or_default())),
            None => None,
        };
        let transport = if mqtt.is_tls() {
            let tls = crate::tls::client_config("mqtt", mqtt.tls.as_ref())?;
            Some(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ))
        } else {
            None
        };
        let inflight = role.inflight.max(1);
        Ok(if mqtt.is_v5() {
            let mut o = v5::MqttOptions::new(role.client_id, host, port);
            o.set_keep_alive(keep_alive)
                .set_clean_start(role.clean_start)
                .set_session_expiry_interval((!role.clean_start).then_some(SESSION_NEVER_EXPIRES))
                .set_manual_acks(role.manual_acks)
                .set_receive_maximum(Some(inflight))
                .set_outgoing_inflight_upper_limit(inflight)
                .set_max_packet_size(Some(MAX_PACKET as u32));
            if let Some((user, password)) = login {
                o.set_credentials(user, password);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Options::V5(Box::new(o))
        } else {
            let mut o = rumqttc::MqttOptions::new(role.client_id, host, port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(role.clean_start)
                .set_manual_acks(role.manual_acks)
                .set_inflight(inflight)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET);
            if let Some((user, password)) = login {
                o.set_credentials(user, password);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Options::V311(Box::new(o))
        })
    }

    /// The broker's host and port.
    pub fn broker_address(&self) -> (String, u16) {
        match self {
            Options::V311(o) => o.broker_address(),
            Options::V5(o) => o.broker_address(),
        }
    }

    /// A new client and its event loop (nothing is sent before the first poll); `cap` bounds
    /// the requests queued for the event loop.
    pub fn connect(&self, cap: usize) -> (Client, Events) {
        match self {
            Options::V311(o) => {
                let (c, e) = rumqttc::AsyncClient::new((**o).clone(), cap);
                (Client::V311(c), Events::V311(Box::new(e)))
            }
            Options::V5(o) => {
                let (c, e) = v5::AsyncClient::new((**o).clone(), cap);
                (Client::V5(c), Events::V5(Box::new(e)))
            }
        }
    }
}

/// The requests side of a connection. Cheap to clone.
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// A publish the broker sent.
pub enum Received {
    V311(rumqttc::Publish),
    V5(p5::Publish),
}

impl Received {
    pub fn topic(&self) -> String {
        match self {
            Received::V311(p) => p.topic.clone(),
            Received::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
        }
    }

    pub fn payload(&self) -> Bytes {
        match self {
            Received::V311(p) => p.payload.clone(),
            Received::V5(p) => p.payload.clone(),
        }
    }

    /// Whether it waits for an acknowledgement (QoS 1 or 2).
    pub fn needs_ack(&self) -> bool {
        match self {
            Received::V311(p) => p.qos != rumqttc::QoS::AtMostOnce,
            Received::V5(p) => p.qos != v5::mqttbytes::QoS::AtMostOnce,
        }
    }

    /// The identity the publisher gave: MQTT 5 user properties `messageId` and `traceId`
    /// (non-empty; the first of each wins). MQTT 3.1.1 has none.
    pub fn identity(&self) -> Identity {
        let mut identity = Identity::default();
        if let Received::V5(p) = self
            && let Some(props) = &p.properties
        {
            for (key, value) in &props.user_properties {
                let slot = match key.as_str() {
                    "messageId" => &mut identity.message_id,
                    "traceId" => &mut identity.trace_id,
                    _ => continue,
                };
                if slot.is_none() && !value.is_empty() {
                    *slot = Some(value.clone());
                }
            }
        }
        identity
    }
}

impl Client {
    /// Subscribes to `filters` at QoS 1 (`qos_1`) or 0.
    pub async fn subscribe(&self, filters: &[String], qos_1: bool) -> Result<(), String> {
        let result = match self {
            Client::V311(c) => {
                let qos = if qos_1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos)),
                )
                .await
                .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = if qos_1 {
                    v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    v5::mqttbytes::QoS::AtMostOnce
                };
                c.subscribe_many(filters.iter().map(|f| p5::Filter::new(f.clone(), qos)))
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        result.map_err(|e| format!("cannot subscribe: {e}"))
    }

    /// Acknowledges `publish` (received on this client's connection).
    pub async fn ack(&self, publish: &Received) -> Result<(), String> {
        match (self, publish) {
            (Client::V311(c), Received::V311(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V5(c), Received::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Err("a publish of the other protocol".into()),
        }
    }

    /// Hands a publish to the event loop without waiting; `properties` are MQTT 5 user
    /// properties (MQTT 3.1.1 has nowhere to carry them).
    pub fn try_publish(
        &self,
        topic: String,
        qos_1: bool,
        retain: bool,
        payload: Vec<u8>,
        properties: Vec<(String, String)>,
    ) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                let qos = if qos_1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.try_publish(topic, qos, retain, payload)
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = if qos_1 {
                    v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    v5::mqttbytes::QoS::AtMostOnce
                };
                let properties = p5::PublishProperties {
                    user_properties: properties,
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, qos, retain, payload, properties)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Sends a DISCONNECT after what is queued.
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// What happened on a connection, in the words both protocols share.
pub enum Happened {
    Connected {
        session_present: bool,
    },
    Publish(Received),
    /// The broker answered a SUBSCRIBE: for each filter, whether it was granted.
    Subscribed(Vec<bool>),
    /// A publish was written with this packet id (0 for QoS 0).
    Sent(u16),
    /// The broker acknowledged the QoS 1 publish `pkid`; `refused` holds the reason code and
    /// its name when it did not take it (MQTT 5 reason codes ≥ 0x80).
    PubAck {
        pkid: u16,
        refused: Option<(u8, &'static str)>,
    },
    Other,
}

/// Why a connection failed or ended.
pub struct LinkError {
    /// As an operator reads it.
    pub text: String,
    /// The broker refused the login (bad user name or password, not authorized): retrying
    /// with the same credentials cannot help.
    pub login_refused: bool,
}

/// The events side of a connection.
pub enum Events {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl Events {
    /// The next event; `host` and `trusts` word a failed TLS handshake.
    pub async fn poll(&mut self, host: &str, trusts: &str) -> Result<Happened, LinkError> {
        match self {
            Events::V311(e) => match e.poll().await {
                Ok(event) => Ok(v311_event(event)),
                Err(e) => Err(v311_error(&e, host, trusts)),
            },
            Events::V5(e) => match e.poll().await {
                Ok(event) => Ok(v5_event(event)),
                Err(e) => Err(v5_error(&e, host, trusts)),
            },
        }
    }
}

fn v311_event(event: Event) -> Happened {
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Happened::Connected {
            session_present: ack.session_present,
        },
        Event::Incoming(Packet::Publish(p)) => Happened::Publish(Received::V311(p)),
        Event::Incoming(Packet::SubAck(ack)) => Happened::Subscribed(
            ack.return_codes
                .iter()
                .map(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .collect(),
        ),
        Event::Incoming(Packet::PubAck(ack)) => Happened::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Outgoing(Outgoing::Publish(pkid) | Outgoing::AwaitAck(pkid)) => Happened::Sent(pkid),
        _ => Happened::Other,
    }
}

fn v5_event(event: v5::Event) -> Happened {
    use p5::Packet as P;
    match event {
        v5::Event::Incoming(P::ConnAck(ack)) => Happened::Connected {
            session_present: ack.session_present,
        },
        v5::Event::Incoming(P::Publish(p)) => Happened::Publish(Received::V5(p)),
        v5::Event::Incoming(P::SubAck(ack)) => Happened::Subscribed(
            ack.return_codes
                .iter()
                .map(|c| matches!(c, p5::SubscribeReasonCode::Success(_)))
                .collect(),
        ),
        v5::Event::Incoming(P::PubAck(ack)) => Happened::PubAck {
            pkid: ack.pkid,
            refused: puback_refusal(ack.reason),
        },
        v5::Event::Outgoing(Outgoing::Publish(pkid) | Outgoing::AwaitAck(pkid)) => {
            Happened::Sent(pkid)
        }
        _ => Happened::Other,
    }
}

/// The reason code and name of a PUBACK that did not take the publish.
fn puback_refusal(reason: p5::PubAckReason) -> Option<(u8, &'static str)> {
    use p5::PubAckReason as R;
    Some(match reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::UnspecifiedError => (0x80, "unspecified error"),
        R::ImplementationSpecificError => (0x83, "implementation specific error"),
        R::NotAuthorized => (NOT_AUTHORIZED, "not authorized"),
        R::TopicNameInvalid => (0x90, "topic name invalid"),
        R::PacketIdentifierInUse => (0x91, "packet identifier in use"),
        R::QuotaExceeded => (0x97, "quota exceeded"),
        R::PayloadFormatInvalid => (0x99, "payload format invalid"),
    })
}

/// The MQTT 5 reason code "not authorized".
pub const NOT_AUTHORIZED: u8 = 0x87;

/// Words for a login the broker refused, the same for both protocols.
const BAD_LOGIN: &str = "the broker refused the login: bad user name or password (mqtt.username, mqtt.password_env / password_file)";
const NOT_AUTHORIZED_LOGIN: &str = "the broker refused the login: not authorized (check mqtt.username, the password in mqtt.password_env / password_file, and the broker's access rules)";
const BAD_CLIENT_ID: &str = "the broker refused the client id (mqtt.client_id)";

fn refused(text: &str) -> LinkError {
    LinkError {
        text: text.to_owned(),
        login_refused: true,
    }
}

fn other(e: &(dyn std::error::Error + 'static), host: &str, trusts: &str) -> LinkError {
    LinkError {
        text: crate::tls::describe(e, host, trusts)
            .unwrap_or_else(|| format!("connection lost or refused: {e}")),
        login_refused: false,
    }
}

fn v311_error(e: &rumqttc::ConnectionError, host: &str, trusts: &str) -> LinkError {
    use rumqttc::ConnectReturnCode as C;
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => refused(BAD_LOGIN),
        // Mosquitto answers a wrong password so too.
        E::ConnectionRefused(C::NotAuthorized) => refused(NOT_AUTHORIZED_LOGIN),
        E::ConnectionRefused(C::BadClientId) => LinkError {
            text: BAD_CLIENT_ID.into(),
            login_refused: false,
        },
        E::ConnectionRefused(code) => LinkError {
            text: format!("the broker refused the connection: {code:?}"),
            login_refused: false,
        },
        other_error => other(other_error, host, trusts),
    }
}

fn v5_error(e: &v5::ConnectionError, host: &str, trusts: &str) -> LinkError {
    use p5::ConnectReturnCode as C;
    use v5::ConnectionError as E;
    let code = match e {
        E::ConnectionRefused(code) => *code,
        E::MqttState(v5::StateError::ConnFail { reason }) => *reason,
        E::MqttState(v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            return LinkError {
                text: format!(
                    "the broker closed the connection: {reason_code:?}{}",
                    reason_string
                        .as_deref()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                ),
                login_refused: false,
            };
        }
        other_error => return other(other_error, host, trusts),
    };
    match code {
        C::BadUserNamePassword => refused(BAD_LOGIN),
        C::NotAuthorized => refused(NOT_AUTHORIZED_LOGIN),
        C::BadClientId | C::ClientIdentifierNotValid => LinkError {
            text: BAD_CLIENT_ID.into(),
            login_refused: false,
        },
        C::UnsupportedProtocolVersion | C::RefusedProtocolVersion => LinkError {
            text: "the broker does not speak MQTT 5; set mqtt.protocol = \"3.1.1\"".into(),
            login_refused: false,
        },
        code => LinkError {
            text: format!("the broker refused the connection: {code:?}"),
            login_refused: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puback_failures_carry_their_code() {
        use p5::PubAckReason as R;
        assert_eq!(puback_refusal(R::Success), None);
        assert_eq!(puback_refusal(R::NoMatchingSubscribers), None);
        assert_eq!(puback_refusal(R::NotAuthorized).unwrap().0, 0x87);
        assert_eq!(puback_refusal(R::QuotaExceeded).unwrap().0, 0x97);
    }

    #[test]
    fn v5_identity_comes_from_user_properties() {
        let mut p = p5::Publish::new(
            "/pk/dev/user/x",
            v5::mqttbytes::QoS::AtLeastOnce,
            "{}",
            None,
        );
        p.properties = Some(p5::PublishProperties {
            user_properties: vec![
                ("traceId".into(), "t-1".into()),
                ("messageId".into(), String::new()),
                ("messageId".into(), "m-1".into()),
            ],
            ..Default::default()
        });
        let identity = Received::V5(p).identity();
        assert_eq!(identity.trace_id.as_deref(), Some("t-1"));
        assert_eq!(identity.message_id.as_deref(), Some("m-1"));
    }
}
