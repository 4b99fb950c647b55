//! The room's current occupants as last seen by the account, so that a later join of
//! another session can be served locally. Presences are kept serialized: compact, and
//! shared between every account the room sent the same presence to.

use std::collections::BTreeMap;
use std::rc::Rc;

#[derive(Debug, Default)]
pub struct OccupantCache {
    /// Nick → that occupant's latest available presence, as the room sent it.
    by_nick: BTreeMap<String, Rc<str>>,
}

impl OccupantCache {
    /// Record what the room said of `nick`. `presence` is asked for only when kept (and
    /// none forgets the nick). A new nick past `limit` is not kept (it is still forked).
    pub fn update(
        &mut self,
        nick: &str,
        available: bool,
        limit: usize,
        presence: impl FnOnce() -> Option<Rc<str>>,
    ) {
        if !available {
            self.by_nick.remove(nick);
            return;
        }
        let known = self.by_nick.contains_key(nick);
        if !known && self.by_nick.len() >= limit {
            return;
        }
        match presence() {
            Some(p) => {
                self.by_nick.insert(nick.to_owned(), p);
            }
            None => {
                self.by_nick.remove(nick);
            }
        }
    }

    pub fn remove(&mut self, nick: &str) {
        self.by_nick.remove(nick);
    }

    pub fn get(&self, nick: &str) -> Option<&Rc<str>> {
        self.by_nick.get(nick)
    }

    /// Every occupant but `own_nick`, in a stable order.
    pub fn others<'a>(&'a self, own_nick: &'a str) -> impl Iterator<Item = &'a Rc<str>> + 'a {
        self.by_nick
            .iter()
            .filter(move |(nick, _)| nick.as_str() != own_nick)
            .map(|(_, p)| p)
    }

    pub fn len(&self) -> usize {
        self.by_nick.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_nick.is_empty()
    }

    /// Bytes held by the kept presences (their text), for the memory figures.
    pub fn text_bytes(&self) -> usize {
        self.by_nick.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}
