//! What the account already got from a room, kept with its membership: the point to ask
//! the room's history since when the module rejoins (XEP-0045 §7.2.15), and small marks of
//! the latest messages, so that what the room replays after such a rejoin and the account
//! already has is recognised (neither archived nor forked twice).
//!
//! A mark is four numbers (32 bytes): when the message came (the room's delay stamp, else
//! the arrival), and hashes of the room's stanza-id, of the sender's origin-id and of
//! sender and body. At most [`MARKS_KEPT`] marks are kept per membership, and only those
//! within twice [`REJOIN_MARGIN`] of the newest: the rest cannot come back in a replay
//! that starts at `last - REJOIN_MARGIN`.

use std::collections::VecDeque;

use crate::stanza::{NS_CLIENT, Payload};

/// The room's and the sender's unique and stable ids (XEP-0359).
pub const NS_SID: &str = "urn:xmpp:sid:0";

/// Seconds before the last message that a rejoin asks history since: the room's clock may
/// be behind this server's by up to this much without a message being missed. What this
/// overlap brings again is recognised by the marks.
pub const REJOIN_MARGIN: i64 = 120;

/// Marks kept per membership (a replay is at most the room's history, 20 messages by
/// default in Prosody).
pub const MARKS_KEPT: usize = 64;

/// One message, reduced to what recognises it again. Zero stands for "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub stamp: i64,
    /// The room's `<stanza-id by='room'/>`.
    pub room_id: u64,
    /// The sender's `<origin-id/>`, with the sender's nick.
    pub origin_id: u64,
    /// Sender's nick and body.
    pub content: u64,
    /// A message of the room's current replay was recognised as this one (not stored):
    /// each mark stands for one message, so "ok" said twice is not taken for once.
    pub used: bool,
}

/// FNV-1a over the parts, each followed by a separator byte: stable across versions and
/// processes (marks are stored), and never zero.
fn hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.max(1)
}

impl Mark {
    /// The mark of a groupchat message `el` from `from` (the occupant's JID) in `room`,
    /// stamped `stamp`.
    pub fn of(el: &dyn Payload, from: &str, room: &str, stamp: i64) -> Mark {
        let nick = from.split_once('/').map_or("", |(_, n)| n);
        let room_id = el
            .child_attr_where("stanza-id", NS_SID, "by", room, "id")
            .map_or(0, |id| hash(&[&id]));
        let origin_id = el
            .child_attr("origin-id", NS_SID, "id")
            .map_or(0, |id| hash(&[nick, &id]));
        let body = el.child_text("body", NS_CLIENT).unwrap_or_default();
        Mark {
            stamp,
            room_id,
            origin_id,
            content: hash(&[nick, &body]),
            used: false,
        }
    }

    /// Whether `self` and `other` are the same message: the room's ids when both have one,
    /// else the origin-ids when both have one, else sender and body within `tolerance`
    /// seconds (the two stamps may come from two clocks).
    pub fn same(&self, other: &Mark, tolerance: i64) -> bool {
        if self.room_id != 0 && other.room_id != 0 {
            return self.room_id == other.room_id;
        }
        if self.origin_id != 0 && other.origin_id != 0 {
            return self.origin_id == other.origin_id;
        }
        self.content == other.content && (self.stamp - other.stamp).abs() <= tolerance
    }

    fn text(&self) -> String {
        format!(
            "{:x},{:x},{:x},{:x}",
            self.stamp, self.room_id, self.origin_id, self.content
        )
    }

    fn parse(text: &str) -> Option<Mark> {
        let mut parts = text.split(',');
        let mut next = || parts.next().and_then(|p| u64::from_str_radix(p, 16).ok());
        let mark = Mark {
            stamp: i64::try_from(next()?).ok()?,
            room_id: next()?,
            origin_id: next()?,
            content: next()?,
            used: false,
        };
        Some(mark)
    }
}

/// What the account got from one room.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// When the newest message came (see [`Mark::stamp`]).
    last: Option<i64>,
    marks: VecDeque<Mark>,
}

impl Received {
    /// The account got this message (live, or new in a replay).
    pub fn got(&mut self, mark: Mark) {
        let last = self.last.map_or(mark.stamp, |l| l.max(mark.stamp));
        self.last = Some(last);
        while self.marks.len() >= MARKS_KEPT {
            self.marks.pop_front();
        }
        self.marks.push_back(Mark { used: true, ..mark });
        while self
            .marks
            .front()
            .is_some_and(|m| m.stamp < last - 2 * REJOIN_MARGIN)
        {
            self.marks.pop_front();
        }
    }

    /// Whether the account already got the message `mark` stands for.
    pub fn has(&self, mark: &Mark) -> bool {
        self.marks.iter().any(|m| m.same(mark, REJOIN_MARGIN))
    }

    /// A replay starts: every mark may be recognised once in it.
    pub fn start_replay(&mut self) {
        for m in &mut self.marks {
            m.used = false;
        }
    }

    /// Whether a message of the replay is one the account already got: the first mark it
    /// matches that no earlier message of the replay matched (then taken). Marks of what
    /// came since the replay started are never matched in it.
    pub fn take(&mut self, mark: &Mark) -> bool {
        match self
            .marks
            .iter_mut()
            .find(|m| !m.used && m.same(mark, REJOIN_MARGIN))
        {
            Some(m) => {
                m.used = true;
                true
            }
            None => false,
        }
    }

    /// The point a rejoin asks the room's history since; none when no message is known
    /// (the rejoin then asks for no history).
    pub fn since(&self) -> Option<i64> {
        self.last.map(|l| l - REJOIN_MARGIN)
    }

