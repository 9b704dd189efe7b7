//! The `switchboard` command line: `dev`, `serve`, `check`, `pub`, `sub`, `bench`.
//!
//! This is the only place that prints to the terminal.

use std::path::PathBuf;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};

use crate::edge::config::Config;
use crate::edge::server::Gateway;
use crate::tooling::client::{self, SubEvent};
use crate::tooling::client_wt;

/// Default gateway URL for `pub` and `sub` (the local dev gateway).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Switchboard: a multi-protocol real-time edge gateway.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Listener address overrides shared by `dev` (and later `serve`).
#[derive(Debug, Clone, clap::Args, Default)]
pub struct ListenArgs {
    /// HTTP listener (WebSocket, REST, demo page), IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub http: Option<String>,
    /// HTTPS listener (everything the HTTP listener serves, over TLS), IP:PORT; "" disables it.
    #[arg(long, value_name = "IP:PORT")]
    pub https: Option<String>,
    /// MQTT listener (3.1.1 and 5), IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub mqtt: Option<String>,
    /// MQTTS listener (MQTT over TLS), IP:PORT; "" disables it.
    #[arg(long, value_name = "IP:PORT")]
    pub mqtts: Option<String>,
    /// QUIC / WebTransport listener (UDP), IP:PORT; "" disables it.
    #[arg(long, value_name = "IP:PORT")]
    pub quic: Option<String>,
    /// Admin listener (metrics, health, admin API), IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub admin: Option<String>,
}

/// Protocols `sub` can use.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Via {
    /// WebSocket (JSON subprotocol).
    Ws,
    /// Server-Sent Events (reconnects with Last-Event-ID).
    Sse,
    /// HTTP long polling (cursor per poll).
    Poll,
    /// MQTT 5 (QoS 1, clean session).
    Mqtt,
    /// WebTransport over QUIC (reconnects and recovers like ws; --cert-hash or --insecure for a dev certificate).
    Wt,
}

