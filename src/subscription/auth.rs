//! SASL PLAIN in the platform's signed format.
//!
//! Username: `${clientId}|authMode=aksign,signMethod=hmacsha1,timestamp=<ms>,authId=<accessKeyId>,iotInstanceId=<id or empty>,consumerGroupId=<group>|`.
//! Password: `base64(HMAC(secret, "authId=<accessKeyId>&timestamp=<ms>"))` with SHA-1
//! (`hmacsha1`) or SHA-256 (`hmacsha256`).
//!
//! Replay: a timestamp more than `subscription.auth_window_ms` (default 5 minutes) from the
//! server's clock is refused, and within that window each signature is accepted once: the
//! [`Verifier`] keeps the signatures of the logins it accepted until their timestamp leaves
//! the window (at most [`MAX_USED_SIGNATURES`]; when that many unexpired logins are held, new
//! logins are refused rather than forgotten). So a captured username and password cannot
//! open a second connection to this process. The cache is per process: with several iotfwd
//! processes behind one address, a captured login can be used once on each of the others
//! within the window.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use hmac::{Hmac, Mac};

/// How far a signed timestamp may be from now unless the verifier is told otherwise
/// (`subscription.auth_window_ms`).
pub const DEFAULT_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Most accepted logins remembered at once (each for its window): about 100 bytes each.
/// Only logins with a valid signature are stored, so no one without a group's secret can
/// fill it.
pub const MAX_USED_SIGNATURES: usize = 100_000;

/// The signature algorithm a client names in `signMethod=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignMethod {
    HmacSha1,
    HmacSha256,
}

impl SignMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            SignMethod::HmacSha1 => "hmacsha1",
            SignMethod::HmacSha256 => "hmacsha256",
        }
    }

    fn parse(s: &str) -> Option<SignMethod> {
        match s {
            "hmacsha1" => Some(SignMethod::HmacSha1),
            "hmacsha256" => Some(SignMethod::HmacSha256),
            _ => None,
        }
    }
}

/// The fields of a signed username.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedUser {
    pub client_id: String,
    pub sign_method: SignMethod,
    pub timestamp_ms: i64,
    pub access_key_id: String,
    pub instance_id: String,
    pub group: String,
}

