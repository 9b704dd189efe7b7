//! `switchboard bench`: the built-in load generator.
//!
//! Scenarios (see `docs/bench.md`): `fanout` and `cross` (open-loop publish
//! at a fixed schedule, latency against the SCHEDULED send time, full
//! loss/duplicate/reorder accounting), `idle` and `churn` (connection
//! setup and memory), `recovery` (disconnect, miss K
//! messages, reconnect with positions, time the catch-up, verify
//! exactly-once) and `publish` (closed-loop acknowledged publishes: how
//! many the server acknowledges per second, and how long each ack takes).
//! Every run is bounded by its duration and `--max-conns`.
//!
//! Layout: [`payload`] (what a message carries), [`accounting`] (sequences →
//! loss/dup/reorder), [`histogram`] (sharded HDR histograms), [`procfs`]
//! (server and self CPU, write syscalls, RSS), [`syscalls`] (exact write
//! syscall counts with `perf stat`), [`report`] (INVALID, table, JSON),
//! [`clients`] (one fast client per protocol), [`nats`] and [`nchan`] (clients
//! for the peers the gateway is compared with: nats-server over TCP and
//! WebSocket and JetStream, Nchan's EventSource and long poll), [`fanout`],
//! [`connections`], [`recovery`] and [`publish`] (the scenarios). The bench measures; it does not assert:
//! problems are printed loudly (`!!`) and the exit code stays 0 unless the
//! run could not be carried out.

pub mod accounting;
pub mod clients;
pub mod connections;
pub mod fanout;
pub mod histogram;
pub mod nats;
pub mod nchan;
pub mod payload;
pub mod procfs;
pub mod publish;
pub mod recovery;
pub mod report;
pub mod syscalls;
pub mod tls;
pub mod wt;

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

/// Why a bench run failed (as opposed to measuring something bad).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Socket-level failure.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// HTTP client failure.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// WebSocket failure.
    #[error("WebSocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The gateway answered something the bench did not expect.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
}

/// Protocols the bench speaks.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Proto {
    /// WebSocket, `switchboard.v1.proto` subprotocol.
    Ws,
    /// MQTT 5 on the TCP listener.
    Mqtt,
    /// Server-Sent Events (subscribe only; publishers use REST).
    Sse,
    /// HTTP long polling (subscribe only; publishers use REST).
    Poll,
    /// REST publish (publish only).
    Rest,
    /// NATS core protocol over TCP (an external nats-server; `--nats-url`).
    Nats,
    /// NATS protocol in WebSocket binary frames (nats-server's `websocket`
    /// listener at `--url`).
    NatsWs,
    /// WebTransport (HTTP/3 over QUIC) at `--wt-url`: publishes on the
    /// control stream, deliveries on the channel streams.
    Wt,
}

impl Proto {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Ws => "ws",
            Proto::Mqtt => "mqtt",
            Proto::Sse => "sse",
            Proto::Poll => "poll",
            Proto::Rest => "rest",
            Proto::Nats => "nats",
            Proto::NatsWs => "nats-ws",
            Proto::Wt => "wt",
        }
    }

    /// The protocol publishers use alongside subscribers of `self`.
    pub fn publisher(self) -> Proto {
        match self {
            Proto::Ws => Proto::Ws,
            Proto::Mqtt => Proto::Mqtt,
            Proto::Sse | Proto::Poll | Proto::Rest => Proto::Rest,
            Proto::Nats => Proto::Nats,
            Proto::NatsWs => Proto::NatsWs,
            Proto::Wt => Proto::Wt,
        }
    }

    /// True for the protocols that only a nats-server speaks.
    pub fn is_nats(self) -> bool {
        matches!(self, Proto::Nats | Proto::NatsWs)
    }
}

