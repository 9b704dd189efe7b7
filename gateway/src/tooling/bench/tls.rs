//! TLS for the bench's TCP clients (`--url https://…`, `--mqtt-url
//! mqtts://…`): a local shim that terminates the client side in the bench
//! process, and the handshake figures of the run.
//!
//! The bench's clients (rumqttc, tokio-tungstenite, reqwest) stay as they
//! are and connect in plain TCP to a listener on 127.0.0.1 that the bench
//! opens; each connection it accepts becomes one TLS connection (rustls,
//! aws-lc-rs) to the server, and bytes are copied both ways. Why not TLS in
//! each client: rumqttc's TLS brings a second crypto provider (`ring`,
//! through rustls-webpki's defaults) into a tree that must have one, and
//! one shim serves every protocol the same way, peers included. What it
//! costs: the server sees exactly the TLS connections a client would make
//! (the figures this bench reports are the server's), while the bench pays
//! one more loopback hop and a copy per message, which adds to its own CPU
//! and to the latency it measures (tens of microseconds; compare TLS runs
//! with TLS runs).
//!
//! Figures: every handshake is timed from the TCP connect to the end of
//! the TLS handshake and classified full or resumed (TLS 1.3 tickets,
//! TLS 1.2 session ids; `--tls-resumption off` disables them). The report
//! gets their count, percentiles and rate ([`figures`]).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};

use super::BenchError;

/// How the bench's TLS clients check the server and resume sessions.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM bundle of CAs to trust; empty: `insecure` must be set.
    pub ca: Option<std::path::PathBuf>,
    /// Accept any server certificate (dev's generated one).
    pub insecure: bool,
    /// Resume sessions (tickets, session ids) on reconnects.
    pub resumption: bool,
}

impl TlsOptions {
    /// The rustls client configuration these options describe.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, BenchError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| BenchError::Usage(format!("TLS: {e}")))?;
        let mut config = match (&self.ca, self.insecure) {
            (_, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
            (Some(path), false) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| BenchError::Usage(format!("--ca {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(BenchError::Usage(format!("--ca {}: no certificate in it", path.display())));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, false) => {
                return Err(BenchError::Usage(
                    "a TLS target needs --ca FILE, or --insecure for dev's generated certificate".into(),
                ));
            }
        };
        if !self.resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

/// Accepts any certificate (signatures are still checked): `--insecure`,
/// for `switchboard dev`'s certificate, generated at each start.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One handshake.
#[derive(Debug, Clone, Copy)]
struct Handshake {
    started: Instant,
    took: Duration,
    resumed: bool,
    /// The server chose HTTP/2 (ALPN h2).
    h2: bool,
}

/// Every handshake of the run, and the failures.
#[derive(Default)]
struct Stats {
    done: Vec<Handshake>,
    failed: u64,
}

fn stats() -> &'static Mutex<Stats> {
    static STATS: OnceLock<Mutex<Stats>> = OnceLock::new();
    STATS.get_or_init(Mutex::default)
}

/// The TLS figures of the run so far, if it made any TLS connection.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Of them, full handshakes.
    pub full: u64,
    /// Of them, resumed sessions.
    pub resumed: u64,
    /// Handshakes that failed (the client's connection was dropped).
    pub failed: u64,
    /// Connections on which the server chose HTTP/2 (ALPN `h2`, `--http2`).
    pub h2: u64,
    /// Median handshake time (TCP connect to TLS established), µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Slowest, µs.
    pub max_us: u64,
    /// Handshakes per second, from the first one's start to the last one's end.
    pub per_sec: f64,
}

/// The figures, or `None` when the run made no TLS connection.
pub fn figures() -> Option<Figures> {
    let s = stats().lock();
    if s.done.is_empty() && s.failed == 0 {
        return None;
    }
    let mut took: Vec<u64> = s.done.iter().map(|h| h.took.as_micros() as u64).collect();
    took.sort_unstable();
    let pct = |p: f64| took.get(((took.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0);
    let first = s.done.iter().map(|h| h.started).min();
    let last = s.done.iter().map(|h| h.started + h.took).max();
    let span = first.zip(last).map_or(0.0, |(a, b)| b.duration_since(a).as_secs_f64());
    let resumed = s.done.iter().filter(|h| h.resumed).count() as u64;
    let n = s.done.len() as u64;
    Some(Figures {
        handshakes: n,
        full: n - resumed,
        resumed,
        failed: s.failed,
        h2: s.done.iter().filter(|h| h.h2).count() as u64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: took.last().copied().unwrap_or(0),
        per_sec: if span > 0.0 { n as f64 / span } else { 0.0 },
    })
}

/// Starts a shim for `upstream` (`host:port`, a TLS listener): returns the
/// local plain-TCP address the bench's clients connect to instead. It runs
/// until the process ends. `sources` binds each upstream connection to the
/// next source address (`--src-addrs`), as the clients' own would be.
pub async fn shim(
    upstream: &str,
    config: Arc<ClientConfig>,
    sources: Arc<dyn Fn() -> Option<std::net::IpAddr> + Send + Sync>,
) -> Result<SocketAddr, BenchError> {
    let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| BenchError::Usage(format!("{upstream}: not a TLS server name")))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let upstream = upstream.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { continue };
            let _ = client.set_nodelay(true);
            let (connector, name, upstream, src) = (connector.clone(), name.clone(), upstream.clone(), sources());
            tokio::spawn(async move {
                let started = Instant::now();
                let tls = async {
                    let tcp = super::clients::tcp_connect(&upstream, src).await?;
                    Ok::<_, BenchError>(connector.connect(name, tcp).await?)
                };
                match tokio::time::timeout(super::clients::HANDSHAKE_TIMEOUT, tls).await {
                    Ok(Ok(mut tls)) => {
                        let conn = tls.get_ref().1;
                        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
                        let h2 = conn.alpn_protocol() == Some(b"h2");
                        stats().lock().done.push(Handshake { started, took: started.elapsed(), resumed, h2 });
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut tls).await;
                    }
                    Ok(Err(e)) => {
                        stats().lock().failed += 1;
                        tracing::warn!(error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        stats().lock().failed += 1;
                        tracing::warn!("TLS handshake timed out");
                    }
                }
            });
        }
    });
    Ok(local)
}
