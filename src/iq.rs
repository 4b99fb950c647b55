//! IQs that joined sessions send to a room leave from the account with an id the module
//! owns; the room's reply is routed back to exactly the asking session with its own id.
//! A reply is waited for a while only: past that, the entry goes (when another IQ is
//! tracked, or at the host's next tick) and a later reply passes on as one nobody asked
//! for, which Prosody discards. The asking session is told nothing, as Prosody tells it
//! nothing when an IQ it routed goes unanswered: its client has a timeout of its own.

use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct PendingIq {
    pub resource: String,
    /// The id the session used.
    pub id: Option<String>,
    /// Where the IQ went: the reply must come from there.
    pub to: String,
    /// A XEP-0410 self-ping: an error reply may mean the account is no longer an occupant.
    pub self_ping: bool,
    pub sent: i64,
}

impl PendingIq {
    /// The first second at which the reply is no longer waited for.
    pub fn expires(&self, timeout: i64) -> i64 {
        self.sent.saturating_add(timeout).saturating_add(1)
    }

    pub fn expired(&self, now: i64, timeout: i64) -> bool {
        now >= self.expires(timeout)
    }
}

#[derive(Debug, Default)]
pub struct IqProxy {
    pending: HashMap<String, PendingIq>,
}

impl IqProxy {
    /// Track an IQ under `our_id`; entries older than `timeout` seconds are dropped, and
    /// when `limit` entries are pending the oldest goes.
    pub fn track(&mut self, our_id: String, iq: PendingIq, timeout: i64, limit: usize) {
        self.expire(iq.sent, timeout);
        if self.pending.len() >= limit.max(1)
            && let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, p)| p.sent)
                .map(|(k, _)| k.clone())
        {
            self.pending.remove(&oldest);
        }
        self.pending.insert(our_id, iq);
    }

    /// The pending IQ that a reply with `id` from `from` answers.
    pub fn take(&mut self, id: &str, from: &str) -> Option<PendingIq> {
        match self.pending.get(id) {
            Some(p) if p.to == from => self.pending.remove(id),
            _ => None,
        }
    }

    /// Drop the IQs waited for longer than `timeout` seconds at `now`; how many went.
    pub fn expire(&mut self, now: i64, timeout: i64) -> usize {
        let before = self.pending.len();
        self.pending.retain(|_, p| !p.expired(now, timeout));
        before - self.pending.len()
    }

    /// The first second at which [`IqProxy::expire`] drops something, if anything waits.
    pub fn next_expiry(&self, timeout: i64) -> Option<i64> {
        self.pending.values().map(|p| p.expires(timeout)).min()
    }

    pub fn forget_session(&mut self, resource: &str) {
        self.pending.retain(|_, p| p.resource != resource);
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}