/// Protocols `pub` can use.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PubVia {
    /// REST `POST /v1/channels/{channel}/messages`.
    Rest,
    /// WebSocket publish frame (acknowledged).
    Ws,
    /// MQTT 5 PUBLISH (QoS from --qos).
    Mqtt,
    /// WebTransport publish frame on the control stream (acknowledged).
    Wt,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on loopback with embedded defaults and open auth.
    Dev {
        /// Listener overrides.
        #[command(flatten)]
        listen: ListenArgs,
        /// Keep channel state in this directory (durable, survives restarts)
        /// instead of memory.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Keep channel state in a NATS JetStream cluster instead (server
        /// URLs, comma-separated), shared with other gateway nodes.
        #[arg(long, value_name = "URL", conflicts_with = "data")]
        nats: Option<String>,
    },
    /// Run with a configuration file.
    Serve {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Publish one message.
    Pub {
        /// Channel name.
        channel: String,
        /// Payload (use @FILE to read a file, - for stdin).
        data: String,
        /// Gateway URL: http://HOST:PORT (REST), ws://HOST:PORT (WebSocket), mqtt://HOST:PORT (MQTT);
        /// https://HOST:PORT for --via wt (an http:// URL then means the same host on port 8443).
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        /// Idempotency key.
        #[arg(long)]
        id: Option<String>,
        /// Protocol; by default the --url scheme decides (http → REST, ws → WebSocket, mqtt → MQTT).
        #[arg(long, value_enum)]
        via: Option<PubVia>,
        /// REST API key (X-Api-Key).
        #[arg(long, env = "SWITCHBOARD_API_KEY")]
        api_key: Option<String>,
        /// MQTT QoS (with an mqtt:// URL).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Publish as the channel's retained value.
        #[arg(long)]
        retain: bool,
        /// WebTransport: accept only the certificate with this SHA-256 (hex, as `switchboard dev` prints it).
        #[arg(long, value_name = "HEX", conflicts_with = "insecure")]
        cert_hash: Option<String>,
        /// WebTransport: do not verify the certificate at all (development only).
        #[arg(long)]
        insecure: bool,
    },
    /// Subscribe and print messages, one per line.
    Sub {
        /// Channel name or MQTT filter.
        filter: String,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = Via::Ws)]
        via: Via,
        /// Gateway URL: http://HOST:PORT (ws://HOST:PORT is accepted for --via ws); mqtt://HOST:PORT for
        /// --via mqtt (an http:// URL then means the same host on port 1883); https://HOST:PORT for --via wt
        /// (an http:// URL then means the same host on port 8443).
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        /// Replay the last N messages first.
        #[arg(long)]
        rewind: Option<u32>,
        /// Exit after N messages.
        #[arg(long)]
        count: Option<u64>,
        /// Print each message as its JSON frame.
        #[arg(long)]
        json: bool,
        /// WebTransport: accept only the certificate with this SHA-256 (hex, as `switchboard dev` prints it).
        #[arg(long, value_name = "HEX", conflicts_with = "insecure")]
        cert_hash: Option<String>,
        /// WebTransport: do not verify the certificate at all (development only).
        #[arg(long)]
        insecure: bool,
    },
    /// Certificates for development (see certs/README.md).
    Cert {
        /// What to generate.
        #[command(subcommand)]
        what: CertCommand,
    },
    /// Load generator: fanout, cross, idle, churn and recovery scenarios (see docs/bench.md).
    Bench(crate::tooling::bench::BenchArgs),
    /// Mint a development connection token with an HS256 key from the config.
    Token {
        /// TOML configuration file with [[auth.keys]].
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Client id (`sub`).
        #[arg(long)]
        sub: String,
        /// Capability, repeatable: PATTERN=op,op (ops: subscribe, publish, presence, history).
        #[arg(long = "cap", value_name = "PATTERN=OPS")]
        caps: Vec<String>,
        /// Lifetime, e.g. 15m, 1h, 1d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Key id to sign with (default: the first HS256 key).
        #[arg(long)]
        kid: Option<String>,
    },
}

/// `switchboard cert ...`.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Write a development CA, a localhost/127.0.0.1 server certificate and
    /// an mTLS client certificate (never for production).
    Dev {
        /// Output folder (git-ignored in this repository).
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Common name of the client certificate: the MQTT client id it proves.
        #[arg(long, default_value = "dev-device")]
        device: String,
    },
}

fn ws_base(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_string()
    }
}

fn mqtt_url(url: &str) -> String {
    if url.starts_with("mqtt://") {
        return url.to_string();
    }
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("127.0.0.1");
    format!("mqtt://{host}:1883")
}

/// The WebTransport URL for `--url`: an https:// URL as given; any other
/// scheme means the same host on the QUIC listener's default port, 8443.
fn wt_url(url: &str) -> String {
    if url.starts_with("https://") {
        return url.to_string();
    }
    let host = url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string));
    format!("https://{}:8443", host.as_deref().unwrap_or("127.0.0.1"))
}

/// WebTransport client options from `--url`, `--cert-hash` and `--insecure`.
fn wt_options(url: &str, cert_hash: Option<&str>, insecure: bool) -> anyhow::Result<client_wt::WtOptions> {
    let cert = match (cert_hash, insecure) {
        (_, true) => client_wt::CertCheck::Insecure,
        (Some(hex), false) => client_wt::CertCheck::from_hex(hex)?,
        (None, false) => client_wt::CertCheck::System,
    };
    Ok(client_wt::WtOptions::new(wt_url(url), cert))
}

fn http_base(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        url.to_string()
    }
}

fn read_data(data: &str) -> anyhow::Result<Bytes> {
    if data == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        return Ok(buf.into());
    }
    if let Some(path) = data.strip_prefix('@') {
        return Ok(std::fs::read(path)?.into());
    }
    Ok(Bytes::copy_from_slice(data.as_bytes()))
}

