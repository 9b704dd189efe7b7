//! The tooling: the `switchboard` command line, the clients it uses for
//! every protocol (`pub`, `sub`), and the load generator (`bench`). It uses
//! the edge and the core; neither knows it.

pub mod bench;
pub mod cli;
pub mod client;
pub mod client_wt;
