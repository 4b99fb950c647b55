//! The room's current occupants as last seen by the account, so that a later join of
//! another session can be served locally.

use std::collections::BTreeMap;

use minidom::Element;

#[derive(Debug, Default)]
pub struct OccupantCache {
    /// Nick → that occupant's latest available presence, as the room sent it.
    by_nick: BTreeMap<String, Element>,
}

pub enum Update {
    Stored,
    Removed,
    /// The cache is full and this is a new nick: it is forwarded but not kept.
    Full,
}

impl OccupantCache {
    pub fn update(
        &mut self,
        nick: &str,
        presence: &Element,
        available: bool,
        limit: usize,
    ) -> Update {
        if !available {
            self.by_nick.remove(nick);
            return Update::Removed;
        }
        if let Some(slot) = self.by_nick.get_mut(nick) {
            slot.clone_from(presence);
            return Update::Stored;
        }
        if self.by_nick.len() >= limit {
            return Update::Full;
        }
        self.by_nick.insert(nick.to_owned(), presence.clone());
        Update::Stored
    }

    pub fn remove(&mut self, nick: &str) {
        self.by_nick.remove(nick);
    }

    /// Every occupant but `own_nick`, in a stable order.
    pub fn others<'a>(&'a self, own_nick: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
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
}