    pub fn last(&self) -> Option<i64> {
        self.last
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// The stored form: `1 <last> <mark> …` (hexadecimal); empty when nothing was got.
    pub fn to_text(&self) -> String {
        let Some(last) = self.last else {
            return String::new();
        };
        let mut s = format!("1 {last:x}");
        for m in &self.marks {
            s.push(' ');
            s.push_str(&m.text());
        }
        s
    }

    /// Read the stored form; what cannot be read is left out (a damaged row costs a
    /// replay, never the membership).
    pub fn from_text(text: &str) -> Received {
        let mut parts = text.split_ascii_whitespace();
        let mut r = Received::default();
        if parts.next() != Some("1") {
            return r;
        }
        let Some(last) = parts
            .next()
            .and_then(|p| u64::from_str_radix(p, 16).ok())
            .and_then(|l| i64::try_from(l).ok())
        else {
            return r;
        };
        for mark in parts.filter_map(Mark::parse) {
            r.got(mark);
        }
        r.last = Some(r.last.map_or(last, |l| l.max(last)));
        r
    }

    /// Take in what `other` knows (marks found in the archive at start).
    pub fn merge(&mut self, other: &Received) {
        for m in &other.marks {
            if !self.has(m) {
                self.got(*m);
            }
        }
        if let Some(l) = other.last {
            self.last = Some(self.last.map_or(l, |s| s.max(l)));
        }
        let mut sorted: Vec<Mark> = self.marks.drain(..).collect();
        sorted.sort_by_key(|m| m.stamp);
        self.marks = sorted.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    const ROOM: &str = "r@muc.example.org";

    fn msg(nick: &str, body: &str, extra: &str) -> (Element, String) {
        let from = format!("{ROOM}/{nick}");
        let el: Element = format!(
            "<message xmlns='jabber:client' type='groupchat' from='{from}'><body>{body}</body>{extra}</message>"
        )
        .parse()
        .unwrap();
        (el, from)
    }

    fn mark(nick: &str, body: &str, extra: &str, stamp: i64) -> Mark {
        let (el, from) = msg(nick, body, extra);
        Mark::of(&el, &from, ROOM, stamp)
    }

    #[test]
    fn recognises_by_room_id_then_origin_id_then_content() {
        let sid = |id: &str, by: &str| format!("<stanza-id xmlns='{NS_SID}' id='{id}' by='{by}'/>");
        let oid = |id: &str| format!("<origin-id xmlns='{NS_SID}' id='{id}'/>");
        // The room's id decides, whatever the body and the time.
        let a = mark("bob", "hi", &sid("1", ROOM), 1000);
        assert!(a.same(&mark("bob", "hi", &sid("1", ROOM), 5000), 120));
        assert!(!a.same(&mark("bob", "hi", &sid("2", ROOM), 1000), 120));
        // A stanza-id by anyone else is no room id.
        assert_eq!(mark("bob", "hi", &sid("1", "bob@x"), 0).room_id, 0);
        // Origin-ids, with the sender.
        let o = mark("bob", "hi", &oid("x"), 1000);
        assert!(o.same(&mark("bob", "hi", &oid("x"), 1000), 120));
        assert!(!o.same(&mark("bob", "hi", &oid("y"), 1000), 120));
        assert!(!o.same(&mark("carol", "hi", &oid("x"), 1000), 120));
        // Else sender and body, within the tolerance.
        let c = mark("bob", "hi", "", 1000);
        assert!(c.same(&mark("bob", "hi", &sid("9", ROOM), 1100), 120));
        assert!(!c.same(&mark("bob", "hi", "", 1121), 120));
        assert!(!c.same(&mark("bob", "ho", "", 1000), 120));
        assert!(!c.same(&mark("carol", "hi", "", 1000), 120));
    }

    #[test]
    fn keeps_a_bounded_window_and_asks_since_the_margin() {
        let mut r = Received::default();
        assert_eq!(r.since(), None);
        for i in 0..100 {
            r.got(mark("bob", &i.to_string(), "", 10_000 + i));
        }
        assert_eq!(r.len(), MARKS_KEPT);
        assert_eq!(r.since(), Some(10_099 - REJOIN_MARGIN));
        assert!(r.has(&mark("bob", "99", "", 10_100)));
        assert!(!r.has(&mark("bob", "1", "", 10_001)));
        // A late message drops the marks older than twice the margin.
        r.got(mark("bob", "late", "", 20_000));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn stored_form_round_trips_and_survives_damage() {
        let mut r = Received::default();
        r.got(mark("bob", "a", "", 1_800_000_000));
        r.got(mark(
            "bob",
            "b",
            &format!("<origin-id xmlns='{NS_SID}' id='o'/>"),
            1_800_000_005,
        ));
        let back = Received::from_text(&r.to_text());
        assert_eq!(back.last(), r.last());
        assert!(back.has(&mark("bob", "a", "", 1_800_000_000)));
        assert_eq!(back.len(), 2);
        assert!(Received::from_text("").is_empty());
        assert!(Received::from_text("2 ff").is_empty());
        let damaged = Received::from_text("1 6b49d200 zz 6b49d200,0,0,1");
        assert_eq!(damaged.last(), Some(1_800_000_000));
        assert_eq!(damaged.len(), 1);
    }

    #[test]
    fn merge_adds_what_is_new_in_order() {
        let mut stored = Received::default();
        stored.got(mark("bob", "a", "", 1000));
        let mut archive = Received::default();
        archive.got(mark("bob", "a", "", 1001));
        archive.got(mark("bob", "b", "", 1010));
        stored.merge(&archive);
        assert_eq!(stored.len(), 2);
        assert_eq!(stored.last(), Some(1010));
    }
}
