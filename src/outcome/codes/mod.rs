//! The platform status codes: the single source of truth for what each code means.
//!
//! Every log record carries a `code` (200 = success) and a `bizCode` (service type). This
//! module holds, once, for every code iotfwd can log: the service type it is logged under,
//! when iotfwd logs it, and the platform's meaning, cause and troubleshooting text (from the
//! IoT platform's error-code reference), the latter two worded for an iotfwd operator.
//! `iotfwd codes` prints [`render_catalog`], `iotfwd codes 9307` prints [`render_one`], and log
//! queries show the entry beside a failure.
//!
//! Decisions worth knowing:
//! - `meaning` is the reference's text, with "cloud product" / "cloud" replaced by
//!   "destination" / "server" where the platform names its own products.
//! - All texts are single-line prose (no `\n`); renderers wrap them as they need.
//! - 200 is logged under every service type. Its [`CodeInfo::biz_code`] is
//!   [`BizCode::Uplink`] (the first step of a message); [`CodeInfo::biz_codes`] lists all of
//!   them, and the renderers print "any".
//! - A compile-time check keeps [`Code::ALL`] and [`catalog()`] in step: same length, same
//!   order, strictly ascending codes.
//!
//! The catalog's text lives in `catalog.rs`; this file holds the types and the renderers.

mod catalog;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use catalog::CATALOG;

/// Service type of a log record (the platform's bizCode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BizCode {
    /// A message was received from a source.
    #[serde(rename = "uplink")]
    Uplink,
    /// Data forwarding: rule evaluation, quotas and forwarding to RabbitMQ exchanges.
    #[serde(rename = "ruleengine")]
    RuleEngine,
    /// Server-side subscription: delivery to a consumer group on iotfwd's AMQP 1.0 endpoint.
    #[serde(rename = "ServerSubscribe")]
    ServerSubscribe,
}

impl BizCode {
    /// Every service type, in the order a message passes through them.
    pub const ALL: [BizCode; 3] = [
        BizCode::Uplink,
        BizCode::RuleEngine,
        BizCode::ServerSubscribe,
    ];

    /// The platform's name: `"uplink"`, `"ruleengine"` or `"ServerSubscribe"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BizCode::Uplink => "uplink",
            BizCode::RuleEngine => "ruleengine",
            BizCode::ServerSubscribe => "ServerSubscribe",
        }
    }

    /// Parses the platform's name; the match ignores ASCII case (`"serversubscribe"` works).
    pub fn parse(s: &str) -> Option<BizCode> {
        BizCode::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .or_else(|| {
                BizCode::ALL
                    .into_iter()
                    .find(|b| b.as_str().eq_ignore_ascii_case(s))
            })
    }
}

impl fmt::Display for BizCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A platform status code that iotfwd logs. The discriminant is the number itself.
///
/// Serialized as the bare number (`9307`); deserializing an unknown number is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum Code {
    /// 200: the step succeeded.
    Ok = 200,
    /// 1903: the message topic is not of the form `/productKey/deviceName/...`.
    TopicInvalid = 1903,
    /// 9203: forwarded to a consumer group with no consumer online.
    ConsumerOffline = 9203,
    /// 9307: rule SQL does not parse or plan, or a function got unusable runtime arguments.
    SqlError = 9307,
    /// 9320: the payload is not a JSON object, for a rule that reads it as JSON.
    PayloadInvalid = 9320,
    /// 9321: an action's parameters resolved to something invalid.
    ParamInvalid = 9321,
    /// 9324: tenant or device over its forwarding quota.
    Throttled = 9324,
    /// 9325: destination unreachable after all retries.
    DestinationUnavailable = 9325,
    /// 9326: instance over its forwarding-TPS specification.
    InstanceSpecExceeded = 9326,
    /// 9331: the destination refused the message (publisher nack, channel error).
    DestinationError = 9331,
    /// 9332: the destination is misconfigured (exchange missing, 404).
    DestinationMisconfigured = 9332,
    /// 9333: the destination refused iotfwd's credentials (403).
    DestinationAuth = 9333,
    /// 9399: unexpected internal error.
    Internal = 9399,
    /// 9600: consumer group connection limit exceeded.
    GroupConnectionLimit = 9600,
    /// 9601: client heartbeat (idle time-out) outside 30–300 s.
    HeartbeatInvalid = 9601,
    /// 9602: the endpoint closed a client's connection.
    ServerClosed = 9602,
    /// 9650: no ACK from the consumer within the ACK time-out.
    AckTimeout = 9650,
    /// 9651: the consumer released the message.
    Released = 9651,
    /// 9652: the consumer rejected the message (NACK).
    Rejected = 9652,
}

