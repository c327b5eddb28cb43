//! Many messages in flight on one confirm channel, each told whether it
//! reached a queue. RabbitMQ sends an unroutable message's `basic.return`
//! before its ack, but the return names no delivery tag, and lapin hands each
//! return to whichever ack it reads next (within a multiple ack, in no set
//! order). With routable and unroutable messages in flight together, lapin
//! reports a routed message returned and an unroutable one acked: the second
//! would be lost while its publisher counts it delivered (seen against a real
//! broker: 2 to 32 of 1,334 unroutable messages among 4,000 reported acked).
//!
//! So returns are told apart by message id. An ack that came without a
//! return is trusted only once every message published before it was
//! confirmed has been seen confirmed: a return lapin gave to an earlier ack
//! has then been read. An ack that came with another message's return is
//! not trusted at all (its own return may still be on its way): it is
//! reported returned, so the generator sends it again (same message id and
//! version: a copy apply drops) and an ingest request is refused. Every
//! message needs a message id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use lapin::{Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::oneshot;

use super::publisher::{Confirmed, Outgoing, confirm_channel, publish_one};

/// A confirm channel whose publishes each learn their own fate.
#[derive(Clone)]
pub struct ConfirmChannel {
    channel: Channel,
    ledger: Arc<Mutex<Ledger>>,
}

/// What the broker's confirm said of one message, or why none came.
pub type ConfirmResult = Result<Confirmed, String>;

impl ConfirmChannel {
    pub async fn open(conn: &Connection) -> lapin::Result<Self> {
        Ok(Self {
            channel: confirm_channel(conn).await?,
            ledger: Default::default(),
        })
    }

    pub fn connected(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes `m` (mandatory); the returned future resolves to what the
    /// broker said of it. The publish and its confirm run in a task of
    /// their own: a caller that gives up midway (a client gone, a time-out)
    /// neither leaves a message counted as unconfirmed for ever, which every
    /// later ack would wait for, nor a return unread. That task owns the
    /// message, so it is taken by value.
    ///
    /// The message is on the channel, behind every message published
    /// before it, when this returns: its frames are queued here, not in the
    /// task ([`start`]), so a caller publishing many in a row neither waits
    /// for each to be written to the socket nor sees them reordered.
    pub fn publish(&self, m: Outgoing) -> lapin::Result<PendingConfirm> {
        if !self.connected() {
            return Err(lapin::Error::from(std::io::Error::other("the channel is closed")));
        }
        let (channel, ledger) = (self.channel.clone(), self.ledger.clone());
        Ok(PendingConfirm(start(async move {
            let id = message_id(&m.properties);
            // Taken before the publish: a message lapin registers before
            // another's ack is then already counted when that ack is read.
            let seq = lock(&ledger).take(&id);
            match publish_one(&channel, &m).await {
                Ok(confirm) => settle(ledger, seq, id, confirm).await,
                Err(e) => {
                    let mut l = lock(&ledger);
                    l.close(seq);
                    l.judged(&id);
                    Err(e.to_string())
                }
            }
        })))
    }
}

/// Runs `task` in a task of its own after polling it once here, so that
/// what it does before its first wait happens now, in the order of the
/// calls: for a publish, taking its place in the ledger and queueing its
/// frames on the channel (lapin does both synchronously, then waits for its
/// I/O thread to write them). Waiting for that write here would cost every
/// publish a round trip to that thread before the next could be queued.
fn start<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut task = Box::pin(task);
    // A waker that does nothing: the task, once spawned, polls again with
    // its own, and whatever fired meanwhile is seen then.
    match task.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(out) => tokio::spawn(std::future::ready(out)),
        Poll::Pending => tokio::spawn(task),
    }
}

fn message_id(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The broker's answer for one published message; dropping it leaves the
/// task to read the confirm.
pub struct PendingConfirm(tokio::task::JoinHandle<ConfirmResult>);

impl Future for PendingConfirm {
    type Output = ConfirmResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ConfirmResult> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| joined.unwrap_or_else(|e| Err(format!("confirm reader stopped: {e}"))))
    }
}

