//! Control: the daemon's view of itself. [`health`] answers `GET /api/v1/health`; [`reload`]
//! re-reads rules, the config file's quotas and group secrets while the daemon runs;
//! [`stages`] notices a stage that stopped, so the process fails and is restarted; [`check`]
//! tells, before a start, whether a config and its rules would load (`iotfwd check`).

pub mod check;
pub mod health;
pub mod reload;
pub mod stages;
