//! TLS at the edge: one certificate store shared by HTTPS, MQTTS and QUIC.
//!
//! One rustls (0.23) and one crypto provider, aws-lc-rs, whose default key
//! exchange prefers the post-quantum hybrid X25519MLKEM768 where the client
//! offers it. [`TlsState`] owns:
//!
//! - a [`CertStore`], the certificate resolver every listener's rustls
//!   configuration points at. The first configured certificate is the
//!   default; the others are chosen by SNI against their DNS names. In `dev`
//!   with no certificate configured, the store holds a freshly generated
//!   ECDSA P-256 self-signed certificate valid for 14 days (browsers accept
//!   such a certificate for WebTransport by its hash).
//! - the MQTTS configuration, optionally verifying client certificates
//!   against `tls.client_ca` (mTLS); a verified certificate's subject
//!   common name becomes the MQTT client id.
//!
//! Hot reload: the files are polled every `tls.reload_interval` and re-read
//! on SIGHUP. A reload swaps what new handshakes see; connections already
//! open keep their session. A reload that fails (a half-written file, a key
//! that does not match its certificate) is logged and the previous
//! certificates stay in service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::edge::config::{ClientAuth, TlsSection};

/// Why TLS could not be set up or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Certificates are needed but none is configured.
    #[error(
        "the HTTPS, MQTTS and QUIC listeners need a certificate: set [[tls.certificates]] cert and key \
         (see certs/README.md)"
    )]
    NoCertificate,
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// The crypto provider of the whole process.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes aws-lc-rs the process default, for libraries that ask rustls for
/// it (idempotent).
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// One certificate chain with its key and the names it serves.
#[derive(Debug)]
struct Entry {
    names: Vec<String>,
    /// The leaf's notAfter, Unix seconds.
    not_after: i64,
    key: Arc<CertifiedKey>,
}

/// The certificates new handshakes see, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl CertStore {
    fn new(entries: Vec<Entry>) -> CertStore {
        CertStore { entries: RwLock::new(Arc::new(entries)) }
    }

    fn replace(&self, entries: Vec<Entry>) {
        *self.entries.write() = Arc::new(entries);
    }

    /// The certificate a client asking for `sni` gets (the default without
    /// SNI or when no name matches).
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.read().clone();
        let chosen = sni
            .and_then(|name| entries.iter().find(|e| e.names.iter().any(|n| name_matches(n, name))))
            .or_else(|| entries.first());
        chosen.map(|e| e.key.clone())
    }

    /// DER of the default certificate's leaf.
    fn default_leaf(&self) -> Option<CertificateDer<'static>> {
        self.entries.read().first().and_then(|e| e.key.cert.first().cloned())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// Whether a certificate name (`example.com`, `*.example.com`) covers the
/// requested server name; case-insensitive, a wildcard covers one label.
fn name_matches(cert_name: &str, sni: &str) -> bool {
    match cert_name.strip_prefix("*.") {
        Some(suffix) => {
            sni.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        }
        None => cert_name.eq_ignore_ascii_case(sni),
    }
}

/// The DNS names (SAN, else the subject CN) a leaf certificate serves.
fn dns_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else { return Vec::new() };
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string));
    }
    names
}

/// A certificate's notAfter, Unix seconds (0 if unreadable).
fn not_after(leaf: &CertificateDer<'_>) -> i64 {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(leaf.as_ref()).map_or(0, |(_, c)| c.validity().not_after.timestamp())
}

/// Publishes each certificate's expiry as a gauge and warns about those
/// that expire within a week.
fn report_expiry(entries: &[Entry]) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    for e in entries {
        let name = e.names.first().cloned().unwrap_or_default();
        metrics::gauge!("switchboard_tls_certificate_expiry_seconds", "name" => name.clone()).set(e.not_after as f64);
        let left = e.not_after - now;
        if left < 7 * 86_400 {
            tracing::warn!(certificate = %name, seconds_left = left, "TLS certificate expires within a week");
        }
    }
}

