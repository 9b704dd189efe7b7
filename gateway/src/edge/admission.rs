//! Admission at accept: connections per IP and new connections per second,
//! for the HTTP and MQTT listeners together (the admin listener is exempt).
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
    /// New connections arrive faster than the configured rate.
    Rate,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PerIp => "per_ip",
            Refusal::Rate => "rate",
        }
    }
}

/// The admission state shared by the listeners.
#[derive(Debug)]
pub struct Admission {
    /// 0 = unlimited.
    max_per_ip: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    bucket: Mutex<TokenBucket>,
}

/// Held for a connection's life; dropping it frees the IP's slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut map = self.admission.per_ip.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// `max_per_ip` connections per IP (0 = unlimited); `rate` new
    /// connections per second with `burst` (rate 0 = unlimited).
    pub fn new(max_per_ip: usize, rate: f64, burst: f64) -> Arc<Self> {
        Arc::new(Admission {
            max_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            bucket: Mutex::new(TokenBucket::new(rate, burst, Instant::now())),
        })
    }

    /// Admits a connection from `ip` at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let mut map = self.per_ip.lock();
        let n = map.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            if *n == 0 {
                map.remove(&ip);
            }
            return Err(Refusal::PerIp);
        }
        if !self.bucket.lock().take(now) {
            if *n == 0 {
                map.remove(&ip);
            }
            return Err(Refusal::Rate);
        }
        *n += 1;
        Ok(Ticket { admission: self.clone(), ip })
    }

    /// IPs holding connections now (for tests and the admin API).
    pub fn tracked_ips(&self) -> usize {
        self.per_ip.lock().len()
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
        let a = Admission::new(2, 0.0, 0.0);
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
        let a = Admission::new(0, 1.0, 2.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let _a = a.admit(ip, t0).unwrap();
        let _b = a.admit(ip, t0).unwrap();
        assert_eq!(a.admit(ip, t0).unwrap_err(), Refusal::Rate);
        assert!(a.admit(ip, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(a.tracked_ips(), 1);
    }
}
