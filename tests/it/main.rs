//! Integration tests, in one binary so DataFusion is linked once. One file per capability:
//! the sources (`source_http`, `source_mqtt`, the AMQP source in `action_amqp`), the engine (`golden` SQL
//! cases, `engine_batch` properties), `limits`, the actions (`action_amqp`, `action_group`, `action_mqtt`),
//! `mqtt5` (user properties), `delivery` guarantees, per-device `ordering`, `restarts` (broker restart, kill -9), `supervision`, `health`,
//! `reload`, `logs`, the `console`, the `cli`, `shutdown`, `tls` (HTTPS, amqps, mqtts), the
//! `deploy/` files and the live `robustness` suites (raw bytes against the HTTP server and the
//! AMQP 1.0 endpoint).
//! `harness` runs the daemon in-process; `rabbit` holds the RabbitMQ helpers.
mod action_amqp;
mod action_group;
mod action_mqtt;
mod cli;
mod cluster;
mod console;
mod delivery;
mod deploy;
mod dlq;
mod durability;
mod endpoint;
mod engine_batch;
mod faults;
mod golden;
mod harness;
mod health;
mod limits;
mod limits_shared;
mod logs;
mod mqtt5;
mod mqtt_auth;
mod ordering;
mod rabbit;
mod reload;
mod restarts;
mod robustness;
mod security;
mod shutdown;
mod source_http;
mod source_mqtt;
mod supervision;
mod tls;