/// The subject common name of a verified client certificate: the MQTT
/// client id of a device authenticated by mTLS. `Err` names why the
/// certificate cannot serve as an identity.
pub fn client_identity(leaf: &CertificateDer<'_>) -> Result<String, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| "the client certificate's subject has no UTF-8 common name".to_string())?;
    // The id is substituted into capability patterns: it must not be able to
    // widen them.
    if cn.is_empty() || cn.len() > 256 || cn.contains(['+', '#', '/', '\0']) || cn.starts_with('$') {
        return Err(format!("client certificate common name {cn:?} is not usable as a client id"));
    }
    Ok(cn.to_string())
}

/// Reads a PEM chain and key and checks that they belong together.
fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Entry, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_err(cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_path, e))?;
    if chain.is_empty() {
        return Err(file_err(cert_path, "no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_err(key_path, e))?;
    certified(chain, key).map_err(|e| file_err(key_path, e))
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Entry, String> {
    let signing = provider().key_provider.load_private_key(key).map_err(|e| format!("unusable private key: {e}"))?;
    let key = CertifiedKey::new(chain, signing);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(format!("the key does not match the certificate: {e}")),
    }
    let names = key.cert.first().map(dns_names).unwrap_or_default();
    let not_after = key.cert.first().map(not_after).unwrap_or_default();
    Ok(Entry { names, not_after, key: Arc::new(key) })
}

/// Sessions cached for TLS resumption on one listener (never shared: a
/// session made without a client certificate must not resume where one is
/// required), forgotten whenever the certificates are reloaded: a client
/// must not skip the new certificate by resuming a session made under the
/// old one.
#[derive(Debug)]
struct Resumption {
    cache: RwLock<Arc<rustls::server::ServerSessionMemoryCache>>,
}

/// Sessions the cache holds at most (per reload).
const RESUMPTION_CACHE: usize = 4096;

impl Resumption {
    fn new() -> Resumption {
        Resumption { cache: RwLock::new(rustls::server::ServerSessionMemoryCache::new(RESUMPTION_CACHE)) }
    }

    fn forget_all(&self) {
        *self.cache.write() = rustls::server::ServerSessionMemoryCache::new(RESUMPTION_CACHE);
    }

    fn current(&self) -> Arc<rustls::server::ServerSessionMemoryCache> {
        self.cache.read().clone()
    }
}

impl rustls::server::StoresServerSessions for Resumption {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.current().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A generated self-signed certificate.
pub struct Generated {
    /// PEM of the certificate.
    pub cert_pem: String,
    /// PEM of the private key.
    pub key_pem: String,
    /// DER of the certificate.
    pub cert_der: CertificateDer<'static>,
    /// DER of the private key (PKCS#8).
    pub key_der: Vec<u8>,
}

/// Longest validity Chromium accepts for `serverCertificateHashes`.
pub const DEV_VALIDITY: Duration = Duration::from_secs(14 * 86_400);

fn validity(params: &mut rcgen::CertificateParams, total: Duration) {
    // Back-dated an hour for clock skew; the whole span stays within `total`.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = params.not_before + time::Duration::try_from(total).unwrap_or(time::Duration::DAY);
}

/// The names development certificates serve.
pub const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A fresh ECDSA P-256 self-signed certificate for localhost, 127.0.0.1 and
/// ::1, valid 14 days: what `dev` serves when no certificate is configured.
pub fn generate_self_signed() -> Result<Generated, TlsError> {
    let rc = |e: rcgen::Error| TlsError::Rustls(format!("generating a certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
    let mut params = rcgen::CertificateParams::new(DEV_NAMES.map(String::from).to_vec()).map_err(rc)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "switchboard dev");
    validity(&mut params, DEV_VALIDITY);
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok(Generated {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    })
}

/// Files written by `switchboard cert dev`.
#[derive(Debug)]
pub struct DevFiles {
    /// The development CA certificate (trust it in clients).
    pub ca: PathBuf,
    /// The server leaf chain (leaf, then CA).
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// A client certificate for mTLS (subject CN = the device id).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Writes a development CA, a server leaf for `server_names` (usually
/// [`DEV_NAMES`]; 14 days, so usable with `serverCertificateHashes` too) and
/// a client certificate with common name `device` into `dir`. Never for
/// production.
pub fn write_dev_ca(dir: &Path, device: &str, server_names: &[&str]) -> Result<DevFiles, TlsError> {
    let rc = |e: rcgen::Error| TlsError::Rustls(format!("generating a certificate: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Switchboard development CA (never for production)");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, Duration::from_secs(365 * 86_400));
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let leaf = |names: Vec<String>, cn: &str, client: bool| -> Result<(String, String), TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = rcgen::CertificateParams::new(names).map_err(rc)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        validity(&mut params, DEV_VALIDITY);
        let cert = params.signed_by(&key, &issuer).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let names: Vec<String> = server_names.iter().map(|n| n.to_string()).collect();
    let cn = names.first().cloned().unwrap_or_else(|| "localhost".into());
    let (server_pem, server_key) = leaf(names, &cn, false)?;
    let (client_pem, client_key) = leaf(Vec::new(), device, true)?;

    let files = DevFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    let write = |path: &Path, text: &str, secret: bool| -> Result<(), TlsError> {
        std::fs::write(path, text).map_err(|e| file_err(path, e))?;
        if secret {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| file_err(path, e))?;
        }
        Ok(())
    };
    write(&files.ca, &ca_cert.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    write(&files.server_cert, &format!("{server_pem}{}", ca_cert.pem()), false)?;
    write(&files.server_key, &server_key, true)?;
    write(&files.client_cert, &client_pem, false)?;
    write(&files.client_key, &client_key, true)?;
    Ok(files)
}

/// Lowercase hex SHA-256 of a certificate (what `serverCertificateHashes`
/// and `GET /v1/wt/cert-hash` carry).
pub fn cert_sha256(der: &CertificateDer<'_>) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Hex of bytes, `aa:bb:...` without separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Modification stamp of a watched file.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// TLS for every listener, with hot reload.
pub struct TlsState {
    store: Arc<CertStore>,
    /// Session caches of HTTPS, MQTTS and QUIC.
    resumption: [Arc<Resumption>; 3],
    settings: TlsSection,
    /// The MQTTS configuration (rebuilt when the client CA changes).
    mqtts: RwLock<Arc<ServerConfig>>,
    https: Arc<ServerConfig>,
    /// Whether the certificate was generated (dev) rather than read.
    generated: bool,
    stamps: parking_lot::Mutex<Vec<(PathBuf, Stamp)>>,
    /// The file state of the last failed reload (to log each failure once).
    failed: parking_lot::Mutex<Option<Vec<(PathBuf, Stamp)>>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("generated", &self.generated).finish_non_exhaustive()
    }
}

impl TlsState {
    /// Loads the configured certificates; with none configured, `dev`
    /// generates a self-signed one and `serve` fails.
    pub fn new(settings: &TlsSection, dev: bool) -> Result<Arc<TlsState>, TlsError> {
        let (entries, generated) = if settings.certificates.is_empty() {
            if !dev {
                return Err(TlsError::NoCertificate);
            }
            let g = generate_self_signed()?;
            let key = PrivateKeyDer::Pkcs8(g.key_der.into());
            (vec![certified(vec![g.cert_der], key).map_err(TlsError::Rustls)?], true)
        } else {
            (load_entries(settings)?, false)
        };
        if !generated {
            report_expiry(&entries);
        }
        let store = Arc::new(CertStore::new(entries));
        let resumption = [(); 3].map(|()| Arc::new(Resumption::new()));
        let [https_sessions, mqtts_sessions, _] = &resumption;
        let https = Arc::new(server_config(&store, https_sessions, None, &[b"h2", b"http/1.1"])?);
        let mqtts = Arc::new(server_config(&store, mqtts_sessions, client_verifier(settings)?, &[])?);
        let state = TlsState {
            store,
            resumption,
            settings: settings.clone(),
            mqtts: RwLock::new(mqtts),
            https,
            generated,
            stamps: parking_lot::Mutex::new(Vec::new()),
            failed: parking_lot::Mutex::new(None),
        };
        *state.stamps.lock() = state.watched().into_iter().map(|p| (p.clone(), stamp(&p))).collect();
        Ok(Arc::new(state))
    }

    fn watched(&self) -> Vec<PathBuf> {
        let s = &self.settings;
        let mut files: Vec<PathBuf> =
            s.certificates.iter().flat_map(|c| [PathBuf::from(&c.cert), PathBuf::from(&c.key)]).collect();
        if !s.client_ca.is_empty() {
            files.push(PathBuf::from(&s.client_ca));
        }
        files
    }

    /// The HTTPS configuration (ALPN h2, http/1.1).
    pub fn https_config(&self) -> Arc<ServerConfig> {
        self.https.clone()
    }

    /// The MQTTS configuration (client certificates per `tls.mqtt_client_auth`).
    pub fn mqtts_config(&self) -> Arc<ServerConfig> {
        self.mqtts.read().clone()
    }

    /// A configuration for QUIC (TLS 1.3, ALPN h3) over the same
    /// certificates: WebTransport's listener.
    pub fn quic_config(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.store.clone());
        cfg.session_storage = self.resumption[2].clone();
        cfg.alpn_protocols = vec![b"h3".to_vec()];
        Ok(cfg)
    }

    /// SHA-256 of the default certificate (what a page passes in
    /// `serverCertificateHashes`; browsers accept it only for an ECDSA
    /// certificate valid at most 14 days, such as the one `dev` generates).
    pub fn cert_hash(&self) -> Option<[u8; 32]> {
        self.store.default_leaf().map(|der| cert_sha256(&der))
    }

    /// Whether the certificate was generated at start (dev).
    pub fn is_generated(&self) -> bool {
        self.generated
    }

    /// Re-reads every file. On error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        if self.generated {
            return Ok(());
        }
        let entries = load_entries(&self.settings)?;
        let mqtts = server_config(&self.store, &self.resumption[1], client_verifier(&self.settings)?, &[])?;
        report_expiry(&entries);
        self.store.replace(entries);
        for sessions in &self.resumption {
            sessions.forget_all();
        }
        *self.mqtts.write() = Arc::new(mqtts);
        Ok(())
    }

    /// Whether a watched file changed since the last successful load.
    fn changed(&self) -> bool {
        self.stamps.lock().iter().any(|(p, s)| stamp(p) != *s)
    }

    fn reload_and_log(&self, why: &'static str) {
        let fresh: Vec<(PathBuf, Stamp)> = self.watched().into_iter().map(|p| (p.clone(), stamp(&p))).collect();
        match self.reload() {
            Ok(()) => {
                *self.stamps.lock() = fresh;
                *self.failed.lock() = None;
                metrics::counter!("switchboard_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(trigger = why, "TLS certificates reloaded");
            }
            Err(e) => {
                // The stamps stay: the next tick retries (a file may still be
                // being written), logging again only when the files change.
                let mut failed = self.failed.lock();
                if failed.as_ref() != Some(&fresh) || why == "SIGHUP" {
                    metrics::counter!("switchboard_tls_reloads_total", "result" => "error").increment(1);
                    tracing::warn!(trigger = why, error = %e, "TLS reload failed; the previous certificates stay in service");
                }
                *failed = Some(fresh);
            }
        }
    }

    /// Polls the files every `tls.reload_interval` (when non-zero) and
    /// reloads on change or SIGHUP, until shutdown.
    pub fn spawn_reloader(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let interval = state.settings.reload_interval;
            let mut tick = tokio::time::interval(if interval.is_zero() { Duration::from_secs(3600) } else { interval });
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if !interval.is_zero() && !state.generated && state.changed() {
                            state.reload_and_log("file change");
                        }
                    }
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        if state.generated {
                            tracing::info!("SIGHUP: the dev certificate is generated at start; nothing to reload");
                        } else {
                            state.reload_and_log("SIGHUP");
                        }
                    }
                    _ = shutdown.changed() => break,
                }
            }
        })
    }
}

