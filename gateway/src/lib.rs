//! Switchboard, the gateway: router, channels, history, presence, config,
//! listeners, CLI and admin.
//!
//! The front ends live in `switchboard-protocols` and only translate; this
//! crate decides. [`router::Router`] implements their port; the
//! [`engine::Engine`] behind it holds channel state.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod bench;
pub mod channel;
pub mod cli;
pub mod client;
pub mod client_wt;
pub mod config;
pub mod engine;
pub mod front;
pub mod http;
pub mod router;
pub mod server;
pub mod str_set;
pub mod tls;
pub mod wt;
