//! Writes bounded by a timeout without a timer per write.
//!
//! Every front end bounds its writes (`write_timeout`): a peer that stops
//! reading must not hold a connection's task forever. A `tokio::time::timeout`
//! around each write arms a timer in the runtime's timer wheel and removes it
//! again, two trips through the timer driver per delivery, although nearly
//! every write completes at its first poll because the socket takes the bytes
//! at once. [`within`] polls the write once first and arms a timer only for
//! a write that has to wait; that timer is boxed, so the wait does not grow
//! the future every idle connection holds.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

pub use tokio::time::error::Elapsed;

/// Runs `write` to completion within `limit`: `Err(Elapsed)` if it takes
/// longer. Takes the write pinned by the caller so that it is stored once.
pub async fn within<F: Future>(limit: Duration, mut write: Pin<&mut F>) -> Result<F::Output, Elapsed> {
    // One poll with this task's waker: a write that must wait is woken
    // as usual, and continues under the timer below. (Not bound to a
    // local: its output would take room in the future across the wait.)
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return Ok(out);
    }
    Box::pin(tokio::time::timeout(limit, write)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_write_needs_no_timer_and_a_stuck_one_times_out() {
        // Zero limit: only a write that completes at its first poll succeeds.
        let ready = std::pin::pin!(async { 7 });
        assert_eq!(within(Duration::ZERO, ready).await.ok(), Some(7));
        let stuck = std::pin::pin!(std::future::pending::<()>());
        assert!(within(Duration::from_millis(20), stuck).await.is_err());
    }

    #[tokio::test]
    async fn a_write_that_waits_finishes_within_the_limit() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let waits = std::pin::pin!(async { rx.await.ok() });
        // On this single-threaded runtime the sender runs only once `within`
        // yields, so the first poll is always pending.
        let sender = tokio::spawn(async move {
            let _ = tx.send(3);
        });
        assert_eq!(within(Duration::from_secs(5), waits).await.ok(), Some(Some(3)));
        sender.await.expect("sender");
    }
}