impl Code {
    /// Every code, ascending by number (the same order as [`catalog()`]).
    pub const ALL: &'static [Code] = &[
        Code::Ok,
        Code::TopicInvalid,
        Code::ConsumerOffline,
        Code::SqlError,
        Code::PayloadInvalid,
        Code::ParamInvalid,
        Code::Throttled,
        Code::DestinationUnavailable,
        Code::InstanceSpecExceeded,
        Code::DestinationError,
        Code::DestinationMisconfigured,
        Code::DestinationAuth,
        Code::Internal,
        Code::GroupConnectionLimit,
        Code::HeartbeatInvalid,
        Code::ServerClosed,
        Code::AckTimeout,
        Code::Released,
        Code::Rejected,
    ];

    /// The number, e.g. 9307.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code with this number, if iotfwd knows it.
    pub fn from_u16(code: u16) -> Option<Code> {
        Code::ALL
            .binary_search_by_key(&code, |c| c.as_u16())
            .ok()
            .map(|i| Code::ALL[i])
    }

    /// True only for [`Code::Ok`] (200); every other code is a failure.
    pub const fn is_success(self) -> bool {
        matches!(self, Code::Ok)
    }

    /// What a failure with this code is about (see [`Scope`]).
    pub fn scope(self) -> Scope {
        self.info().scope
    }

    /// This code's catalog entry.
    pub fn info(self) -> &'static CodeInfo {
        // `Code::ALL` and `CATALOG` have the same order (checked at compile time below).
        let index = Code::ALL
            .binary_search(&self)
            .expect("Code::ALL lists every variant");
        &CATALOG[index]
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u16::deserialize(deserializer)?;
        Code::from_u16(n).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Unsigned(u64::from(n)),
                &"a platform status code iotfwd knows (see `iotfwd codes`)",
            )
        })
    }
}

/// What a code says something about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// 200: nothing went wrong.
    Success,
    /// This one message (its topic, payload, parameters or quota); the destination may be fine.
    Message,
    /// The destination or consumer group the message went to: its state in `/api/v1/health`.
    Destination,
    /// One consumer's connection to the endpoint.
    Connection,
}

/// What one code means, when iotfwd logs it, and what an operator should do about it.
///
/// All texts are single-line prose; [`render_one`] wraps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeInfo {
    /// The number, e.g. 9307.
    pub code: u16,
    /// The [`Code`] variant's name, e.g. `"SqlError"`.
    pub name: &'static str,
    /// The service type this code is logged under (for 200, see [`CodeInfo::biz_codes`]).
    pub biz_code: BizCode,
    /// What a failure with this code says something about: the one message, or the
    /// destination (health tracks only the latter).
    pub scope: Scope,
    /// When iotfwd logs it, in one line.
    pub situation: &'static str,
    /// The platform's meaning of the code.
    pub meaning: &'static str,
    /// Why it happens, worded for iotfwd.
    pub cause: &'static str,
    /// Concrete steps for an iotfwd operator.
    pub troubleshooting: &'static str,
}

impl CodeInfo {
    /// The [`Code`] this entry describes.
    pub fn as_code(&self) -> Code {
        Code::from_u16(self.code).expect("every catalog entry is a Code")
    }

    /// Every service type the code is logged under: all of them for 200, else just
    /// [`CodeInfo::biz_code`].
    pub fn biz_codes(&self) -> &[BizCode] {
        if self.code == Code::Ok.as_u16() {
            &BizCode::ALL
        } else {
            std::slice::from_ref(&self.biz_code)
        }
    }

    /// The service type as the renderers print it: "any" for 200, else the bizCode.
    fn service_type_label(&self) -> &'static str {
        if self.biz_codes().len() > 1 {
            "any"
        } else {
            self.biz_code.as_str()
        }
    }
}