impl SignedUser {
    /// Parses the platform's username format; the error says which part is wrong.
    pub fn parse(username: &str) -> Result<SignedUser, String> {
        let inner = username
            .strip_suffix('|')
            .ok_or("the username must end with '|'")?;
        let (client_id, params) = inner
            .split_once('|')
            .ok_or("the username must be ${clientId}|<params>|")?;
        if client_id.is_empty() {
            return Err("the clientId before the first '|' is empty".into());
        }
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for part in params.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            fields.insert(key.trim(), value.trim());
        }
        let get = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| format!("{key}= is missing"))
        };
        let mode = get("authMode")?;
        if mode != "aksign" {
            return Err(format!("authMode={mode} is not supported (use aksign)"));
        }
        let method = get("signMethod")?;
        let sign_method = SignMethod::parse(method)
            .ok_or_else(|| format!("signMethod={method} is not hmacsha1 or hmacsha256"))?;
        let ts = get("timestamp")?;
        let timestamp_ms = ts
            .parse()
            .map_err(|_| format!("timestamp={ts} is not milliseconds"))?;
        let group = get("consumerGroupId")?;
        if group.is_empty() {
            return Err("consumerGroupId= is empty".into());
        }
        Ok(SignedUser {
            client_id: client_id.to_owned(),
            sign_method,
            timestamp_ms,
            access_key_id: get("authId")?.to_owned(),
            instance_id: fields
                .get("iotInstanceId")
                .copied()
                .unwrap_or("")
                .to_owned(),
            group: group.to_owned(),
        })
    }

    /// The username for these fields.
    pub fn username(&self) -> String {
        format!(
            "{}|authMode=aksign,signMethod={},timestamp={},authId={},iotInstanceId={},consumerGroupId={}|",
            self.client_id,
            self.sign_method.as_str(),
            self.timestamp_ms,
            self.access_key_id,
            self.instance_id,
            self.group
        )
    }

    /// The password a client with `secret` sends for these fields.
    pub fn password(&self, secret: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.signature(secret))
    }

    fn signature(&self, secret: &str) -> Vec<u8> {
        let text = format!(
            "authId={}&timestamp={}",
            self.access_key_id, self.timestamp_ms
        );
        match self.sign_method {
            SignMethod::HmacSha1 => {
                let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
                    .expect("HMAC takes any key length");
                mac.update(text.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            SignMethod::HmacSha256 => {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
                    .expect("HMAC takes any key length");
                mac.update(text.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

/// What a group accepts.
#[derive(Clone)]
pub struct GroupCredentials {
    pub access_key_id: String,
    pub secret: String,
    pub instance_id: String,
}

/// Why a login was refused. Never holds the secret or the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// The group the client named, when the username parsed.
    pub group: Option<String>,
    pub client_id: Option<String>,
    pub reason: String,
    /// The signature was valid but already used inside the window.
    pub replayed: bool,
}

/// Checks signed logins against the configured groups.
pub struct Verifier {
    groups: std::sync::RwLock<HashMap<String, GroupCredentials>>,
    window_ms: std::sync::atomic::AtomicI64,
    used: std::sync::Mutex<UsedSignatures>,
}

impl Verifier {
    pub fn new(groups: HashMap<String, GroupCredentials>) -> Verifier {
        Verifier::with_capacity(groups, MAX_USED_SIGNATURES)
    }

    fn with_capacity(groups: HashMap<String, GroupCredentials>, capacity: usize) -> Verifier {
        Verifier {
            groups: std::sync::RwLock::new(groups),
            window_ms: std::sync::atomic::AtomicI64::new(DEFAULT_WINDOW_MS),
            used: std::sync::Mutex::new(UsedSignatures::new(capacity)),
        }
    }

    /// Replaces a group's secret (rotation): logins from now on need the new one; connections
    /// already open stay. Returns whether it changed (false too for an unknown group).
    pub fn rotate_secret(&self, group: &str, secret: String) -> bool {
        let mut groups = self
            .groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match groups.get_mut(group) {
            Some(creds) if creds.secret != secret => {
                creds.secret = secret;
                true
            }
            _ => false,
        }
    }

    /// Verifies one login at `now_ms`.
    pub fn verify(
        &self,
        username: &str,
        password: &str,
        now_ms: i64,
    ) -> Result<SignedUser, AuthFailure> {
        let user = SignedUser::parse(username).map_err(|reason| AuthFailure {
            group: None,
            client_id: None,
            reason: format!("malformed username: {reason}"),
            replayed: false,
        })?;
        let fail = |reason: String| AuthFailure {
            group: Some(user.group.clone()),
            client_id: Some(user.client_id.clone()),
            reason,
            replayed: false,
        };
        let groups = self
            .groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(creds) = groups.get(&user.group) else {
            return Err(fail(format!("no consumer group {:?}", user.group)));
        };
        if user.access_key_id != creds.access_key_id {
            return Err(fail(format!(
                "authId {:?} is not the group's AccessKey id",
                user.access_key_id
            )));
        }
        if user.instance_id != creds.instance_id {
            return Err(fail(format!(
                "iotInstanceId {:?} is not the group's instance ({:?})",
                user.instance_id, creds.instance_id
            )));
        }
        let window = self.window_ms();
        let skew = now_ms
            .checked_sub(user.timestamp_ms)
            .and_then(i64::checked_abs);
        let expires = user.timestamp_ms.checked_add(window);
        let (Some(skew), Some(expires)) = (skew, expires) else {
            return Err(fail(format!(
                "timestamp {} is out of range",
                user.timestamp_ms
            )));
        };
        if skew > window {
            return Err(fail(format!(
                "timestamp {} is {} s from the server's clock (at most {} s allowed)",
                user.timestamp_ms,
                skew / 1000,
                window / 1000
            )));
        }
        let given = base64::engine::general_purpose::STANDARD
            .decode(password.trim())
            .map_err(|_| fail("the password is not base64".into()))?;
        let expected = user.signature(&creds.secret);
        if !constant_time_eq(&given, &expected) {
            return Err(fail(format!(
                "the signature does not match ({}; check the AccessKey secret)",
                user.sign_method.as_str()
            )));
        }
        drop(groups);
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match used.claim((user.group.clone(), expected), expires, now_ms) {
            Claim::Fresh => Ok(user),
            Claim::Replayed => Err(AuthFailure {
                replayed: true,
                ..fail(format!(
                    "replayed login: the signature for timestamp {} was already used (sign each connection with a fresh timestamp)",
                    user.timestamp_ms
                ))
            }),
            Claim::Full => Err(fail(format!(
                "{MAX_USED_SIGNATURES} logins are already held for the {} s window; try again later",
                window / 1000
            ))),
        }
    }

    /// How far a timestamp may be from the clock, in ms.
    pub fn window_ms(&self) -> i64 {
        self.window_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets `subscription.auth_window_ms` (at start; the default is [`DEFAULT_WINDOW_MS`]).
    pub fn set_window_ms(&self, ms: u64) {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX);
        self.window_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The signatures of accepted logins, each kept until its timestamp leaves the window.
struct UsedSignatures {
    /// (group, signature) -> the ms after which the timestamp is refused anyway.
    expires: HashMap<(String, Vec<u8>), i64>,
    capacity: usize,
    /// Claims since the last sweep of expired entries.
    since_sweep: usize,
}

enum Claim {
    Fresh,
    Replayed,
    Full,
}

impl UsedSignatures {
    fn new(capacity: usize) -> UsedSignatures {
        UsedSignatures {
            expires: HashMap::new(),
            capacity,
            since_sweep: 0,
        }
    }

    /// Records `key` as used until `expires`, unless it is already held.
    fn claim(&mut self, key: (String, Vec<u8>), expires: i64, now_ms: i64) -> Claim {
        self.since_sweep += 1;
        if self.expires.len() >= self.capacity || self.since_sweep >= 1024 {
            self.expires.retain(|_, e| *e >= now_ms);
            self.since_sweep = 0;
        }
        match self.expires.get(&key) {
            Some(e) if *e >= now_ms => return Claim::Replayed,
            _ => {}
        }
        if self.expires.len() >= self.capacity {
            return Claim::Full;
        }
        self.expires.insert(key, expires);
        Claim::Fresh
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SASL acceptor of one socket: verifies the PLAIN response and leaves the result in
/// `result`, which the connection handler reads after the handshake (the AMQP connection
/// handle does not expose the authenticated identity).
#[derive(Clone)]
pub struct SignedPlain {
    pub verifier: Arc<Verifier>,
    pub result: Arc<OnceLock<Result<SignedUser, AuthFailure>>>,
}

impl SignedPlain {
    fn outcome(&self, result: Result<SignedUser, AuthFailure>) -> SaslServerFrame {
        let code = if result.is_ok() {
            SaslCode::Ok
        } else {
            SaslCode::Auth
        };
        let _ = self.result.set(result);
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }
}

impl SaslAcceptor for SignedPlain {
    fn mechanisms(&self) -> Array<Symbol> {
        Array(vec![Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let failure = |reason: &str| AuthFailure {
            group: None,
            client_id: None,
            reason: reason.to_owned(),
            replayed: false,
        };
        if init.mechanism.as_str() != "PLAIN" {
            return self.outcome(Err(failure(&format!(
                "SASL mechanism {} is not supported (use PLAIN)",
                init.mechanism.as_str()
            ))));
        }
        let Some(response) = init.initial_response else {
            return self.outcome(Err(failure("SASL PLAIN without an initial response")));
        };
        // authzid NUL authcid NUL passwd
        let mut parts = response.split(|&b| b == 0);
        let (Some(_authzid), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.outcome(Err(failure("the SASL PLAIN response is malformed")));
        };
        let (Ok(user), Ok(pass)) = (std::str::from_utf8(user), std::str::from_utf8(pass)) else {
            return self.outcome(Err(failure("the SASL PLAIN response is not UTF-8")));
        };
        let result = self.verifier.verify(user, pass, crate::message::now_ms());
        self.outcome(result)
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(HashMap::from([(
            "g1".to_owned(),
            GroupCredentials {
                access_key_id: "ak".into(),
                secret: "s3cret".into(),
                instance_id: String::new(),
            },
        )]))
    }

    fn user(ts: i64, method: SignMethod) -> SignedUser {
        SignedUser {
            client_id: "client-1".into(),
            sign_method: method,
            timestamp_ms: ts,
            access_key_id: "ak".into(),
            instance_id: String::new(),
            group: "g1".into(),
        }
    }

    #[test]
    fn a_known_vector_matches() {
        // HMAC-SHA1("s3cret", "authId=ak&timestamp=1700000000000"), computed independently
        // with: printf 'authId=ak&timestamp=1700000000000' | openssl dgst -sha1 -hmac s3cret -binary | base64
        let u = user(1_700_000_000_000, SignMethod::HmacSha1);
        assert_eq!(u.password("s3cret"), "Cb3fM0Yn1iik+radSmtjs/JGqx0=");
        assert_eq!(
            u.username(),
            "client-1|authMode=aksign,signMethod=hmacsha1,timestamp=1700000000000,authId=ak,iotInstanceId=,consumerGroupId=g1|"
        );
        assert_eq!(SignedUser::parse(&u.username()).unwrap(), u);
    }

    #[test]
    fn good_wrong_expired_unknown() {
        let v = verifier();
        let now = 1_800_000_000_000;
        for method in [SignMethod::HmacSha1, SignMethod::HmacSha256] {
            let u = user(now - 60_000, method);
            assert_eq!(v.verify(&u.username(), &u.password("s3cret"), now), Ok(u));
        }
        let u = user(now, SignMethod::HmacSha1);
        let e = v
            .verify(&u.username(), &u.password("wrong"), now)
            .unwrap_err();
        assert!(e.reason.contains("signature does not match"), "{e:?}");
        assert!(!e.reason.contains("s3cret") && !e.reason.contains("wrong"));
        let old = user(now - DEFAULT_WINDOW_MS - 1, SignMethod::HmacSha1);
        let e = v
            .verify(&old.username(), &old.password("s3cret"), now)
            .unwrap_err();
        assert!(e.reason.contains("from the server's clock"), "{e:?}");
        let mut other = user(now, SignMethod::HmacSha1);
        other.group = "nope".into();
        let e = v
            .verify(&other.username(), &other.password("s3cret"), now)
            .unwrap_err();
        assert_eq!(e.group.as_deref(), Some("nope"));
        assert!(e.reason.contains("no consumer group"), "{e:?}");
    }

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let v = verifier();
        let now = 1_800_000_000_000;
        let u = user(now - 1_000, SignMethod::HmacSha1);
        let pass = u.password("s3cret");
        assert!(v.verify(&u.username(), &pass, now).is_ok());
        let e = v.verify(&u.username(), &pass, now + 10).unwrap_err();
        assert!(e.replayed && e.reason.contains("replayed login"), "{e:?}");
        // Another client id with the captured password is the same signature.
        let mut other = u.clone();
        other.client_id = "client-2".into();
        let e = v.verify(&other.username(), &pass, now + 20).unwrap_err();
        assert!(e.replayed, "{e:?}");
        // Once the timestamp has left the window it is refused for its age, not remembered.
        let late = now - 1_000 + DEFAULT_WINDOW_MS + 1;
        let e = v.verify(&u.username(), &pass, late).unwrap_err();
        assert!(
            !e.replayed && e.reason.contains("from the server's clock"),
            "{e:?}"
        );
        // A wrong password is not remembered: the right one still logs in once.
        let fresh = user(now, SignMethod::HmacSha256);
        assert!(v.verify(&fresh.username(), "AAAA", now).is_err());
        assert!(
            v.verify(&fresh.username(), &fresh.password("s3cret"), now)
                .is_ok()
        );
    }

    #[test]
    fn the_window_is_configurable_and_extreme_timestamps_do_not_overflow() {
        let v = verifier();
        v.set_window_ms(1_000);
        let now = 1_800_000_000_000;
        let ok = user(now - 1_000, SignMethod::HmacSha1);
        assert!(
            v.verify(&ok.username(), &ok.password("s3cret"), now)
                .is_ok()
        );
        let old = user(now - 1_001, SignMethod::HmacSha1);
        let e = v
            .verify(&old.username(), &old.password("s3cret"), now)
            .unwrap_err();
        assert!(e.reason.contains("at most 1 s"), "{e:?}");
        v.set_window_ms(u64::MAX);
        for ts in [i64::MIN, i64::MAX] {
            let u = user(ts, SignMethod::HmacSha1);
            let e = v
                .verify(&u.username(), &u.password("s3cret"), now)
                .unwrap_err();
            assert!(e.reason.contains("out of range"), "{ts}: {e:?}");
        }
    }

    #[test]
    fn a_full_cache_refuses_new_logins_instead_of_forgetting() {
        let v = Verifier::with_capacity(verifier().groups.into_inner().unwrap(), 2);
        let now = 1_800_000_000_000;
        for ts in [now - 2, now - 1] {
            let u = user(ts, SignMethod::HmacSha1);
            assert!(v.verify(&u.username(), &u.password("s3cret"), now).is_ok());
        }
        let third = user(now, SignMethod::HmacSha1);
        let e = v
            .verify(&third.username(), &third.password("s3cret"), now)
            .unwrap_err();
        assert!(e.reason.contains("already held"), "{e:?}");
        // Once the first two expire, there is room again.
        let later = now - 2 + DEFAULT_WINDOW_MS + 1;
        let u = user(later, SignMethod::HmacSha1);
        assert!(
            v.verify(&u.username(), &u.password("s3cret"), later)
                .is_ok()
        );
    }

    #[test]
    fn malformed_usernames_say_what_is_wrong() {
        for (name, needle) in [
            ("c|authMode=aksign", "end with '|'"),
            ("|authMode=aksign|", "clientId"),
            ("c|authMode=sts,signMethod=hmacsha1|", "authMode=sts"),
            (
                "c|authMode=aksign,signMethod=md5,timestamp=1,authId=a,consumerGroupId=g|",
                "signMethod=md5",
            ),
            (
                "c|authMode=aksign,signMethod=hmacsha1,timestamp=x,authId=a,consumerGroupId=g|",
                "timestamp=x",
            ),
            (
                "c|authMode=aksign,signMethod=hmacsha1,timestamp=1,consumerGroupId=g|",
                "authId= is missing",
            ),
        ] {
            let e = SignedUser::parse(name).unwrap_err();
            assert!(e.contains(needle), "{name}: {e}");
        }
    }

    /// A login must log in only with the group's signature, and then only once; any other
    /// login is refused with a reason that does not hold the secret. A username parses or says
    /// which part is wrong.
    fn check_login(username: &str, password: &str, now: i64) -> Result<&'static str, String> {
        match SignedUser::parse(username) {
            Ok(u) => {
                if u.client_id.is_empty() || u.group.is_empty() {
                    return Err(format!("parsed with an empty client id or group: {u:?}"));
                }
                let _ = (u.username(), u.password("other"));
            }
            Err(why) if why.trim().is_empty() => return Err("refused without a reason".into()),
            Err(_) => {}
        }
        let v = verifier();
        match v.verify(username, password, now) {
            Ok(user) => {
                let given = base64::engine::general_purpose::STANDARD
                    .decode(password.trim())
                    .map_err(|e| format!("logged in with a password that is not base64: {e}"))?;
                if given != user.signature("s3cret") || user.group != "g1" {
                    return Err(format!("logged in without the group's signature: {user:?}"));
                }
                match v.verify(username, password, now) {
                    Err(f) if f.replayed => Ok("logged in"),
                    other => Err(format!("the same signature again gave {other:?}")),
                }
            }
            Err(f) if f.reason.trim().is_empty() || f.reason.contains("s3cret") => {
                Err(format!("refused with the reason {:?}", f.reason))
            }
            Err(f) if f.group.is_none() => Ok("malformed"),
            Err(_) => Ok("refused"),
        }
    }

    /// The SASL step of a socket: whatever the mechanism and initial response, the outcome is
    /// `ok` only for a signed login of the group, else `auth` with a reason on record.
    fn check_sasl_init(mechanism: &str, response: Option<Vec<u8>>) -> Result<&'static str, String> {
        let mut acceptor = SignedPlain {
            verifier: Arc::new(verifier()),
            result: Arc::new(OnceLock::new()),
        };
        let frame = acceptor.on_init(SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: response.clone().map(serde_amqp::primitives::Binary::from),
            hostname: None,
        });
        let SaslServerFrame::Outcome(outcome) = frame else {
            return Err("answered with a challenge".into());
        };
        match (outcome.code, acceptor.result.get()) {
            (SaslCode::Ok, Some(Ok(user))) => {
                let response = response.unwrap_or_default();
                let password = response.split(|&b| b == 0).nth(2).unwrap_or_default();
                let expected =
                    base64::engine::general_purpose::STANDARD.encode(user.signature("s3cret"));
                if mechanism != "PLAIN" || password.trim_ascii() != expected.as_bytes() {
                    return Err(format!("logged in {user:?} without a signed PLAIN login"));
                }
                Ok("logged in")
            }
            (SaslCode::Auth, Some(Err(f))) if !f.reason.trim().is_empty() => Ok("refused"),
            (code, result) => Err(format!("outcome {code:?} with {result:?}")),
        }
    }

    /// Signed usernames and passwords of group g1 at `ts`, to be mutated.
    fn signed(ts: i64) -> Vec<(String, String)> {
        [SignMethod::HmacSha1, SignMethod::HmacSha256]
            .map(|m| {
                let u = user(ts, m);
                (u.username(), u.password("s3cret"))
            })
            .to_vec()
    }

    const SASL_VOCABULARY: &[&str] = &[
        "|",
        ",",
        "=",
        "authMode",
        "aksign",
        "signMethod",
        "hmacsha1",
        "hmacsha256",
        "timestamp",
        "authId",
        "ak",
        "iotInstanceId",
        "consumerGroupId",
        "g1",
        "-1",
        "0",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999",
        " ",
        "é",
        "\0",
        "==",
        "+",
        "/",
    ];

    /// Robustness: mutated signed usernames and passwords through the username parser and the
    /// verifier, and mutated SASL PLAIN responses under any mechanism through the acceptor
    /// (docs/security.md, "Robustness").
    #[test]
    fn robustness_sasl_username_parser() {
        use crate::robustness;
        use proptest::prelude::*;
        let now = 1_800_000_000_000;
        let pairs = signed(now - 1_000);
        let text = |seeds: Vec<String>| {
            prop_oneof![
                6 => robustness::mutated_text(seeds, SASL_VOCABULARY),
                1 => robustness::text(),
            ]
        };
        let usernames = text(pairs.iter().map(|p| p.0.clone()).collect());
        let passwords = text(pairs.iter().map(|p| p.1.clone()).collect());
        let seen = robustness::Seen::default();
        robustness::run(
            "sasl-username",
            2000,
            (usernames, passwords),
            |(username, password)| seen.outcome(check_login(&username, &password, now)),
        );
        seen.print("sasl-username");

        // The acceptor verifies against the clock, so its logins are signed now.
        let responses: Vec<Vec<u8>> = signed(crate::message::now_ms())
            .into_iter()
            .map(|(u, p)| format!("\0{u}\0{p}").into_bytes())
            .collect();
        let mechanism = prop_oneof![
            4 => Just("PLAIN".to_owned()),
            1 => prop::sample::select(vec!["plain", "ANONYMOUS", "", "PLAIN\0"]).prop_map(str::to_owned),
            1 => robustness::text(),
        ];
        let response = prop_oneof![
            1 => Just(None),
            8 => robustness::mutated_bytes(responses, &[b"\0", b"|", b","]).prop_map(|r| Some(r.0)),
            1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
        ];
        let seen = robustness::Seen::default();
        robustness::run(
            "sasl-plain-init",
            2000,
            (mechanism, response),
            |(mechanism, response)| seen.outcome(check_sasl_init(&mechanism, response)),
        );
        seen.print("sasl-plain-init");
    }
}