fn load_entries(settings: &TlsSection) -> Result<Vec<Entry>, TlsError> {
    settings.certificates.iter().map(|c| load_pair(Path::new(&c.cert), Path::new(&c.key))).collect()
}

fn client_verifier(s: &TlsSection) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsError> {
    if s.mqtt_client_auth == ClientAuth::None {
        return Ok(None);
    }
    let path = Path::new(&s.client_ca);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
        roots.add(cert.map_err(|e| file_err(path, e))?).map_err(|e| file_err(path, e))?;
    }
    if roots.is_empty() {
        return Err(file_err(path, "no CA certificate"));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if s.mqtt_client_auth == ClientAuth::Optional { builder.allow_unauthenticated() } else { builder };
    builder.build().map(Some).map_err(|e| TlsError::Rustls(format!("client CA {}: {e}", path.display())))
}

fn server_config(
    store: &Arc<CertStore>,
    resumption: &Arc<Resumption>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(store.clone());
    cfg.session_storage = resumption.clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_cover_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "A.EXAMPLE.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("example.com", "EXAMPLE.COM"));
        assert!(!name_matches("example.com", "www.example.com"));
    }

    #[test]
    fn generated_certificate_serves_loopback_for_at_most_14_days() {
        let g = generate_self_signed().unwrap();
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(g.cert_der.as_ref()).unwrap();
        let v = cert.validity();
        let span = v.not_after.timestamp() - v.not_before.timestamp();
        assert!(span <= 14 * 86_400, "validity {span}s");
        assert!(v.is_valid());
        assert_eq!(dns_names(&g.cert_der), vec!["localhost".to_string()]);
        let entry = certified(vec![g.cert_der.clone()], PrivateKeyDer::Pkcs8(g.key_der.into())).unwrap();
        assert_eq!(entry.names, vec!["localhost".to_string()]);
    }

    #[test]
    fn a_key_from_another_certificate_is_refused() {
        let a = generate_self_signed().unwrap();
        let b = generate_self_signed().unwrap();
        let err = certified(vec![a.cert_der], PrivateKeyDer::Pkcs8(b.key_der.into())).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn sni_picks_by_name_and_falls_back_to_the_first() {
        let mk = |names: &[&str]| {
            let g = generate_self_signed().unwrap();
            let mut e = certified(vec![g.cert_der], PrivateKeyDer::Pkcs8(g.key_der.into())).unwrap();
            e.names = names.iter().map(|s| s.to_string()).collect();
            e
        };
        let a = mk(&["a.example"]);
        let b = mk(&["*.b.example"]);
        let (ka, kb) = (a.key.clone(), b.key.clone());
        let store = CertStore::new(vec![a, b]);
        assert!(Arc::ptr_eq(&store.pick(Some("x.b.example")).unwrap(), &kb));
        assert!(Arc::ptr_eq(&store.pick(Some("a.example")).unwrap(), &ka));
        assert!(Arc::ptr_eq(&store.pick(Some("other")).unwrap(), &ka));
        assert!(Arc::ptr_eq(&store.pick(None).unwrap(), &ka));
    }

    #[test]
    fn client_identity_refuses_names_that_would_widen_caps() {
        let dir = std::env::temp_dir().join(format!("sb-tls-unit-{}", std::process::id()));
        let files = write_dev_ca(&dir, "sensor-7", &DEV_NAMES).unwrap();
        let pem = std::fs::read(&files.client_cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(client_identity(&der).unwrap(), "sensor-7");
        for bad in ["+", "a/#", "$sys"] {
            let files = write_dev_ca(&dir, bad, &DEV_NAMES).unwrap();
            let der = CertificateDer::from_pem_slice(&std::fs::read(&files.client_cert).unwrap()).unwrap();
            assert!(client_identity(&der).is_err(), "{bad}");
        }
        // The written server pair loads and matches.
        let entry = load_pair(&files.server_cert, &files.server_key).unwrap();
        assert_eq!(entry.key.cert.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
