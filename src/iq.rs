//! IQs that joined sessions send to a room leave from the account with an id the module
//! owns; the room's reply is routed back to exactly the asking session with its own id.

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

#[derive(Debug, Default)]
pub struct IqProxy {
    pending: HashMap<String, PendingIq>,
}

impl IqProxy {
    /// Track an IQ under `our_id`; entries older than `timeout` seconds are dropped, and
    /// when `limit` entries are pending the oldest goes.
    pub fn track(&mut self, our_id: String, iq: PendingIq, timeout: i64, limit: usize) {
        let now = iq.sent;
        self.pending.retain(|_, p| now - p.sent <= timeout);
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
