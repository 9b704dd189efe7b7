//! Switchboard, the gateway, in three parts that show the house:
//!
//! - [`core`]: what decides — the [`core::router::Router`] (which implements
//!   the front ends' port), the one channel matcher, auth, and the engine
//!   seam with its engines (channel state in memory or on disk, the MQTT
//!   session store). The core knows nothing of sockets, HTTP or config files.
//! - [`edge`]: what meets the network and the operator — listeners and
//!   graceful shutdown, the HTTP front door and REST, TLS, admission limits,
//!   the admin listener, configuration, WebTransport, the demo page.
//! - [`tooling`]: what users run beside it — the CLI, its clients for every
//!   protocol, and the load generator.
//!
//! The front ends live in `switchboard-protocols` and only translate; this
//! crate decides. Dependencies point one way: tooling → edge → core.

pub mod core;
pub mod edge;
pub mod tooling;