/// A switch.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Protocols `publish` speaks: each acknowledges a publish.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum AckProto {
    /// WebSocket `publish` frames (`switchboard.v1.proto`), acknowledged by `publish_ack`.
    Ws,
    /// MQTT 5 PUBLISH at QoS 1, acknowledged by PUBACK.
    Mqtt,
    /// `POST /v1/channels/{channel}/messages`, acknowledged by its 2xx response.
    Rest,
    /// NATS `PUB` with a reply subject into a JetStream stream (an external
    /// nats-server with JetStream at `--nats-url`), acknowledged by the
    /// stream's JSON ack on the reply subject.
    NatsJs,
}

impl AckProto {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            AckProto::Ws => "ws",
            AckProto::Mqtt => "mqtt",
            AckProto::Rest => "rest",
            AckProto::NatsJs => "nats-js",
        }
    }
}

/// What kind of server is at `--url` for SSE, long polling and REST publishes.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Flavour {
    /// Switchboard: `/v1/sse`, `/v1/poll`, `/v1/channels/.../messages`.
    #[default]
    Switchboard,
    /// nginx + Nchan as configured by `tests/bench/nginx-nchan.conf`:
    /// subscribers at `/sub/<channel>` (EventSource or long poll), publishers
    /// POST to `/pub/<channel>`.
    Nchan,
}

/// MQTT protocol version the bench's MQTT clients speak.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (what nats-server's MQTT listener supports).
    #[value(name = "3")]
    V3,
    /// MQTT 5.
    #[default]
    #[value(name = "5")]
    V5,
}

/// How `writes_per_delivery` is measured.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum SyscallSource {
    /// `syscw` from `/proc/PID/io`: free, but blind to send/sendto/sendmsg.
    #[default]
    Syscw,
    /// `perf stat` on the syscall-entry tracepoints of write, writev, sendto,
    /// sendmsg and sendmmsg: exact for any server (needs `perf` and root).
    Perf,
}

/// Flags every scenario shares.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Gateway HTTP listener (WebSocket, SSE, long polling, REST);
    /// `https://` speaks TLS to it (see `--ca`, `--insecure`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Gateway MQTT listener; `mqtts://` speaks TLS to it.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
    /// CA bundle (PEM) that TLS targets' certificates must chain to.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// TLS session resumption (tickets, session ids) on reconnects.
    #[arg(long, value_enum, default_value = "on")]
    pub tls_resumption: OnOff,
    /// HTTP/2 (ALPN h2) to an `https://` `--url`: SSE, long polling and
    /// REST publishes, one connection per client as over HTTP/1.1.
    /// WebSocket needs HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Subscribers connect to these HTTP listeners instead, round robin
    /// (comma-separated; other nodes of a cluster, while publishers stay on
    /// `--url`). `fanout` and `cross` only.
    #[arg(long, value_delimiter = ',')]
    pub sub_url: Vec<String>,
    /// Subscribers connect to these MQTT listeners instead, round robin.
    #[arg(long, value_delimiter = ',')]
    pub sub_mqtt_url: Vec<String>,
    /// MQTT version of the bench's MQTT clients (3 = 3.1.1).
    #[arg(long, value_enum, default_value = "5")]
    pub mqtt_version: MqttVersion,
    /// Gateway WebTransport endpoint (`--proto wt`; QUIC, UDP).
    #[arg(long, default_value = "https://127.0.0.1:8443/v1/wt")]
    pub wt_url: String,
    /// SHA-256 of the gateway's QUIC certificate (64 hex digits) for
    /// `--proto wt`; by default the one served at `--url`'s
    /// `/v1/wt/cert-hash` (what `switchboard dev` generates).
    #[arg(long)]
    pub cert_hash: Option<String>,
    /// Accept any server certificate: `--proto wt`, and `https://` /
    /// `mqtts://` targets (dev's generated certificate).
    #[arg(long, conflicts_with = "cert_hash")]
    pub insecure: bool,
    /// nats-server client listener (`--proto nats`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Server at `--url` for SSE, long polling and REST publishes.
    #[arg(long, value_enum, default_value = "switchboard")]
    pub target: Flavour,
    /// PID(s) of the server, comma-separated (e.g. nginx master and worker),
    /// for CPU, write syscalls and RSS from /proc; figures are summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// How server write syscalls are counted (with `--server-pid`).
    #[arg(long, value_enum, default_value = "syscw")]
    pub syscalls: SyscallSource,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Upper bound on connections the bench opens.
    #[arg(long, default_value_t = 20_000)]
    pub max_conns: u64,
    /// Spread connections over source addresses 127.0.0.1..=N (loopback targets only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub src_addrs: u8,
    /// After publishing ends, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
}

