//! The edge: everything between the network (or the operator) and the
//! core — listeners, the HTTP front door and REST routes, HTTP timeouts,
//! TLS, admission limits, the admin listener, configuration, WebTransport sessions,
//! lifecycle webhooks and the demo page (`web/`). It builds the core from config and hands each
//! connection to its front end.

pub mod admin;
pub mod admission;
pub mod config;
pub mod front;
pub mod http;
pub mod server;
pub mod timeouts;
pub mod tls;
pub mod webhooks;
pub mod wt;
