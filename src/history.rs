//! Recent groupchat messages of a room, kept per membership to serve later joins the
//! history they ask for (XEP-0045 §7.2.14). Messages are kept serialized and shared
//! between every account the room sent them to.

use std::collections::VecDeque;
use std::rc::Rc;

use xmpp_parsers::muc::muc::History as HistoryRequest;

use crate::received::{Mark, REJOIN_MARGIN};

#[derive(Debug)]
struct Entry {
    message: Rc<str>,
    /// When the room says the message was sent (its delay stamp) or when it arrived.
    stamp: i64,
    /// Whether the message already carries a XEP-0203 delay (history sent by the room).
    delayed: bool,
    /// What recognises it when the room sends it again (after a rejoin).
    mark: Option<Mark>,
}

/// A kept message picked for a join: `delay` is the stamp to add, if it has none yet.
#[derive(Debug, Clone)]
pub struct Picked {
    pub message: Rc<str>,
    pub delay: Option<i64>,
}

/// Length of the `<delay/>` element added to a message that has none, counted against
/// `maxchars` like the rest of the stanza.
const DELAY_CHARS: usize = 96;

#[derive(Debug, Default)]
pub struct RoomHistory {
    entries: VecDeque<Entry>,
}

impl RoomHistory {
    /// Keep `message`; `delay_stamp` is the stamp of its own delay, if it has one.
    pub fn push(&mut self, message: Rc<str>, delay_stamp: Option<i64>, now: i64, limit: usize) {
        self.push_marked(message, delay_stamp, now, limit, None);
    }

    /// [`RoomHistory::push`], with the message's mark.
    pub fn push_marked(
        &mut self,
        message: Rc<str>,
        delay_stamp: Option<i64>,
        now: i64,
        limit: usize,
        mark: Option<Mark>,
    ) {
        if limit == 0 {
            return;
        }
        while self.entries.len() >= limit {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            message,
            stamp: delay_stamp.unwrap_or(now),
            delayed: delay_stamp.is_some(),
            mark,
        });
    }

    /// Whether a kept message is the one `mark` stands for.
    pub fn contains(&self, mark: &Mark) -> bool {
        self.entries
            .iter()
            .any(|e| e.mark.is_some_and(|m| m.same(mark, REJOIN_MARGIN)))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn text_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.message.len()).sum()
    }

    /// The messages a join asking for `request` gets, oldest first. `None` means no
    /// `<history/>` element: everything kept.
    pub fn select(&self, request: Option<&HistoryRequest>, now: i64) -> Vec<Picked> {
        let req = request.cloned().unwrap_or_default();
        if req.maxstanzas == Some(0) || req.maxchars == Some(0) {
            return Vec::new();
        }
        // Inclusive, as in Prosody's MUC.
        let since = req.since.map(|d| d.0.timestamp());
        let oldest = req.seconds.map(|s| now - i64::from(s));
        let mut picked: Vec<Picked> = Vec::new();
        let mut chars: usize = 0;
        for entry in self.entries.iter().rev() {
            if since.is_some_and(|s| entry.stamp < s) || oldest.is_some_and(|o| entry.stamp < o) {
                break;
            }
            if req
                .maxstanzas
                .is_some_and(|max| picked.len() >= max as usize)
            {
                break;
            }
            if let Some(max) = req.maxchars {
                chars += entry.message.len() + if entry.delayed { 0 } else { DELAY_CHARS };
                if chars > max as usize {
                    break;
                }
            }
            picked.push(Picked {
                message: entry.message.clone(),
                delay: (!entry.delayed).then_some(entry.stamp),
            });
        }
        picked.reverse();
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time;
    use minidom::Element;

    fn msg(body: &str) -> Rc<str> {
        format!("<message xmlns='jabber:client' type='groupchat' from='r@c/x'><body>{body}</body></message>").into()
    }

    fn bodies(v: &[Picked]) -> Vec<String> {
        v.iter()
            .map(|p| {
                let el: Element = p.message.parse().unwrap();
                el.get_child("body", "jabber:client").unwrap().text()
            })
            .collect()
    }

    fn req(s: &str) -> HistoryRequest {
        let el: Element = format!("<history xmlns='http://jabber.org/protocol/muc' {s}/>")
            .parse()
            .unwrap();
        HistoryRequest::try_from(el).unwrap()
    }

    #[test]
    fn keeps_only_the_limit_and_asks_for_delays() {
        let mut h = RoomHistory::default();
        for i in 0..5 {
            h.push(msg(&i.to_string()), None, 1000 + i, 3);
        }
        let all = h.select(None, 2000);
        assert_eq!(bodies(&all), ["2", "3", "4"]);
        assert_eq!(all[0].delay, Some(1002));
    }

    #[test]
    fn honours_each_limit() {
        let mut h = RoomHistory::default();
        for i in 0..10 {
            h.push(msg(&i.to_string()), None, 1000 + i * 10, 20);
        }
        assert!(h.select(Some(&req("maxstanzas='0'")), 2000).is_empty());
        assert!(h.select(Some(&req("maxchars='0'")), 2000).is_empty());
        assert_eq!(
            bodies(&h.select(Some(&req("maxstanzas='2'")), 2000)),
            ["8", "9"]
        );
        // The last 25 seconds before 1105 hold the messages stamped 1080 and 1090.
        assert_eq!(
            bodies(&h.select(Some(&req("seconds='25'")), 1105)),
            ["8", "9"]
        );
        // since is inclusive, as in Prosody's MUC: stamped at or after 1080.
        let since = time::format_stamp(1080);
        assert_eq!(
            bodies(&h.select(Some(&req(&format!("since='{since}'"))), 2000)),
            ["8", "9"]
        );
        let one = msg("9").len() + DELAY_CHARS;
        assert_eq!(
            bodies(&h.select(Some(&req(&format!("maxchars='{}'", one * 2 + 1))), 2000)),
            ["8", "9"]
        );
    }

    #[test]
    fn room_delay_stamps_are_kept() {
        let mut h = RoomHistory::default();
        h.push(msg("old"), Some(1_577_836_800), 5_000_000_000, 5);
        let out = h.select(None, 5_000_000_000);
        assert_eq!(out[0].delay, None);
        let since = time::format_stamp(1_577_836_801); // one second after the stamp
        assert!(
            h.select(Some(&req(&format!("since='{since}'"))), 0)
                .is_empty()
        );
    }
}
