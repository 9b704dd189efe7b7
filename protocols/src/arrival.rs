//! When bytes reached a connection: the instant the runtime woke the
//! connection's read, before the task ran.
//!
//! Two connections whose bytes arrive together are woken in arrival order,
//! but the runtime may run the second task first (tokio's LIFO slot runs
//! the most recently woken task next). A front end that stamps a request
//! with the moment its read was woken, rather than the moment it got to
//! decode it, can tell the core which of two racing requests came first:
//! `Core::subscribe_arrived` uses it so that a SUBSCRIBE is in effect for
//! every publish that reached the gateway after it did (#13 item 18).
//!
//! [`ArrivalClock::stamped`] polls a read future with a waker of its own that
//! records the first wake since the last [`ArrivalClock::read_done`] and then
//! wakes the task. A read that completes without having waited (its bytes
//! came while the task was busy, so nothing was woken) is stamped with the
//! end of the read before it (or the clock's creation): its bytes came
//! after that unless the previous read left some on the socket. So a
//! publish that raced the request is not missed, and at most what was
//! accepted while the connection was busy with its previous bytes counts
//! as later too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::task::{ArcWake, AtomicWaker, waker_ref};

use crate::port::mono_ns;

/// Records when a connection's read was woken; see the module docs. One
/// pointer in the connection (every idle connection holds one).
pub struct ArrivalClock {
    inner: Arc<Inner>,
}

struct Inner {
    task: AtomicWaker,
    /// The first wake since the last take, in [`mono_ns`]; 0: none.
    woke_ns: AtomicU64,
    /// The end of the last read (or the clock's creation), [`mono_ns`].
    last_ns: AtomicU64,
    /// When the bytes of the last read arrived, [`mono_ns`].
    arrived_ns: AtomicU64,
}

impl ArcWake for Inner {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        let _ = arc_self.woke_ns.compare_exchange(0, mono_ns(), Ordering::Relaxed, Ordering::Relaxed);
        arc_self.task.wake();
    }
}

impl Default for ArrivalClock {
    fn default() -> Self {
        let now = mono_ns();
        let inner = Inner {
            task: AtomicWaker::new(),
            woke_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(now),
            arrived_ns: AtomicU64::new(now),
        };
        ArrivalClock { inner: Arc::new(inner) }
    }
}

impl ArrivalClock {
    /// `read`, noting when the runtime wakes it.
    pub fn stamped<F: Future>(&self, read: F) -> Stamped<'_, F> {
        Stamped { clock: self, read }
    }

    /// Called when a read returned bytes: they arrived at the first wake of
    /// the read since the last call, or, if it did not wait, at the end of
    /// the read before it ([`ArrivalClock::arrived`]).
    pub fn read_done(&self) {
        let i = &self.inner;
        let last = i.last_ns.swap(mono_ns(), Ordering::Relaxed);
        let arrived = match i.woke_ns.swap(0, Ordering::Relaxed) {
            0 => last,
            t => t,
        };
        i.arrived_ns.store(arrived, Ordering::Relaxed);
    }

    /// When the bytes of the last read arrived ([`mono_ns`]).
    pub fn arrived(&self) -> u64 {
        self.inner.arrived_ns.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// A read polled with the clock's waker ([`ArrivalClock::stamped`]).
    pub struct Stamped<'a, F> {
        clock: &'a ArrivalClock,
        #[pin]
        read: F,
    }
}

impl<F: Future> Future for Stamped<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.clock.inner.task.register(cx.waker());
        this.read.poll(&mut Context::from_waker(&waker_ref(&this.clock.inner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_read_that_waited_is_stamped_when_woken_not_when_run() {
        let clock = ArrivalClock::default();
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut buf = [0u8; 8];
        let reader = clock.stamped(a.read(&mut buf));
        let writer = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let before = mono_ns();
            b.write_all(b"x").await.unwrap();
            before
        };
        let (n, written) = tokio::join!(reader, writer);
        assert_eq!(n.unwrap(), 1);
        // A slow task: it ran well after the wake.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let taken_at = mono_ns();
        clock.read_done();
        let arrived = clock.arrived();
        assert!(arrived >= written, "stamped before the bytes were written");
        assert!(arrived + 25_000_000 < taken_at, "stamped when taken, not when woken");
        // A read that did not wait: the end of the one before.
        b.write_all(b"y").await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(clock.stamped(a.read(&mut buf)).await.unwrap(), 1);
        clock.read_done();
        let after = clock.arrived();
        assert!(after >= taken_at && after + 25_000_000 < mono_ns(), "not the end of the previous read");
    }
}
