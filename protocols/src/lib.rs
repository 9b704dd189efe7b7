//! Switchboard's front ends.
//!
//! Each module translates one wire protocol to and from the envelope and
//! drives the [`port::Core`] that the gateway implements. A front end never
//! routes, authorises or stores: it decodes, asks the core, and writes what
//! the core hands back.

pub mod arrival;
pub mod cursor;
pub mod deadline;
mod frames;
pub mod heavy;
pub mod linger;
pub mod mqtt;
pub mod origin;
pub mod poll;
pub mod port;
pub mod sse;
pub mod stream;
pub mod ws;
pub mod ws_frames;
pub mod wt;
