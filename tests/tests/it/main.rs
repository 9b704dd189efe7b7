//! The cross-protocol integration suite: every test runs against a real
//! gateway started in this process, with real clients. One test binary (each
//! file here is a module of it), so the suite links once: a binary per file
//! costs minutes of linking and gigabytes of disk.
//!
//! Tests that assert on `/metrics` stay in binaries of their own (the files
//! beside this folder): the Prometheus recorder is process-wide, so counters
//! would add up across the gateways of concurrent tests here.
//!
//! The `common_*` modules (beside this folder) are helpers shared by several
//! test files; each binary uses part of them.

#[allow(dead_code)]
#[path = "../common_a/mod.rs"]
mod common_a;
#[allow(dead_code)]
#[path = "../common_auth/mod.rs"]
mod common_auth;
#[allow(dead_code)]
#[path = "../common_b/mod.rs"]
mod common_b;
#[allow(dead_code)]
#[path = "../common_mqtt/mod.rs"]
mod common_mqtt;
#[allow(dead_code)]
#[path = "../common_sse/mod.rs"]
mod common_sse;

mod anonymous;
mod auth;
mod auth_matrix;
mod bad_input;
mod dollar_topics;
mod fanout;
mod history_policy;
mod idempotency;
mod lingering_close;
mod mqtt;
mod mqtt_bad_input;
mod mqtt_cross;
mod mqtt_independent;
mod order;
mod poll;
mod presence;
mod recovery;
mod smoke;
mod sse_http2;
mod wills;
mod ws_frames;
mod wt;
