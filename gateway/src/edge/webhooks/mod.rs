//! Lifecycle webhooks (`[[webhooks]]`, docs/webhooks.md): connect,
//! disconnect, subscribe, unsubscribe, presence enter / update / leave and
//! (opt-in) publish events, POSTed as signed JSON to HTTP endpoints, at
//! least once.
//!
//! The core calls [`Webhooks`] (its [`LifecycleSink`]) where each event
//! happens; each endpoint that takes the event gets it on a bounded queue
//! with `try_send` ([`endpoint`]), so a slow or dead receiver never slows a
//! connection or a publish — past the bound, events are dropped, counted
//! and logged. A worker task per endpoint ([`delivery`]) moves events into
//! its outbox ([`outbox`]; in the store's `webhooks` keyspace too with
//! `[storage] kind = "disk"`, so they survive restarts and SIGKILL), gives
//! each a delivery id and its JSON body once ([`body`]), and POSTs them
//! oldest first, signed ([`signature`]), retrying failures with
//! exponential back-off and full jitter until they are `max_age` old
//! ([`retry`]).
//!
//! What this module does not do: decide what happened (the core does), or
//! guarantee exactly once — a receiver dedupes by the delivery id.

pub mod body;
pub mod delivery;
pub mod endpoint;
pub mod outbox;
pub mod retry;
pub mod signature;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::engine::disk::DiskStore;
use crate::core::lifecycle::{Event, EventKind, Lifecycle, LifecycleSink};
use crate::edge::config::WebhookConfig;
use delivery::{Target, Worker};
use endpoint::Endpoint;
use outbox::Outbox;
use retry::RetryPolicy;

/// The webhook endpoints and their workers.
pub struct Webhooks {
    endpoints: Vec<Arc<Endpoint>>,
    stop: watch::Sender<bool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("Webhooks").field("endpoints", &names).finish_non_exhaustive()
    }
}

impl LifecycleSink for Webhooks {
    fn wants(&self, kind: EventKind, channel: &str) -> bool {
        self.endpoints.iter().any(|e| e.takes(kind, channel))
    }

    fn emit(&self, event: Event) {
        let cost = body::estimate(&event);
        let event = Arc::new(event);
        for e in &self.endpoints {
            if e.takes(event.kind, &event.channel) {
                e.offer(event.clone(), cost);
            }
        }
    }
}

/// The User-Agent of every delivery.
const USER_AGENT: &str = concat!("switchboard/", env!("CARGO_PKG_VERSION"));

impl Webhooks {
    /// Starts a worker per endpoint of `configs` (validated), with the
    /// events `store` kept from before (the store's events of endpoints not
    /// configured now stay on disk, with a `warn` line). `None` when no
    /// webhook is configured.
    pub fn start(
        configs: &[WebhookConfig],
        node: &str,
        store: Option<Arc<DiskStore>>,
    ) -> Result<Option<Arc<Webhooks>>, String> {
        let mut stored: HashMap<String, Vec<(u64, Vec<u8>)>> = HashMap::new();
        if let Some(store) = &store {
            for (name, seq, record) in store.load_webhook_events() {
                stored.entry(name).or_default().push((seq, record));
            }
        }
        let (stop, _) = watch::channel(false);
        let mut endpoints = Vec::new();
        let mut workers = Vec::new();
        for cfg in configs {
            let (endpoint, rx) = Endpoint::new(cfg)?;
            let outbox = Outbox::new(&endpoint.name, store.clone(), stored.remove(&endpoint.name).unwrap_or_default());
            endpoint.count_loaded(outbox.len(), outbox.cost());
            if !outbox.is_empty() {
                tracing::info!(endpoint = %endpoint.name, pending = outbox.len(), "webhook events kept from before the restart");
            }
            let client = reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                // A redirect is an answer that is not 2xx: never followed,
                // so a receiver cannot send the signed body elsewhere.
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(1)
                .build()
                .map_err(|e| format!("webhook {}: cannot build the HTTP client: {e}", endpoint.name))?;
            let target = Target {
                client,
                url: cfg.parsed_url()?,
                secret: cfg.secret.as_bytes().into(),
                retry: RetryPolicy { backoff_min: cfg.backoff_min, backoff_max: cfg.backoff_max, max_age: cfg.max_age },
                node: node.to_string(),
            };
            let worker =
                Worker { endpoint: endpoint.clone(), rx, outbox, target: Arc::new(target), stop: stop.subscribe() };
            workers.push(tokio::spawn(worker.run()));
            endpoints.push(endpoint);
        }
        // Events of endpoints not configured now stay on disk: a start with
        // the list missing (an environment variable left out) must not
        // throw them away; configuring the endpoint again delivers them.
        for (name, events) in stored {
            tracing::warn!(endpoint = %name, pending = events.len(),
                "pending webhook events of an endpoint that is not configured; kept on disk until it is again");
        }
        if endpoints.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Webhooks { endpoints, stop, workers: Mutex::new(workers) })))
    }

    /// The core's handle on these webhooks.
    pub fn lifecycle(self: &Arc<Self>) -> Lifecycle {
        Lifecycle::new(self.clone())
    }

    /// Events accepted and not yet delivered or given up, every endpoint's.
    pub fn pending(&self) -> usize {
        self.endpoints.iter().map(|e| e.depth()).sum()
    }

    /// At shutdown, once the sessions ended: waits at most `flush` for the
    /// pending events to be delivered, then stops the workers (a durable
    /// outbox keeps what is left for the next start).
    pub async fn shutdown(&self, flush: Duration) {
        let deadline = tokio::time::Instant::now() + flush;
        while self.pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.send_replace(true);
        let workers: Vec<_> = self.workers.lock().drain(..).collect();
        for w in workers {
            // A worker only takes its queue into the outbox before it
            // returns; bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
    }
}
