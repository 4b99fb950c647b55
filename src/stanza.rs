//! Small typed views over stanzas as `minidom::Element`s, shared by every concern.
//!
//! The bridge converts each Prosody stanza into one `Element` once; everything here reads
//! that element without copying it.

use std::rc::Rc;

use minidom::Element;
use xmpp_parsers::muc::muc::History as HistoryRequest;

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_PING: &str = "urn:xmpp:ping";
pub const NS_DELAY: &str = "urn:xmpp:delay";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// Children in this namespace trigger deliberate faults when `minimix_test_faults` is on.
pub const NS_TEST_FAULT: &str = "urn:xmpp:minimix:test-fault";

pub use xmpp_parsers::muc::user::Status;

/// The XEP-0045 status a numeric code read off a stanza stands for; none for a code that
/// XEP-0045 does not define.
pub fn status_of(code: u16) -> Option<Status> {
    Some(match code {
        100 => Status::NonAnonymousRoom,
        101 => Status::AffiliationChange,
        102 => Status::ConfigShowsUnavailableMembers,
        103 => Status::ConfigHidesUnavailableMembers,
        104 => Status::ConfigNonPrivacyRelated,
        110 => Status::SelfPresence,
        170 => Status::ConfigRoomLoggingEnabled,
        171 => Status::ConfigRoomLoggingDisabled,
        172 => Status::ConfigRoomNonAnonymous,
        173 => Status::ConfigRoomSemiAnonymous,
        201 => Status::RoomHasBeenCreated,
        210 => Status::AssignedNick,
        301 => Status::Banned,
        303 => Status::NewNick,
        307 => Status::Kicked,
        321 => Status::RemovalFromRoom,
        322 => Status::ConfigMembersOnly,
        332 => Status::ServiceShutdown,
        333 => Status::ServiceErrorKick,
        _ => return None,
    })
}

/// The XEP-0045 status a `code` attribute's text names, written as XEP-0045 writes codes
/// (three digits).
pub fn status_of_text(code: &str) -> Option<Status> {
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    status_of(code.parse().ok()?)
}

/// Whether the status codes read off a stanza (see [`Payload::status_codes`]) carry `status`.
pub fn has_status(codes: &[u16], status: &Status) -> bool {
    codes.iter().any(|&c| status_of(c).as_ref() == Some(status))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

/// The top-level facts of a stanza that routing decisions need.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    pub kind: Kind,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub type_: Option<&'a str>,
    pub id: Option<&'a str>,
}

impl<'a> Head<'a> {
    pub fn of(el: &'a Element) -> Option<Head<'a>> {
        let kind = match el.name() {
            "message" => Kind::Message,
            "presence" => Kind::Presence,
            "iq" => Kind::Iq,
            _ => return None,
        };
        Some(Head {
            kind,
            from: el.attr("from"),
            to: el.attr("to"),
            type_: el.attr("type"),
            id: el.attr("id"),
        })
    }

    pub fn is_type(&self, t: &str) -> bool {
        self.type_ == Some(t)
    }
}

/// A JID split into its parts, borrowed from the attribute text. Prosody has already
/// prepared (stringprep'd) every address that reaches a module, so splitting is enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr<'a> {
    pub node: Option<&'a str>,
    pub domain: &'a str,
    pub resource: Option<&'a str>,
}

