//! Turns lent per client address: at most `max` at once for one address
//! (behind trusted proxies, the forwarded one), so no address can hold all
//! of an instance's snapshot or catch-up turns. A turn comes back when its
//! holder drops it; others from the same address wait for it, up to a
//! deadline.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

pub(crate) struct PerAddress {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    /// Woken whenever a turn comes back, for whoever waits on its address.
    returned: Notify,
}

/// One address's turn, given back on drop.
pub(crate) struct AddressTurn {
    limit: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
            returned: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressTurn> {
        let mut held = self.lock();
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressTurn {
            limit: self.clone(),
            ip,
        })
    }

    /// A turn for `ip` (no limit without an address), waiting until
    /// `deadline` at most; None when none came back in time.
    pub(crate) async fn take(self: &Arc<Self>, ip: Option<IpAddr>, deadline: Instant) -> Option<Option<AddressTurn>> {
        let Some(ip) = ip else { return Some(None) };
        loop {
            // Registered before trying, so a turn returned in between wakes us.
            let returned = self.returned.notified();
            if let Some(turn) = self.try_take(ip) {
                return Some(Some(turn));
            }
            if tokio::time::timeout_at(deadline, returned).await.is_err() {
                return None;
            }
        }
    }

    /// Turns `ip` holds now.
    #[cfg(test)]
    pub(crate) fn held(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for AddressTurn {
    fn drop(&mut self) {
        {
            let mut held = self.limit.lock();
            if let Some(n) = held.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&self.ip);
                }
            }
        }
        self.limit.returned.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_address_waits_for_its_own_turns_while_others_take_theirs() {
        let limit = PerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let soon = || Instant::now() + Duration::from_millis(50);
        let first = limit.take(Some(a), soon()).await.unwrap();
        let _second = limit.take(Some(a), soon()).await.unwrap();
        assert!(
            limit.take(Some(a), soon()).await.is_none(),
            "a third waits, then gives up"
        );
        assert!(
            limit.take(Some(b), soon()).await.unwrap().is_some(),
            "another address is not held up"
        );
        assert!(
            limit.take(None, soon()).await.unwrap().is_none(),
            "no address, no limit"
        );
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move { limit.take(Some(a), Instant::now() + Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(
            waiter.await.unwrap().is_some(),
            "a returned turn goes to the one waiting"
        );
        assert_eq!(limit.held(b), 0, "an address with no turns is forgotten");
    }
}
