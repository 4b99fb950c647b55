//! Recent groupchat messages of a room, kept per membership to serve later joins the
//! history they ask for (XEP-0045 §7.2.14).

use std::collections::VecDeque;

use minidom::Element;
use xmpp_parsers::muc::muc::History as HistoryRequest;

use crate::stanza::{NS_CLIENT, NS_DELAY, n};
use crate::time;

#[derive(Debug)]
struct Entry {
    message: Element,
    /// When the room says the message was sent (its delay stamp) or when it arrived.
    stamp: i64,
    /// Whether the message already carries a XEP-0203 delay (history sent by the room).
    delayed: bool,
}

#[derive(Debug, Default)]
pub struct RoomHistory {
    entries: VecDeque<Entry>,
}

impl RoomHistory {
    pub fn push(&mut self, message: &Element, now: i64, limit: usize) {
        if limit == 0 {
            return;
        }
        let delay_stamp = message
            .get_child("delay", NS_DELAY)
            .and_then(|d| d.attr("stamp"))
            .and_then(time::parse_stamp);
        while self.entries.len() >= limit {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            message: message.clone(),
            stamp: delay_stamp.unwrap_or(now),
            delayed: delay_stamp.is_some(),
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The messages a join asking for `request` gets, oldest first, each with a delay stamp
    /// from `room`. `None` means no `<history/>` element: everything kept.
    pub fn select(&self, request: Option<&HistoryRequest>, room: &str, now: i64) -> Vec<Element> {
        let req = request.cloned().unwrap_or_default();
        if req.maxstanzas == Some(0) || req.maxchars == Some(0) {
            return Vec::new();
        }
        let since = req.since.map(|d| d.0.timestamp());
        let oldest = req.seconds.map(|s| now - i64::from(s));
        let mut picked: Vec<Element> = Vec::new();
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
            let message = with_delay(entry, room);
            if let Some(max) = req.maxchars {
                chars += String::from(&message).len();
                if chars > max as usize {
                    break;
                }
            }
            picked.push(message);
        }
        picked.reverse();
        picked
    }
}

fn with_delay(entry: &Entry, room: &str) -> Element {
    let mut message = entry.message.clone();
    if !entry.delayed {
        message.append_child(
            Element::builder("delay", NS_DELAY)
                .attr(n("from"), room)
                .attr(n("stamp"), time::format_stamp(entry.stamp))
                .build(),
        );
    }
    debug_assert!(message.ns() == NS_CLIENT);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Element {
        format!("<message xmlns='jabber:client' type='groupchat' from='r@c/x'><body>{body}</body></message>")
            .parse()
            .unwrap()
    }

    fn bodies(v: &[Element]) -> Vec<String> {
        v.iter()
            .map(|m| m.get_child("body", NS_CLIENT).unwrap().text())
            .collect()
    }

    #[test]
    fn keeps_only_the_limit_and_stamps_delays() {
        let mut h = RoomHistory::default();
        for i in 0..5 {
            h.push(&msg(&i.to_string()), 1000 + i, 3);
        }
        let all = h.select(None, "r@c", 2000);
        assert_eq!(bodies(&all), ["2", "3", "4"]);
        let d = all[0].get_child("delay", NS_DELAY).unwrap();
        assert_eq!(d.attr("from"), Some("r@c"));
        assert_eq!(d.attr("stamp"), Some("1970-01-01T00:16:42Z"));
    }

    #[test]
    fn honours_each_limit() {
        let mut h = RoomHistory::default();
        for i in 0..10 {
            h.push(&msg(&i.to_string()), 1000 + i * 10, 20);
        }
        let req = |s: &str| -> HistoryRequest {
            let el: Element = format!("<history xmlns='http://jabber.org/protocol/muc' {s}/>")
                .parse()
                .unwrap();
            HistoryRequest::try_from(el).unwrap()
        };
        assert!(
            h.select(Some(&req("maxstanzas='0'")), "r@c", 2000)
                .is_empty()
        );
        assert!(h.select(Some(&req("maxchars='0'")), "r@c", 2000).is_empty());
        assert_eq!(
            bodies(&h.select(Some(&req("maxstanzas='2'")), "r@c", 2000)),
            ["8", "9"]
        );
        // now = 1100: the last 25 seconds hold the messages stamped 1080 and 1090.
        assert_eq!(
            bodies(&h.select(Some(&req("seconds='25'")), "r@c", 1105)),
            ["8", "9"]
        );
        // since is inclusive, as in Prosody's MUC: stamped at or after 1080.
        let since = time::format_stamp(1080);
        assert_eq!(
            bodies(&h.select(Some(&req(&format!("since='{since}'"))), "r@c", 2000)),
            ["8", "9"]
        );
        let one = String::from(&h.select(None, "r@c", 2000)[9]).len();
        assert_eq!(
            bodies(&h.select(
                Some(&req(&format!("maxchars='{}'", one * 2 + 1))),
                "r@c",
                2000
            )),
            ["8", "9"]
        );
    }

    #[test]
    fn room_delay_stamps_are_kept() {
        let mut h = RoomHistory::default();
        let el: Element = "<message xmlns='jabber:client' type='groupchat' from='r@c/x'><body>old</body><delay xmlns='urn:xmpp:delay' from='r@c' stamp='2020-01-01T00:00:00Z'/></message>".parse().unwrap();
        h.push(&el, 5_000_000_000, 5);
        let out = h.select(None, "r@c", 5_000_000_000);
        assert_eq!(
            out[0]
                .children()
                .filter(|c| c.is("delay", NS_DELAY))
                .count(),
            1
        );
        let since = time::format_stamp(1_577_836_801); // one second after the stamp
        let el: Element =
            format!("<history xmlns='http://jabber.org/protocol/muc' since='{since}'/>")
                .parse()
                .unwrap();
        assert!(
            h.select(Some(&HistoryRequest::try_from(el).unwrap()), "r@c", 0)
                .is_empty()
        );
    }
}