impl<'a> Addr<'a> {
    pub fn parse(s: &'a str) -> Option<Addr<'a>> {
        let (rest, resource) = match s.find('/') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let (node, domain) = match rest.find('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        if domain.is_empty()
            || node.is_some_and(str::is_empty)
            || resource.is_some_and(str::is_empty)
        {
            return None;
        }
        Some(Addr {
            node,
            domain,
            resource,
        })
    }

    /// The bare part (`node@domain` or `domain`) as a slice of the original text.
    pub fn bare_of(s: &'a str) -> &'a str {
        match s.find('/') {
            Some(i) => &s[..i],
            None => s,
        }
    }
}

/// What the core reads of a stanza beyond its [`Head`]. Implemented for `minidom::Element`
/// (unit tests, and anything built in Rust) and by the bridge directly over Prosody's Lua
/// stanza tables, so that the hot paths never convert a whole stanza: only what a decision
/// needs is read, and the serialized form is made only when the stanza is kept.
pub trait Payload {
    /// Whether a direct child `name` in namespace `ns` exists.
    fn has_child(&self, name: &str, ns: &str) -> bool;
    /// An attribute of the first direct child `name` in `ns`.
    fn child_attr(&self, name: &str, ns: &str, attr: &str) -> Option<String>;
    /// An attribute of the first direct child `name` in `ns` whose attribute `key` is
    /// `value` (e.g. the `id` of the `<stanza-id/>` by a given JID).
    fn child_attr_where(
        &self,
        name: &str,
        ns: &str,
        key: &str,
        value: &str,
        attr: &str,
    ) -> Option<String>;
    /// The text of the first direct child `name` in `ns`.
    fn child_text(&self, name: &str, ns: &str) -> Option<String>;
    /// Name and namespace of the first child element (an IQ's payload).
    fn first_child(&self) -> Option<(String, String)>;
    /// Status codes of the muc#user payload.
    fn status_codes(&self) -> Vec<u16>;
    /// An attribute of the muc#user `<item/>`.
    fn item_attr(&self, attr: &str) -> Option<String>;
    /// The defined condition of the stanza's `<error/>`.
    fn error_condition(&self) -> Option<String>;
    /// The `<history/>` a MUC join asks for, when it asks.
    fn history_request(&self) -> Option<HistoryRequest>;
    /// The `<password/>` of a MUC join.
    fn join_password(&self) -> Option<String>;
    /// The stanza serialized without its `to` (so one copy serves every account a room
    /// sent it to), with `xmlns='jabber:client'` on the top element.
    fn xml(&self) -> Rc<str>;
}

impl Payload for Element {
    fn has_child(&self, name: &str, ns: &str) -> bool {
        Element::has_child(self, name, ns)
    }

    fn child_attr(&self, name: &str, ns: &str, attr: &str) -> Option<String> {
        self.get_child(name, ns)?.attr(attr).map(str::to_owned)
    }

    fn child_attr_where(
        &self,
        name: &str,
        ns: &str,
        key: &str,
        value: &str,
        attr: &str,
    ) -> Option<String> {
        self.children()
            .find(|c| c.is(name, ns) && c.attr(key) == Some(value))?
            .attr(attr)
            .map(str::to_owned)
    }

    fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.get_child(name, ns).map(Element::text)
    }

    fn first_child(&self) -> Option<(String, String)> {
        self.children()
            .next()
            .map(|c| (c.name().to_owned(), c.ns()))
    }

    fn status_codes(&self) -> Vec<u16> {
        status_codes(self)
    }

    fn item_attr(&self, attr: &str) -> Option<String> {
        muc_item(self)?.attr(attr).map(str::to_owned)
    }

    fn error_condition(&self) -> Option<String> {
        error_condition(self).map(str::to_owned)
    }

    fn history_request(&self) -> Option<HistoryRequest> {
        let h = self.get_child("x", NS_MUC)?.get_child("history", NS_MUC)?;
        HistoryRequest::try_from(h.clone()).ok()
    }

    fn join_password(&self) -> Option<String> {
        Some(
            self.get_child("x", NS_MUC)?
                .get_child("password", NS_MUC)?
                .text(),
        )
    }

    fn xml(&self) -> Rc<str> {
        let mut copy = self.clone();
        remove_attr(&mut copy, "to");
        String::from(&copy).into()
    }
}

/// Parse a serialized stanza kept by the core back into an element.
pub fn parse_kept(xml: &str) -> Option<Element> {
    xml.parse().ok()
}

/// Status codes carried in a `<x xmlns='…muc#user'>` payload.
pub fn status_codes(el: &Element) -> Vec<u16> {
    match el.get_child("x", NS_MUC_USER) {
        Some(x) => x
            .children()
            .filter(|c| c.is("status", NS_MUC_USER))
            .filter_map(|c| c.attr("code").and_then(|v| v.parse().ok()))
            .collect(),
        None => Vec::new(),
    }
}

/// The `<item/>` of a muc#user payload.
pub fn muc_item(el: &Element) -> Option<&Element> {
    el.get_child("x", NS_MUC_USER)?
        .get_child("item", NS_MUC_USER)
}

/// The defined condition of a stanza error, e.g. `not-acceptable`.
pub fn error_condition(el: &Element) -> Option<&str> {
    let err = el.children().find(|c| c.name() == "error")?;
    err.children()
        .find(|c| c.ns() == NS_STANZAS && c.name() != "text")
        .map(Element::name)
}

/// An error reply to the stanza `head` describes, from `from`, in the shape RFC 6120 §8.3
/// gives (the `to` is set when it is delivered).
pub fn error_reply(
    head: &Head,
    from: &str,
    error_type: &str,
    condition: &str,
    text: &str,
) -> Element {
    let name = match head.kind {
        Kind::Message => "message",
        Kind::Presence => "presence",
        Kind::Iq => "iq",
    };
    let mut b = Element::builder(name, NS_CLIENT)
        .attr(n("type"), "error")
        .attr(n("from"), from);
    if let Some(id) = head.id {
        b = b.attr(n("id"), id);
    }
    if head.kind == Kind::Presence {
        b = b.append(Element::bare("x", NS_MUC));
    }
    let mut error = Element::builder("error", NS_CLIENT)
        .attr(n("type"), error_type)
        .attr(n("by"), Addr::bare_of(from))
        .append(Element::bare(condition, NS_STANZAS));
    if !text.is_empty() {
        error = error.append(Element::builder("text", NS_STANZAS).append(text).build());
    }
    b.append(error.build()).build()
}

/// An attribute name known at compile time to be a valid NCName.
pub fn n(name: &'static str) -> minidom::rxml::NcName {
    minidom::rxml::NcName::try_from(name).expect("static attribute names are valid")
}

/// Set (or replace) an unqualified attribute.
pub fn set_attr(el: &mut Element, name: &'static str, value: &str) {
    el.attrs_mut()
        .insert(minidom::rxml::Namespace::NONE, n(name), value.to_owned());
}

/// Remove an unqualified attribute.
pub fn remove_attr(el: &mut Element, name: &'static str) {
    el.attrs_mut()
        .remove(&minidom::rxml::Namespace::NONE, &n(name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_parse_splits_and_rejects_empty_parts() {
        let a = Addr::parse("room@conf.example/Nick/with/slash").unwrap();
        assert_eq!(a.node, Some("room"));
        assert_eq!(a.domain, "conf.example");
        assert_eq!(a.resource, Some("Nick/with/slash"));
        assert!(Addr::parse("room@conf/").is_none());
        assert!(Addr::parse("@conf").is_none());
        assert!(Addr::parse("").is_none());
        assert_eq!(Addr::parse("conf").unwrap().node, None);
    }

    #[test]
    fn status_codes_are_read_from_muc_user() {
        let el: Element = "<presence xmlns='jabber:client'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/><status code='110'/><status code='201'/></x></presence>".parse().unwrap();
        assert_eq!(status_codes(&el), vec![110, 201]);
        let codes = status_codes(&el);
        assert!(has_status(&codes, &Status::SelfPresence));
        assert!(has_status(&codes, &Status::RoomHasBeenCreated));
        assert!(!has_status(&codes, &Status::NewNick));
    }

    #[test]
    fn status_codes_convert_as_xmpp_parsers_reads_them() {
        for code in 0..1000u16 {
            let el: Element = format!("<status xmlns='{NS_MUC_USER}' code='{code}'/>")
                .parse()
                .unwrap();
            assert_eq!(status_of(code), Status::try_from(el).ok(), "{code}");
            assert_eq!(status_of_text(&code.to_string()), status_of(code));
        }
        for text in ["0201", "+201", "201 ", "", "2010"] {
            assert_eq!(status_of_text(text), None, "{text:?}");
        }
    }

    #[test]
    fn error_condition_ignores_text() {
        let el: Element = "<iq xmlns='jabber:client' type='error'><error type='cancel'><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>x</text><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>".parse().unwrap();
        assert_eq!(error_condition(&el), Some("not-acceptable"));
    }
}