/// The whole catalog, ascending by code, one entry per [`Code`] variant.
pub fn catalog() -> &'static [CodeInfo] {
    CATALOG
}

/// The catalog entry for a number, if iotfwd knows the code.
pub fn lookup(code: u16) -> Option<&'static CodeInfo> {
    Code::from_u16(code).map(Code::info)
}

/// `iotfwd codes` output: a header, then one aligned line per code: code, service type,
/// meaning.
pub fn render_catalog() -> String {
    let code_width = CATALOG
        .iter()
        .map(|i| i.code.to_string().len())
        .chain(["CODE".len()])
        .max()
        .unwrap_or(0);
    let service_width = CATALOG
        .iter()
        .map(|i| i.service_type_label().len())
        .chain(["SERVICE TYPE".len()])
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let mut line = |code: &str, service: &str, meaning: &str| {
        let row = format!("{code:<code_width$}  {service:<service_width$}  {meaning}");
        out.push_str(row.trim_end());
        out.push('\n');
    };
    line("CODE", "SERVICE TYPE", "MEANING");
    for info in CATALOG {
        line(
            &info.code.to_string(),
            info.service_type_label(),
            info.meaning,
        );
    }
    out
}

/// The width `render_one` wraps its paragraphs at.
const WRAP_WIDTH: usize = 100;
/// The indentation of `render_one`'s paragraphs.
const INDENT: &str = "  ";

