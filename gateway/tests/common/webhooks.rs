//! A webhook receiver for the tests: a real HTTP server (hyper on
//! 127.0.0.1) that records every request and checks its HMAC signature
//! with its own code, not the gateway's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::task::JoinSet;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub path: String,
    pub delivery: String,
    pub event: String,
    pub body: Value,
    pub raw: Bytes,
    /// The signature matched the body under the path's secret, within five
    /// minutes of now.
    pub signed: bool,
    /// The status the receiver answered.
    pub status: u16,
}

/// `hex(HMAC-SHA256(secret, t + "." + body))` against the header, computed
/// here rather than with the gateway's own code.
pub fn signature_ok(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<u64>().ok(),
            Some(("v1", x)) => v1.push(x.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if t.abs_diff(now) > 300 {
        return false;
    }
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = aws_lc_rs::hmac::sign(&key, &signed);
    let want: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    v1.contains(&want)
}

/// A webhook receiver: records every request and answers `status`.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every request, in arrival order.
    pub got: Arc<Mutex<Vec<Got>>>,
    /// What it answers.
    pub status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listens on `on` (a port picked earlier) or a free port; `secrets`
    /// maps request paths to the secret their signatures use.
    pub async fn start(on: Option<SocketAddr>, secrets: &[(&str, &str)]) -> Receiver {
        let listener = tokio::net::TcpListener::bind(on.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let secrets: Arc<HashMap<String, String>> =
            Arc::new(secrets.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect());
        let (g, st) = (got.clone(), status.clone());
        let task = tokio::spawn(async move {
            // Connections live in the set: stopping the receiver drops
            // them too, keep-alive ones included.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (g, st, secrets) = (g.clone(), st.clone(), secrets.clone());
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (g, st, secrets) = (g.clone(), st.clone(), secrets.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let header = |n: &str| {
                            req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                        };
                        let (delivery, event, sig) = (
                            header("switchboard-delivery"),
                            header("switchboard-event"),
                            header("switchboard-signature"),
                        );
                        let raw = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let signed = secrets.get(&path).is_some_and(|s| signature_ok(s, &sig, &raw));
                        let status = st.load(Ordering::SeqCst);
                        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                        g.lock().push(Got { path, delivery, event, body, raw, signed, status });
                        let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Receiver { addr, got, status, task }
    }

    /// The requests answered 2xx on `path`.
    pub fn delivered(&self, path: &str) -> Vec<Got> {
        self.got.lock().iter().filter(|g| g.path == path && g.status < 300).cloned().collect()
    }

    /// Closes the port and every connection.
    pub fn stop(self) {
        self.task.abort();
    }
}
