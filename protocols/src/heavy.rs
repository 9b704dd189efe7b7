//! Requests whose answer takes a worker thread for a long while — a history
//! page of up to a MiB, encoded for one client — run a few at a time
//! node-wide (half the cores, at least one). The others wait for a turn
//! without holding a worker, so however many clients ask for large pages at
//! once, the other workers keep serving everyone else. The wait is fair
//! (first come, first served).

use std::sync::LazyLock;

use tokio::sync::{Semaphore, SemaphorePermit};

static TURNS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Semaphore::new((cores / 2).max(1))
});

/// Waits for a turn; hold it while building and encoding the answer.
pub async fn turn() -> Option<SemaphorePermit<'static>> {
    // The semaphore is never closed, so this only fails if it were.
    TURNS.acquire().await.ok()
}