async fn settle(ledger: Arc<Mutex<Ledger>>, seq: u64, id: String, confirm: PublisherConfirm) -> ConfirmResult {
    let outcome = confirm.await;
    let returned = match &outcome {
        Ok(Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m))) => Some(message_id(&m.properties)),
        _ => None,
    };
    let barrier = {
        let mut l = lock(&ledger);
        if let Some(other) = returned.as_ref().filter(|r| **r != id) {
            l.returned(other);
        }
        l.close(seq);
        matches!(outcome, Ok(Confirmation::Ack(None)))
            .then(|| l.barrier())
            .flatten()
    };
    if let Some(wait) = barrier {
        // The sender is only dropped with the ledger, which this task holds.
        let _ = wait.await;
    }
    let returned_earlier = lock(&ledger).judged(&id);
    let confirmation = outcome.map_err(|e| e.to_string())?;
    Ok(judge(&confirmation, returned_earlier))
}

/// What one message's own confirm, and the returns read for it elsewhere,
/// say of it.
fn judge(confirmation: &Confirmation, returned_earlier: bool) -> Confirmed {
    match confirmation {
        Confirmation::Ack(None) if returned_earlier => Confirmed::Returned,
        Confirmation::Ack(None) => Confirmed::Ack,
        // Its own return, or another's: then its own fate is unknown, and
        // sending it again is the safe reading.
        Confirmation::Ack(Some(_)) => Confirmed::Returned,
        Confirmation::Nack(_) | Confirmation::NotRequested => Confirmed::Nacked,
    }
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// The messages of one channel still unconfirmed, those not yet told
/// their fate (by id, with whether a return read elsewhere named them), and
/// the acks waiting for every earlier message to be confirmed.
#[derive(Default)]
struct Ledger {
    next: u64,
    open: BTreeSet<u64>,
    unjudged: HashMap<String, Unjudged>,
    /// Keyed by the last message taken when the ack was read.
    barriers: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

/// Messages of one id not yet told their fate: a retry may publish an id
/// again while the first is in flight (both go the same way).
#[derive(Default)]
struct Unjudged {
    count: u32,
    returned: bool,
}

impl Ledger {
    fn take(&mut self, id: &str) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.open.insert(seq);
        self.unjudged.entry(id.to_owned()).or_default().count += 1;
        seq
    }

    /// A return read with another message's ack names `id`. Ids already
    /// told their fate are not kept: whatever the return, it came too late
    /// to change an answer already given (only an ack that came with
    /// another's return is answered before all returns are read, and it
    /// was answered "returned").
    fn returned(&mut self, id: &str) {
        if let Some(u) = self.unjudged.get_mut(id) {
            u.returned = true;
        }
    }

    /// Whether a return read elsewhere named `id`; forgets it once the last
    /// message of that id is told.
    fn judged(&mut self, id: &str) -> bool {
        let Some(u) = self.unjudged.get_mut(id) else {
            return false;
        };
        let returned = u.returned;
        u.count -= 1;
        if u.count == 0 {
            self.unjudged.remove(id);
        }
        returned
    }

    /// The lowest message still unconfirmed (or the next to be taken).
    fn low(&self) -> u64 {
        self.open.first().copied().unwrap_or(self.next)
    }

    fn close(&mut self, seq: u64) {
        self.open.remove(&seq);
        let low = self.low();
        let later = self.barriers.split_off(&low);
        for wake in std::mem::replace(&mut self.barriers, later).into_values().flatten() {
            let _ = wake.send(());
        }
    }

    /// Resolves once every message taken so far is confirmed; None when
    /// they all are.
    fn barrier(&mut self) -> Option<oneshot::Receiver<()>> {
        let last = self.next.checked_sub(1)?;
        if self.low() > last {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.barriers.entry(last).or_default().push(tx);
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::Ledger;

    #[test]
    fn an_ack_waits_for_every_message_taken_before_it_and_no_later_one() {
        let mut l = Ledger::default();
        let (a, b) = (l.take("a"), l.take("b"));
        // b's ack read while a is unconfirmed: b waits for a.
        l.close(b);
        let mut wait = l.barrier().expect("a still open");
        let c = l.take("c");
        assert!(wait.try_recv().is_err(), "a unconfirmed");
        l.close(a);
        assert!(wait.try_recv().is_ok(), "released by a, not held by c, taken after");
        l.close(c);
        assert!(l.barrier().is_none(), "nothing open");
        assert!(l.barriers.is_empty());
    }

    #[test]
    fn a_return_read_elsewhere_is_kept_only_for_a_message_not_yet_told() {
        let mut l = Ledger::default();
        l.take("a");
        l.take("a");
        l.returned("a");
        l.returned("gone");
        assert!(l.judged("a"));
        assert!(l.judged("a"), "both copies of a went the same way");
        assert!(!l.judged("gone"));
        assert!(l.unjudged.is_empty(), "nothing kept once told");
    }
}
