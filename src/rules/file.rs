//! The rule file format: one rule per TOML file, named by the file's stem.
//!
//! ```toml
//! description = "Alert on overheating sensors"
//! sql = '''
//! SELECT deviceName() AS device, items.temperature.value AS temperature
//! FROM "/a1b2c3/+/thing/event/property/post"
//! WHERE items.temperature.value > 38
//! '''
//!
//! [[action]]
//! to = "amqp"
//! exchange = "alerts"
//! routing_key = "temp.${device}"
//!
//! [error_action]
//! to = "amqp"
//! exchange = "iotfwd.failed"
//! ```

use serde::Deserialize;

use super::action::ActionSpec;

/// The TOML document of a rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// What the rule is for, shown by `iotfwd check` and the API.
    #[serde(default)]
    pub description: String,
    /// The rule's SQL (`SELECT ... FROM "<topic filter>" [WHERE ...]`).
    pub sql: toml::Spanned<String>,
    /// A disabled rule is checked but not run.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where each output goes; every action runs for every output.
    #[serde(default, rename = "action")]
    pub actions: Vec<ActionSpec>,
    /// Where a message goes when one of its actions fails for good.
    #[serde(default)]
    pub error_action: Option<ActionSpec>,
    /// `"device"`: the rule's outputs of one device reach its destinations in the order
    /// received; `"none"`: no order is promised for this rule. Default: `engine.ordering`.
    #[serde(default)]
    pub ordering: Option<crate::config::Ordering>,
}

pub(super) fn yes() -> bool {
    true
}
