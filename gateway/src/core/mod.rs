//! The core: routing, channels, auth and channel state. It never touches a
//! socket, a file name from config or a clock it was not handed; the edge
//! builds it and front ends reach it through the [`router::Router`].

pub mod auth;
pub mod channel;
pub mod engine;
pub mod lifecycle;
pub mod router;
pub mod str_set;