/// `iotfwd codes 9307` output: a title line (`9307  SqlError  (ruleengine)`), then the
/// "Meaning:", "When:", "Cause:" and "Troubleshooting:" paragraphs, indented and wrapped at
/// 100 columns.
pub fn render_one(info: &CodeInfo) -> String {
    let mut out = format!(
        "{}  {}  ({})\n",
        info.code,
        info.name,
        if info.biz_codes().len() > 1 {
            "any service type"
        } else {
            info.biz_code.as_str()
        }
    );
    for (heading, text) in [
        ("Meaning:", info.meaning),
        ("When:", info.situation),
        ("Cause:", info.cause),
        ("Troubleshooting:", info.troubleshooting),
    ] {
        out.push('\n');
        out.push_str(heading);
        out.push('\n');
        crate::text::wrap_into(&mut out, text, INDENT, WRAP_WIDTH);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_has_exactly_one_entry_and_round_trips() {
        for &code in Code::ALL {
            assert_eq!(Code::from_u16(code.as_u16()), Some(code));
            let entries: Vec<_> = catalog()
                .iter()
                .filter(|i| i.code == code.as_u16())
                .collect();
            assert_eq!(entries.len(), 1, "{code:?} must have exactly one entry");
            assert_eq!(code.info().code, code.as_u16());
            assert_eq!(code.info().as_code(), code);
            assert_eq!(code.info().name, format!("{code:?}"));
            assert_eq!(lookup(code.as_u16()), Some(code.info()));
        }
        assert_eq!(catalog().len(), Code::ALL.len());
    }

    #[test]
    fn code_all_lists_every_variant() {
        // A new variant missing from ALL has no catalog entry; this match fails to compile
        // when a variant is added, pointing here.
        for &code in Code::ALL {
            match code {
                Code::Ok
                | Code::TopicInvalid
                | Code::ConsumerOffline
                | Code::SqlError
                | Code::PayloadInvalid
                | Code::ParamInvalid
                | Code::Throttled
                | Code::DestinationUnavailable
                | Code::InstanceSpecExceeded
                | Code::DestinationError
                | Code::DestinationMisconfigured
                | Code::DestinationAuth
                | Code::Internal
                | Code::GroupConnectionLimit
                | Code::HeartbeatInvalid
                | Code::ServerClosed
                | Code::AckTimeout
                | Code::Released
                | Code::Rejected => {}
            }
        }
        let distinct: HashSet<_> = Code::ALL.iter().collect();
        assert_eq!(distinct.len(), 19);
    }

    #[test]
    fn unknown_numbers_are_not_codes() {
        for n in [0, 199, 201, 404, 9200, 9308, 9653, u16::MAX] {
            assert_eq!(Code::from_u16(n), None, "{n}");
            assert!(lookup(n).is_none(), "{n}");
        }
    }

    #[test]
    fn only_ok_is_success() {
        for &code in Code::ALL {
            assert_eq!(code.is_success(), code == Code::Ok, "{code:?}");
        }
    }

    #[test]
    fn display_is_the_number() {
        assert_eq!(Code::SqlError.to_string(), "9307");
        assert_eq!(Code::Ok.to_string(), "200");
    }

    #[test]
    fn render_one_has_every_paragraph() {
        let normalize = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        for info in catalog() {
            let out = render_one(info);
            let flat = normalize(&out);
            for text in [
                info.meaning,
                info.situation,
                info.cause,
                info.troubleshooting,
            ] {
                assert!(flat.contains(&normalize(text)), "{}: {text}", info.code);
            }
            for heading in ["Meaning:", "When:", "Cause:", "Troubleshooting:"] {
                assert!(out.lines().any(|l| l == heading), "{} {heading}", info.code);
            }
            for line in out.lines() {
                let longest_word = crate::text::unbreakable_words(line.trim_start())
                    .iter()
                    .map(|t| t.chars().count())
                    .max()
                    .unwrap_or(0);
                assert!(
                    line.chars().count() <= WRAP_WIDTH || longest_word + INDENT.len() > WRAP_WIDTH,
                    "{}: line too long: {line}",
                    info.code
                );
            }
        }
        let sql = render_one(Code::SqlError.info());
        assert!(sql.starts_with("9307  SqlError  (ruleengine)\n"), "{sql}");
        assert!(render_one(Code::Ok.info()).starts_with("200  Ok  (any service type)\n"));
    }

    #[test]
    fn render_catalog_is_one_aligned_line_per_code() {
        let out = render_catalog();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), catalog().len() + 1);
        assert!(lines[0].starts_with("CODE"));
        let meaning_column = lines[0].find("MEANING").unwrap();
        for (line, info) in lines[1..].iter().zip(catalog()) {
            assert!(line.starts_with(&info.code.to_string()), "{line}");
            assert_eq!(&line[meaning_column..], info.meaning, "{line}");
            assert!(line.contains(info.service_type_label()), "{line}");
        }
        assert!(out.contains("9307  "));
        assert!(lines[1].contains(" any "), "{}", lines[1]);
    }

    #[test]
    fn code_serializes_as_a_number() {
        assert_eq!(serde_json::to_string(&Code::SqlError).unwrap(), "9307");
        for &code in Code::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, code.as_u16().to_string());
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), code);
        }
        assert!(serde_json::from_str::<Code>("9308").is_err());
        assert!(serde_json::from_str::<Code>("70000").is_err());
        assert!(serde_json::from_str::<Code>("\"9307\"").is_err());
    }

    #[test]
    fn biz_code_names_and_parse() {
        for biz in BizCode::ALL {
            assert_eq!(BizCode::parse(biz.as_str()), Some(biz));
            assert_eq!(BizCode::parse(&biz.as_str().to_uppercase()), Some(biz));
            assert_eq!(biz.to_string(), biz.as_str());
            let json = serde_json::to_string(&biz).unwrap();
            assert_eq!(json, format!("\"{}\"", biz.as_str()));
            assert_eq!(serde_json::from_str::<BizCode>(&json).unwrap(), biz);
        }
        assert_eq!(BizCode::parse("ruleengine"), Some(BizCode::RuleEngine));
        assert_eq!(BizCode::parse("RuleEngine"), Some(BizCode::RuleEngine));
        assert_eq!(
            BizCode::parse("serversubscribe"),
            Some(BizCode::ServerSubscribe)
        );
        assert_eq!(BizCode::parse("Uplink"), Some(BizCode::Uplink));
        assert_eq!(BizCode::parse(""), None);
        assert_eq!(BizCode::parse("rule_engine"), None);
        assert_eq!(BizCode::parse(" uplink"), None);
    }

    #[test]
    fn code_info_serializes_with_platform_field_names() {
        let json = serde_json::to_value(Code::Throttled.info()).unwrap();
        assert_eq!(json["code"], 9324);
        assert_eq!(json["name"], "Throttled");
        assert_eq!(json["bizCode"], "ruleengine");
    }
}
