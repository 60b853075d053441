//! Stopping a running backup: a delete of a backup that is still being made asks it to stop, waits until it
//! has, and only then removes its files, so nothing the backup publishes afterwards outlives the delete.

use std::collections::HashSet;
use std::sync::Mutex;
use tokio::sync::Notify;

/// The stops asked for, and a signal each time a backup ends.
#[derive(Default)]
pub struct Stops {
    asked: Mutex<HashSet<String>>,
    ended: Notify,
}

impl Stops {
    /// Asks backup `id` to stop at its next chunk.
    pub fn ask(&self, id: &str) {
        self.asked.lock().expect("stops").insert(id.to_string());
    }

    /// Whether backup `id` has been asked to stop.
    pub fn asked(&self, id: &str) -> bool {
        self.asked.lock().expect("stops").contains(id)
    }

    /// Called as a backup ends, however it ends: wakes those waiting.
    pub fn ended(&self) {
        self.ended.notify_waiters();
    }

    /// Forgets the stop of backup `id`, once its delete is done. Until then a backup of that id that starts
    /// here (a call that was on its way) stops at once; after, the repository's tombstone refuses it.
    pub fn forget(&self, id: &str) {
        self.asked.lock().expect("stops").remove(id);
    }

    /// Waits until `running(id)` is false, re-checking each time a backup ends.
    pub async fn wait_until_ended(&self, id: &str, running: impl Fn(&str) -> bool) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable(); // registered before the check, so an end between the two is not missed
            if !running(id) {
                break;
            }
            ended.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_waiter_wakes_when_the_backup_ends_and_the_stop_stays_until_forgotten() {
        let stops = Arc::new(Stops::default());
        let running = Arc::new(AtomicBool::new(true));
        stops.ask("b1");
        assert!(stops.asked("b1") && !stops.asked("b2"));
        let waiter = {
            let (stops, running) = (stops.clone(), running.clone());
            tokio::spawn(async move { stops.wait_until_ended("b1", |_| running.load(Ordering::SeqCst)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "it waits while the backup runs");
        running.store(false, Ordering::SeqCst);
        stops.ended();
        waiter.await.unwrap();
        assert!(stops.asked("b1"), "a call still on its way must find the stop");
        stops.forget("b1");
        assert!(!stops.asked("b1"));
        // Nothing running: no wait at all.
        stops.wait_until_ended("b3", |_| false).await;
    }
}