fn apply_listen(cfg: &mut Config, l: &ListenArgs) {
    let set = |slot: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            *slot = v.clone();
        }
    };
    set(&mut cfg.listen.http, &l.http);
    set(&mut cfg.listen.admin, &l.admin);
    set(&mut cfg.listen.mqtt, &l.mqtt);
    set(&mut cfg.listen.https, &l.https);
    set(&mut cfg.listen.mqtts, &l.mqtts);
    set(&mut cfg.listen.quic, &l.quic);
}

fn banner(gw: &Gateway) {
    println!("switchboard {} — dev mode (open auth, loopback only)", env!("CARGO_PKG_VERSION"));
    if let Some(a) = gw.http_addr {
        println!("  WebSocket   ws://{a}/v1/ws   (subprotocols switchboard.v1.json, switchboard.v1.proto)");
        println!("  REST        http://{a}/v1/channels/{{channel}}/messages | history | presence");
        println!("  SSE         http://{a}/v1/sse?channel=...");
        println!("  long poll   http://{a}/v1/poll?channel=...");
        println!("  MQTT/WS     ws://{a}/mqtt   (subprotocol mqtt)");
        println!("  WS echo     ws://{a}/v1/ws-echo   (RFC 6455 conformance)");
        println!("  demo page   http://{a}/");
    }
    if let Some(a) = gw.mqtt_addr {
        println!("  MQTT        mqtt://{a}   (3.1.1 and 5)");
    }
    if let Some(a) = gw.admin_addr {
        println!("  admin       http://{a}/metrics  /healthz  /readyz  /v1/sessions  /v1/stats");
    }
    match (gw.storage.as_ref(), gw.nats.as_ref()) {
        (_, Some(servers)) => println!("  engine      NATS JetStream at {servers} (shared with the other nodes)"),
        (Some(s), None) => println!("  storage     {} (sync = {})", s.dir.display(), s.sync.name()),
        (None, None) => println!("  storage     memory (nothing survives a restart; --data DIR keeps it on disk)"),
    }
    if let Some(a) = gw.https_addr {
        println!("  HTTPS       https://{a}/   (same routes: wss://{a}/v1/ws, /v1/sse, ...; HTTP/1.1 and HTTP/2)");
    }
    if let Some(a) = gw.mqtts_addr {
        println!("  MQTTS       mqtts://{a}");
    }
    if let Some(a) = gw.quic_addr {
        println!("  WebTransport https://{a}/v1/wt   (QUIC, UDP)");
    }
    if let Some(tls) = &gw.tls {
        let hash = tls.cert_hash().map(|h| crate::edge::tls::hex(&h)).unwrap_or_default();
        if tls.is_generated() {
            println!("  TLS         self-signed ECDSA P-256 certificate generated at start, valid 14 days");
        }
        println!("  cert SHA-256 {hash}");
        if let Some(a) = gw.http_addr {
            println!("              (also at http://{a}/v1/wt/cert-hash, for serverCertificateHashes)");
        }
    }
    println!("Try:  switchboard sub demo    and    switchboard pub demo hello");
}

