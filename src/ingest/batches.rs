//! Natural batching: the requests that arrive while a batch runs go
//! together in the next one, so one statement serves many requests at high
//! rates and a lone request runs at once at low ones (no linger).

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Requests waiting for the next batch, at most; past that a caller waits
/// to queue (the HTTP server bounds how many callers there are anyway).
const QUEUED: usize = 4096;

/// A batching task's inbox: `run` takes a batch of at most `max` items and
/// answers each, in order; up to `at_once` batches run at the same time, so
/// a request that arrives while one runs does not wait for it to end.
pub(crate) struct Batches<T, R> {
    tx: mpsc::Sender<(T, oneshot::Sender<R>)>,
}

impl<T: Send + 'static, R: Send + 'static> Batches<T, R> {
    /// Starts the task; it ends when this handle is dropped.
    pub(crate) fn spawn<F, Fut>(max: usize, at_once: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(T, oneshot::Sender<R>)>(QUEUED);
        let running = Arc::new(Semaphore::new(at_once.max(1)));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // A free turn first: meanwhile more requests queue, and the
                // batch takes them all.
                let Ok(turn) = running.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max
                    && let Ok(next) = rx.try_recv()
                {
                    batch.push(next);
                }
                let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
                let answers = run(items);
                tokio::spawn(async move {
                    let answers = answers.await;
                    drop(turn);
                    debug_assert_eq!(answers.len(), replies.len(), "one answer an item");
                    for (answer, reply) in answers.into_iter().zip(replies) {
                        // The caller may be gone (its client disconnected).
                        let _ = reply.send(answer);
                    }
                });
            }
        });
        Batches { tx }
    }

    /// Queues `item` for the next batch and waits for its answer; None when
    /// the task is gone.
    pub(crate) async fn submit(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::Batches;

    #[tokio::test]
    async fn requests_that_wait_meanwhile_go_together_and_each_gets_its_answer() {
        let batches_run = Arc::new(AtomicUsize::new(0));
        let counted = batches_run.clone();
        let doubler = Arc::new(Batches::spawn(64, 1, move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                // Slow enough for the others to queue behind the first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                items.into_iter().map(|i| i * 2).collect()
            }
        }));
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { (i, d.submit(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, Some(i * 2));
        }
        let runs = batches_run.load(Ordering::SeqCst);
        assert!((2..=10).contains(&runs), "100 requests in {runs} batches of at most 64");
    }

    #[tokio::test]
    async fn a_lone_request_runs_at_once() {
        let echo = Batches::spawn(64, 2, |items: Vec<u32>| async move { items });
        let answer = tokio::time::timeout(Duration::from_secs(1), echo.submit(7)).await;
        assert_eq!(answer.unwrap(), Some(7));
    }
}