/// `switchboard bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenario.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Shape of an open-loop publish/subscribe run.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Channels.
    #[arg(long, default_value_t = 10)]
    pub channels: u32,
    /// Subscribers per channel.
    #[arg(long, default_value_t = 10)]
    pub subs_per_channel: u32,
    /// Publishers.
    #[arg(long, default_value_t = 1)]
    pub pubs: u32,
    /// Total publish rate, messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Payload size in bytes (at least the 47-byte header).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// MQTT QoS for subscriptions and MQTT publishes.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
}

/// Shape of a closed-loop acknowledged-publish run.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Publisher connections.
    #[arg(long, default_value_t = 4)]
    pub publishers: u32,
    /// Publishes each publisher keeps outstanding (1: wait for each ack
    /// before sending the next). REST: keep-alive connections per publisher.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub window: u32,
    /// Channels the publishes are spread over (each publisher cycles through them).
    #[arg(long, default_value_t = 100)]
    pub channels: u32,
    /// Payload size in bytes (at least the 47-byte header).
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// JetStream stream to publish into (`--proto nats-js`), created if missing.
    #[arg(long, default_value = "SWITCHBOARD_BENCH")]
    pub stream: String,
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open-loop fan-out: publishers on the subscribers' protocol.
    Fanout {
        /// Protocol of subscribers (and publishers; SSE/poll publish over REST).
        #[arg(long, value_enum)]
        proto: Proto,
        /// Load shape.
        #[command(flatten)]
        load: LoadArgs,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Fan-out across protocols: publish on one, subscribe on another.
    Cross {
        /// Publisher protocol (ws, mqtt or rest).
        #[arg(long, value_enum)]
        pub_proto: Proto,
        /// Subscriber protocol.
        #[arg(long, value_enum)]
        sub_proto: Proto,
        /// Load shape.
        #[command(flatten)]
        load: LoadArgs,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Open N subscribed connections and hold them (setup rate, handshake latency, RSS).
    Idle {
        /// Protocol.
        #[arg(long, value_enum)]
        proto: Proto,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: u64,
        /// How long to hold them once open.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Connect → subscribe → receive one message → disconnect, at a target rate.
    Churn {
        /// Protocol.
        #[arg(long, value_enum)]
        proto: Proto,
        /// Cycles started per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// How long to start cycles.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Subscribers disconnect, miss K messages, reconnect with their positions.
    Recovery {
        /// Subscriber protocol.
        #[arg(long, value_enum)]
        proto: Proto,
        /// Subscribers (all on one channel).
        #[arg(long, default_value_t = 100)]
        subs: u32,
        /// Messages published while they are away.
        #[arg(long, default_value_t = 100)]
        missed: u32,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Give up waiting for the catch-up after this long.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Closed-loop acknowledged publishes: P publishers, each with up to W unacknowledged.
    Publish {
        /// Protocol (nats-js: a nats-server with JetStream at --nats-url).
        #[arg(long, value_enum)]
        proto: AckProto,
        /// Load shape.
        #[command(flatten)]
        load: PublishArgs,
        /// Shared flags.
        #[command(flatten)]
        common: CommonArgs,
    },
}

pub use switchboard_proto::duration::parse_duration;

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

impl CommonArgs {
    /// The gateway as a [`clients::Target`] for a run that speaks `protos`
    /// (WebTransport endpoints are only made when one of them is `wt`).
    pub async fn target(&self, protos: &[Proto]) -> Result<clients::Target, BenchError> {
        let (mut http, mut mqtt) = (host_port(&self.url), host_port(&self.mqtt_url));
        let (tls_http, tls_mqtt) = (self.url.starts_with("https://"), self.mqtt_url.starts_with("mqtts://"));
        if tls_http || tls_mqtt {
            // The clients connect to local shims that speak TLS to the server.
            let options = tls::TlsOptions {
                ca: self.ca.clone(),
                insecure: self.insecure,
                resumption: self.tls_resumption == OnOff::On,
            };
            let config = options.client_config()?;
            let sources = clients::SourceCycle::new(self.src_addrs);
            let next: Arc<dyn Fn() -> Option<std::net::IpAddr> + Send + Sync> = Arc::new(move || sources.next());
            if tls_http {
                let mut http_config = config.clone();
                if self.http2 {
                    Arc::make_mut(&mut http_config).alpn_protocols = vec![b"h2".to_vec()];
                }
                http = tls::shim(&http, http_config, next.clone()).await?.to_string();
            }
            if tls_mqtt {
                mqtt = tls::shim(&mqtt, config, next).await?.to_string();
            }
        }
        if self.http2 && !tls_http {
            return Err(BenchError::Usage("--http2 needs an https:// --url".into()));
        }
        if self.http2 && protos.contains(&Proto::Ws) {
            return Err(BenchError::Usage("--http2: WebSocket runs on HTTP/1.1 (drop --http2 for --proto ws)".into()));
        }
        let mut t = clients::Target::new(http, mqtt, self.src_addrs);
        t.http2 = self.http2;
        t.nats = host_port(&self.nats_url);
        t.mqtt_version = self.mqtt_version;
        t.flavour = self.target;
        if protos.contains(&Proto::Wt) {
            let cert = match (&self.cert_hash, self.insecure) {
                (_, true) => wt::CertCheck::Insecure,
                (Some(hex), false) => wt::parse_hash(hex)?,
                (None, false) => wt::fetch_cert_hash(&t.http_base()).await?,
            };
            t.wt = Some(wt::WtTarget::new(&self.wt_url, cert)?);
        }
        Ok(t)
    }
}

impl CommonArgs {
    /// The subscribers' targets: one per `--sub-url` / `--sub-mqtt-url`
    /// pair (the shorter list repeats), or `--url`'s alone.
    pub async fn sub_targets(&self, protos: &[Proto]) -> Result<Vec<clients::Target>, BenchError> {
        let n = self.sub_url.len().max(self.sub_mqtt_url.len());
        if n == 0 {
            return Ok(vec![self.target(protos).await?]);
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut one = self.clone();
            if !self.sub_url.is_empty() {
                one.url = self.sub_url[i % self.sub_url.len()].clone();
            }
            if !self.sub_mqtt_url.is_empty() {
                one.mqtt_url = self.sub_mqtt_url[i % self.sub_mqtt_url.len()].clone();
            }
            out.push(one.target(protos).await?);
        }
        Ok(out)
    }
}

/// Worker threads the bench counts for its CPU budget: what tokio's default
/// multi-thread runtime uses (`TOKIO_WORKER_THREADS`, else one per CPU).
pub fn worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Raises the open-file limit for `conns` connections (plus slack for
/// everything else the process opens), as far as the hard limit allows.
/// A TLS run holds three sockets per connection (the client's, the shim's
/// end of it, the TLS connection: see [`tls`]).
fn raise_nofile(conns: u64) {
    let want = conns * 3 + 256;
    match rlimit::increase_nofile_limit(want) {
        Ok(n) if n < want => tracing::warn!(limit = n, want, "open-file limit is below the connections asked for"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Refuses scenario/protocol/target combinations the bench cannot run:
/// the peers (nats-server, Nchan) have no REST publish API, no positions to
/// recover from and no Switchboard endpoints, so `churn` and `recovery` are
/// Switchboard-only; `recovery` over MQTT needs MQTT 5 session expiry.
fn check_combination(scenario: &str, proto: Proto, common: &CommonArgs) -> anyhow::Result<()> {
    let switchboard_only = matches!(scenario, "churn" | "recovery");
    if switchboard_only && (proto.is_nats() || common.target != Flavour::Switchboard) {
        anyhow::bail!("{scenario} runs against Switchboard only (not --proto nats/nats-ws or --target nchan)");
    }
    if scenario == "recovery" && proto == Proto::Mqtt && common.mqtt_version != MqttVersion::V5 {
        anyhow::bail!("recovery over MQTT needs --mqtt-version 5 (session expiry)");
    }
    if scenario == "recovery" && proto == Proto::Rest {
        anyhow::bail!("recovery needs a subscribing protocol (ws, wt, sse, poll or mqtt)");
    }
    if common.target == Flavour::Nchan && !matches!(proto, Proto::Sse | Proto::Poll | Proto::Rest) {
        anyhow::bail!("--target nchan serves sse and poll subscribers only");
    }
    Ok(())
}

/// Runs a scenario and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match &args.scenario {
        Scenario::Fanout { proto, common, .. } => check_combination("fanout", *proto, common)?,
        Scenario::Cross { sub_proto, common, .. } => check_combination("cross", *sub_proto, common)?,
        Scenario::Idle { proto, common, .. } => check_combination("idle", *proto, common)?,
        Scenario::Churn { proto, common, .. } => check_combination("churn", *proto, common)?,
        Scenario::Recovery { proto, common, .. } => check_combination("recovery", *proto, common)?,
        Scenario::Publish { proto, common, .. } => {
            if common.target != Flavour::Switchboard {
                anyhow::bail!("publish runs against Switchboard (ws, mqtt, rest) or a nats-server (nats-js)");
            }
            if *proto == AckProto::Mqtt && common.mqtt_version != MqttVersion::V5 {
                anyhow::bail!("publish over MQTT speaks MQTT 5 (--mqtt-version 5)");
            }
        }
    }
    let (mut report, json) = match args.scenario {
        Scenario::Fanout { proto, load, common } => {
            raise_nofile(u64::from(load.channels) * u64::from(load.subs_per_channel) + u64::from(load.pubs));
            (fanout::run(proto.publisher(), proto, &load, &common).await?, common.json)
        }
        Scenario::Cross { pub_proto, sub_proto, load, common } => {
            raise_nofile(u64::from(load.channels) * u64::from(load.subs_per_channel) + u64::from(load.pubs));
            (fanout::run(pub_proto, sub_proto, &load, &common).await?, common.json)
        }
        Scenario::Idle { proto, conns, hold, common } => {
            raise_nofile(conns);
            (connections::idle(proto, conns, hold, &common).await?, common.json)
        }
        Scenario::Churn { proto, rate, duration, common } => {
            // Cycles last a few ms each; 10 s worth of them is a generous bound on those in flight.
            raise_nofile(common.max_conns.min((rate * 10.0) as u64 + 64));
            (connections::churn(proto, rate, duration, &common).await?, common.json)
        }
        Scenario::Recovery { proto, subs, missed, size, duration, common } => {
            raise_nofile(u64::from(subs) + 1);
            (recovery::run(proto, subs, missed, size, duration, &common).await?, common.json)
        }
        Scenario::Publish { proto, load, common } => {
            raise_nofile(publish::connections(proto, &load));
            (publish::run(proto, &load, &common).await?, common.json)
        }
    };
    report.tls = tls::figures();
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_urls() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert_eq!(host_port("http://127.0.0.1:8080/"), "127.0.0.1:8080");
        assert_eq!(host_port("mqtt://h:1"), "h:1");
    }
}