async fn run_gateway(cfg: Config, dev: Option<&ListenArgs>) -> anyhow::Result<()> {
    let gw = Gateway::start(cfg).await?;
    match dev {
        Some(_) => banner(&gw),
        None => tracing::info!(
            http = ?gw.http_addr,
            https = ?gw.https_addr,
            mqtt = ?gw.mqtt_addr,
            mqtts = ?gw.mqtts_addr,
            quic = ?gw.quic_addr,
            admin = ?gw.admin_addr,
            storage = ?gw.storage.as_ref().map(|s| s.dir.display().to_string()),
            sync = gw.storage.as_ref().map(|s| s.sync.name()),
            "switchboard serving"
        ),
    }
    tokio::select! {
        () = wait_for_signal() => tracing::info!("shutting down"),
        () = gw.drain_requested() => tracing::info!("shutting down: drain asked for through the admin API"),
    }
    gw.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn print_envelope(env: &switchboard_proto::Envelope, json: bool) {
    if json {
        println!("{}", switchboard_proto::json::encode_message_frame(env));
        return;
    }
    let payload = match std::str::from_utf8(&env.payload) {
        Ok(t) => t.to_string(),
        Err(_) => format!("base64:{}", switchboard_proto::payload::encode_b64(&env.payload)),
    };
    println!("{} {}:{} {}", env.channel, env.epoch, env.serial, payload);
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev { listen, data, nats } => {
            let mut cfg = Config::dev_defaults()?;
            apply_listen(&mut cfg, &listen);
            if let Some(dir) = data {
                cfg.storage.kind = crate::edge::config::StorageKind::Disk;
                cfg.storage.dir = dir;
            }
            if let Some(urls) = nats {
                cfg.engine.kind = crate::edge::config::EngineKind::Nats;
                cfg.nats.servers = urls.split(',').map(|u| u.trim().to_string()).collect();
            }
            for (name, addr) in cfg.listen.all() {
                let name = name.trim_start_matches("listen.");
                if addr.is_empty() {
                    continue;
                }
                let ip: std::net::SocketAddr =
                    addr.parse().map_err(|_| anyhow::anyhow!("--{name} {addr:?} is not IP:PORT"))?;
                if !ip.ip().is_loopback() {
                    anyhow::bail!(
                        "dev mode binds loopback only; --{name} {addr} is not a loopback address (use `serve`)"
                    );
                }
            }
            cfg.validate()?;
            run_gateway(cfg, Some(&listen)).await
        }
        Command::Cert { what: CertCommand::Dev { out, device } } => {
            let f = crate::edge::tls::write_dev_ca(&out, &device, &crate::edge::tls::DEV_NAMES)?;
            println!("Development certificates (never for production) in {}:", out.display());
            println!("  CA (trust this in clients)   {}", f.ca.display());
            println!("  server chain / key           {} / {}", f.server_cert.display(), f.server_key.display());
            println!("  client ({device}) cert / key  {} / {}", f.client_cert.display(), f.client_key.display());
            println!("Use them with:");
            println!("  [tls]");
            println!(
                "  certificates = [{{ cert = {:?}, key = {:?} }}]",
                f.server_cert.display(),
                f.server_key.display()
            );
            println!("  client_ca = {:?}    # for mqtt_client_auth = \"optional\" or \"required\"", f.ca.display());
            Ok(())
        }
        Command::Serve { config } => {
            let cfg = Config::load(&config)?;
            run_gateway(cfg, None).await
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            let engine = match cfg.engine.kind {
                crate::edge::config::EngineKind::Nats => format!("nats {}", cfg.nats.servers.join(",")),
                crate::edge::config::EngineKind::Embedded => "embedded".into(),
            };
            println!(
                "{}: ok (http {}, admin {}, {} channel rules, engine {engine}, {} webhooks)",
                config.display(),
                if cfg.listen.http.is_empty() { "off" } else { &cfg.listen.http },
                if cfg.listen.admin.is_empty() { "off" } else { &cfg.listen.admin },
                cfg.channels.rules.len(),
                cfg.webhooks.len()
            );
            Ok(())
        }
        Command::Pub { channel, data, url, id, via, api_key, qos, retain, cert_hash, insecure } => {
            let payload = read_data(&data)?;
            let via = via.unwrap_or(if url.starts_with("mqtt://") {
                PubVia::Mqtt
            } else if url.starts_with("ws://") || url.starts_with("wss://") {
                PubVia::Ws
            } else {
                PubVia::Rest
            });
            if via == PubVia::Mqtt {
                client::publish_mqtt(&mqtt_url(&url), &channel, payload, qos, retain).await?;
                println!("{channel} published over MQTT (QoS {qos})");
            } else if via == PubVia::Ws || via == PubVia::Wt {
                let ack = if via == PubVia::Wt {
                    let opts = wt_options(&url, cert_hash.as_deref(), insecure)?;
                    client_wt::publish_wt(&opts, &channel, payload, id.as_deref()).await?
                } else {
                    client::publish_ws(&ws_base(&url), &channel, payload, id.as_deref()).await?
                };
                println!(
                    "{} {}:{}{}",
                    ack.channel,
                    ack.epoch,
                    ack.serial,
                    if ack.duplicate { " (duplicate)" } else { "" }
                );
            } else if url.starts_with("http://") || url.starts_with("https://") {
                let ack = client::publish_rest(&url, &channel, payload, id.as_deref(), api_key.as_deref()).await?;
                if retain {
                    eprintln!("note: --retain applies to --via mqtt; REST publishes retain with a JSON body");
                }
                let dup = ack["duplicate"].as_bool().unwrap_or(false);
                println!(
                    "{} {}:{}{}",
                    ack["channel"].as_str().unwrap_or(""),
                    ack["epoch"].as_str().unwrap_or(""),
                    ack["serial"],
                    if dup { " (duplicate)" } else { "" }
                );
            } else {
                anyhow::bail!("--url must start with http://, https://, ws:// or wss://");
            }
            Ok(())
        }
        Command::Sub { filter, via, url, rewind, count, json, cert_hash, insecure } => {
            let mut seen = 0u64;
            let on_event = |ev| match ev {
                SubEvent::Message(env) => {
                    print_envelope(&env, json);
                    seen += 1;
                    count.is_none_or(|c| seen < c)
                }
                SubEvent::Gap(g) => {
                    eprintln!("gap on {}: history no longer holds what was missed ({})", g.channel, g.reason);
                    true
                }
                SubEvent::Subscribed(s) => {
                    eprintln!("subscribed to {}", s.filter);
                    true
                }
                SubEvent::Reconnecting(why) => {
                    eprintln!("reconnecting: {why}");
                    true
                }
            };
            match via {
                Via::Ws => client::subscribe_ws(&ws_base(&url), &filter, rewind, on_event).await?,
                Via::Sse => client::subscribe_sse(&http_base(&url), &filter, rewind, on_event).await?,
                Via::Poll => client::subscribe_poll(&http_base(&url), &filter, rewind, on_event).await?,
                Via::Mqtt => client::subscribe_mqtt(&mqtt_url(&url), &filter, on_event).await?,
                Via::Wt => {
                    let opts = wt_options(&url, cert_hash.as_deref(), insecure)?;
                    client_wt::subscribe_wt(&opts, &filter, rewind, on_event).await?
                }
            }
            Ok(())
        }
        Command::Bench(args) => crate::tooling::bench::run(args).await,
        Command::Token { config, sub, caps, ttl, kid } => {
            // Only the keys matter here: no exposure check, no listeners.
            let text = std::fs::read_to_string(&config)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.display()))?;
            let cfg = Config::from_toml(&text, std::env::vars())?;
            let key = cfg
                .auth
                .keys
                .iter()
                .find(|k| match &kid {
                    Some(want) => k.kid.as_deref() == Some(want.as_str()),
                    None => k.alg == "HS256",
                })
                .ok_or_else(|| anyhow::anyhow!("no matching HS256 key in [[auth.keys]] of {}", config.display()))?;
            let ttl = crate::edge::config::parse_duration(&ttl).map_err(|e| anyhow::anyhow!(e))?;
            let mut claim = std::collections::BTreeMap::new();
            for c in &caps {
                let (pattern, ops) = crate::core::auth::parse_cap_arg(c)?;
                claim.insert(pattern, ops);
            }
            let now = (crate::core::router::now_ms() / 1000) as u64;
            println!("{}", crate::core::auth::mint(key, &sub, &claim, ttl.as_secs(), now)?);
            Ok(())
        }
    }
}
