//! Admission at accept: connections per IP and new connections per second,
//! for the HTTP and MQTT listeners together (the admin listener is exempt).
//!
//! New connections are counted per IP first, then node-wide: an IP over its
//! own rate is refused without spending the node's tokens, so one IP
//! churning connections cannot make the others' connections fail. An IP's
//! rate state is kept while it holds connections and until its bucket has
//! refilled after the last one closed (so closing at once does not reset
//! it); the map of IPs is pruned as it grows.
//!
//! A refused TCP connection never reaches a protocol: an HTTP one gets a
//! minimal `429 Too Many Requests` (with `Retry-After: 1`) and is closed, an
//! MQTT one is closed (no CONNACK: its version is not known yet). Each
//! refusal counts in `switchboard_connections_refused_total{listener,reason}`
//! and logs at debug (a flood must not flood the log too).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::core::router::TokenBucket;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's IP already holds `max_per_ip` connections.
    PerIp,
    /// New connections arrive faster than the node-wide rate.
    Rate,
    /// New connections from this IP arrive faster than its rate.
    IpRate,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PerIp => "per_ip",
            Refusal::Rate => "rate",
            Refusal::IpRate => "ip_rate",
        }
    }
}

/// New-connection rates, per second with a burst (rate 0 = unlimited).
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Node-wide.
    pub rate: f64,
    /// Node-wide burst.
    pub burst: f64,
    /// Per IP.
    pub ip_rate: f64,
    /// Per-IP burst.
    pub ip_burst: f64,
}

/// What admission keeps about one IP.
#[derive(Debug)]
struct IpState {
    open: usize,
    bucket: TokenBucket,
}

/// The IPs admission keeps, and when to prune them next.
#[derive(Debug)]
struct IpMap {
    ips: HashMap<IpAddr, IpState>,
    prune_at: usize,
}

/// The admission state shared by the listeners.
#[derive(Debug)]
pub struct Admission {
    /// 0 = unlimited.
    max_per_ip: usize,
    rates: Rates,
    per_ip: Mutex<IpMap>,
    bucket: Mutex<TokenBucket>,
}

/// Below this many tracked IPs, pruning is not worth a scan.
const PRUNE_FLOOR: usize = 1024;

/// Held for a connection's life; dropping it frees the IP's slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut map = self.admission.per_ip.lock();
        if let Some(st) = map.ips.get_mut(&self.ip) {
            st.open -= 1;
            // Without a per-IP rate there is nothing to remember.
            if st.open == 0 && self.admission.rates.ip_rate <= 0.0 {
                map.ips.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// `max_per_ip` connections per IP (0 = unlimited) and the
    /// new-connection `rates`.
    pub fn new(max_per_ip: usize, rates: Rates) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Admission {
            max_per_ip,
            rates,
            per_ip: Mutex::new(IpMap { ips: HashMap::new(), prune_at: PRUNE_FLOOR }),
            bucket: Mutex::new(TokenBucket::new(rates.rate, rates.burst, now)),
        })
    }

    /// Admits a connection from `ip` at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let mut map = self.per_ip.lock();
        if map.ips.len() >= map.prune_at {
            self.prune(&mut map, now);
        }
        let rates = self.rates;
        let st = map
            .ips
            .entry(ip)
            .or_insert_with(|| IpState { open: 0, bucket: TokenBucket::new(rates.ip_rate, rates.ip_burst, now) });
        let refused = if self.max_per_ip > 0 && st.open >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else if !st.bucket.take(now) {
            Some(Refusal::IpRate)
        } else if !self.bucket.lock().take(now) {
            Some(Refusal::Rate)
        } else {
            None
        };
        if let Some(r) = refused {
            if st.open == 0 && rates.ip_rate <= 0.0 {
                map.ips.remove(&ip);
            }
            return Err(r);
        }
        st.open += 1;
        Ok(Ticket { admission: self.clone(), ip })
    }

    /// Forgets IPs with no connection whose bucket has refilled (they would
    /// start afresh anyway), and sets the next pruning point.
    fn prune(&self, map: &mut IpMap, now: Instant) {
        let refill = if self.rates.ip_rate > 0.0 { self.rates.ip_burst / self.rates.ip_rate } else { 0.0 };
        map.ips.retain(|_, st| st.open > 0 || st.bucket.idle_for(now).as_secs_f64() < refill);
        map.prune_at = (map.ips.len() * 2).max(PRUNE_FLOOR);
    }

    /// IPs admission keeps now (for tests and the admin API).
    pub fn tracked_ips(&self) -> usize {
        self.per_ip.lock().ips.len()
    }
}

/// What a refused HTTP connection is told before it is closed.
pub const HTTP_REFUSAL: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_ip_slots_are_freed_on_drop() {
        let a = Admission::new(2, Rates { rate: 0.0, burst: 0.0, ip_rate: 0.0, ip_burst: 0.0 });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let one = a.admit(ip, t0).unwrap();
        let _two = a.admit(ip, t0).unwrap();
        assert_eq!(a.admit(ip, t0).unwrap_err(), Refusal::PerIp);
        let _elsewhere = a.admit(other, t0).unwrap();
        drop(one);
        let _three = a.admit(ip, t0).unwrap();
        assert_eq!(a.tracked_ips(), 2);
    }

    #[test]
    fn new_connection_rate() {
        let a = Admission::new(0, Rates { rate: 1.0, burst: 2.0, ip_rate: 0.0, ip_burst: 0.0 });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let _a = a.admit(ip, t0).unwrap();
        let _b = a.admit(ip, t0).unwrap();
        assert_eq!(a.admit(ip, t0).unwrap_err(), Refusal::Rate);
        assert!(a.admit(ip, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(a.tracked_ips(), 1);
    }

    /// One IP over its own rate is refused without spending the node's
    /// tokens: another IP still gets in.
    #[test]
    fn one_ip_churning_does_not_lock_out_the_others() {
        let a = Admission::new(0, Rates { rate: 10.0, burst: 10.0, ip_rate: 2.0, ip_burst: 3.0 });
        let churner: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let mut refused = 0;
        for _ in 0..100 {
            match a.admit(churner, t0) {
                Ok(ticket) => drop(ticket), // connects and closes at once
                Err(r) => {
                    assert_eq!(r, Refusal::IpRate);
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 97, "the churner gets its burst, then refusals");
        for _ in 0..3 {
            assert!(a.admit(other, t0).is_ok(), "the node's bucket still has tokens for others");
        }
        // The churner's state outlives its connections until it refills.
        assert_eq!(a.tracked_ips(), 2);
        assert!(a.admit(churner, t0 + Duration::from_millis(500)).is_ok(), "one token back after 0.5 s");
    }

    /// The map of IPs stays bounded: idle, refilled IPs are pruned.
    #[test]
    fn idle_ips_are_pruned() {
        let a = Admission::new(0, Rates { rate: 0.0, burst: 0.0, ip_rate: 100.0, ip_burst: 100.0 });
        let t0 = Instant::now();
        for i in 0..PRUNE_FLOOR as u32 {
            drop(a.admit(IpAddr::from(i.to_be_bytes()), t0).unwrap());
        }
        assert_eq!(a.tracked_ips(), PRUNE_FLOOR);
        // Two seconds later every bucket has refilled: the next admit prunes.
        let _t = a.admit("192.0.2.1".parse().unwrap(), t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(a.tracked_ips(), 1);
    }
}
