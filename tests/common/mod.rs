//! What the Rust tests share: the account, the room and the clock; stanzas written as
//! short texts; the world a test drives (`World`) and what it saw of one event (`Seen`).
//!
//! Each test file uses part of it.
#![allow(dead_code)]

use std::marker::PhantomData;

use minidom::Element;
use minimix::host::{Action, Config, Host, Out, Outcome};
use minimix::stanza::{self, NS_CLIENT, NS_DELAY, NS_MUC, NS_MUC_USER, NS_STANZAS};
use minimix::time::format_stamp;

// The account, the room and the clock of tests/flows.rs and tests/lifecycle.rs. Stanza
// texts use shorthands (see [`expand`]).
pub const DOMAIN: &str = "example.com";
pub const USER: &str = "alice";
pub const ACCOUNT: &str = "alice@example.com";
pub const R: &str = "room@conference.example.com";
/// Another room on the same service (`$O`).
pub const O: &str = "other@conference.example.com";
/// 2027-01-15T08:00:00Z, the clock at the start of every test.
pub const T0: i64 = 1_800_000_000;

/// The stanzas an outcome makes leave, in order, as the shim sends them: `Some(resource)`
/// delivered to that session of `account` (`to` set to its full JID), `None` sent from
/// `account` (`from` set). `incoming` is the stanza the event carried.
pub fn leaving(o: &Outcome, incoming: &Element, account: &str) -> Vec<(Option<String>, Element)> {
    o.actions
        .iter()
        .map(|a| {
            let (resource, out) = match a {
                Action::Deliver { resource, stanza } => (Some(resource.to_string()), stanza),
                Action::Send { stanza } => (None, stanza),
            };
            let mut e = match out {
                Out::Original { id } => {
                    let mut e = incoming.clone();
                    if let Some(id) = id {
                        stanza::set_attr(&mut e, "id", id);
                    }
                    e
                }
                made => made.to_element().expect("a kept stanza parses"),
            };
            match &resource {
                Some(r) => stanza::set_attr(&mut e, "to", &format!("{account}/{r}")),
                None => stanza::set_attr(&mut e, "from", account),
            }
            (resource, e)
        })
        .collect()
}

// What sessions and the room send, as texts with the shorthands above.

pub fn membership(nick: &str, sessions: &[&str]) -> Vec<(String, String, Vec<String>)> {
    vec![(
        R.to_owned(),
        nick.to_owned(),
        sessions.iter().map(|s| s.to_string()).collect(),
    )]
}

pub fn join(nick: &str, history: &str) -> String {
    format!("<presence to='$R/{nick}' id='join-{nick}'><x xmlns='$MUC'>{history}</x></presence>")
}

pub fn occupant(nick: &str) -> String {
    format!(
        "<presence from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant'/></x></presence>"
    )
}

pub fn self_left(nick: &str) -> String {
    format!(
        "<presence type='unavailable' from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='none'/><status code='110'/></x></presence>"
    )
}

pub fn groupchat(nick: &str, body: &str) -> String {
    format!("<message type='groupchat' from='$R/{nick}' id='{body}'><body>{body}</body></message>")
}

pub fn room_history(nick: &str, body: &str, stamp: i64) -> String {
    format!(
        "<message type='groupchat' from='$R/{nick}' id='{body}'><body>{body}</body><delay xmlns='urn:xmpp:delay' from='$R' stamp='{}'/></message>",
        format_stamp(stamp)
    )
}

pub fn subject(text: &str) -> String {
    format!("<message type='groupchat' from='$R/bob' id='subj'><subject>{text}</subject></message>")
}

/// Presence payload: `<show/>` and `<status/>` where not empty.
pub fn payload(show: &str, status: &str) -> String {
    let mut p = String::new();
    if !show.is_empty() {
        p.push_str(&format!("<show>{show}</show>"));
    }
    if !status.is_empty() {
        p.push_str(&format!("<status>{status}</status>"));
    }
    p
}

// ---------------------------------------------------------------------------------------
// Stanzas as texts

/// The shorthands of stanza texts: `$R` the room, `$O` the other room, `$A` the account,
/// `$MUC`, `$MU` (muc#user) and `$ST` (stanza error) namespaces.
pub fn expand(xml: &str) -> String {
    xml.replace("$R", R)
        .replace("$O", O)
        .replace("$A", ACCOUNT)
        .replace("$MUC", NS_MUC)
        .replace("$MU", NS_MUC_USER)
        .replace("$ST", NS_STANZAS)
}

/// Parse a stanza, adding `jabber:client` (and `attrs`) to its root.
pub fn el_with(xml: &str, attrs: &str) -> Element {
    let xml = expand(xml.trim());
    let end = xml
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .expect("a root tag");
    let text = format!("{} xmlns='{NS_CLIENT}'{attrs}{}", &xml[..end], &xml[end..]);
    text.parse()
        .unwrap_or_else(|e| panic!("bad test XML {text}: {e:?}"))
}

pub fn el(xml: &str) -> Element {
    el_with(xml, "")
}

// ---------------------------------------------------------------------------------------
// Stanzas described in one line

/// How a test file describes the stanzas that leave. Both start with kind, type, from (or
/// to, for what is sent), id, and end with error condition, body, subject and delay stamp.
pub trait Describe {
    fn describe(e: &Element, sent: bool) -> String;
}

/// tests/flows.rs: routing. The room shortened to `R` and the account to `A` (another room
/// in full); MUC role and status codes; the IQ payload's namespace, last.
pub struct Routing;

/// tests/lifecycle.rs: the room's state. The rooms shortened to `R` and `O` and the account
/// to `A`; show and status, the MUC join payload (history, password), MUC role, nick,
/// status codes and `<destroy/>`.
pub struct RoomState;

impl Describe for Routing {
    fn describe(e: &Element, sent: bool) -> String {
        describe(e, sent, false)
    }
}

impl Describe for RoomState {
    fn describe(e: &Element, sent: bool) -> String {
        describe(e, sent, true)
    }
}

/// A JID shortened: the room to `R`, the account to `A`.
pub fn short(jid: &str) -> String {
    jid.replace(R, "R").replace(ACCOUNT, "A")
}

/// A JID shortened: the rooms to `R` and `O`, the account to `A`.
pub fn short_both_rooms(jid: &str) -> String {
    jid.replace(R, "R").replace(O, "O").replace(ACCOUNT, "A")
}

/// See [`Routing`] (`room_state` false) and [`RoomState`].
fn describe(e: &Element, sent: bool, room_state: bool) -> String {
    let mut d = vec![e.name().to_owned()];
    if let Some(t) = e.attr("type") {
        d.push(t.to_owned());
    }
    let addr = if sent { "to" } else { "from" };
    if let Some(a) = e.attr(addr) {
        let a = if room_state {
            short_both_rooms(a)
        } else {
            short(a)
        };
        d.push(format!("{addr}={a}"));
    }
    if let Some(id) = e.attr("id") {
        d.push(format!("id={id}"));
    }
    if room_state {
        if let Some(show) = e.get_child("show", NS_CLIENT) {
            d.push(format!("show={}", show.text()));
        }
        if let Some(st) = e.get_child("status", NS_CLIENT) {
            d.push(format!("status={}", st.text()));
        }
        if let Some(x) = e.get_child("x", NS_MUC) {
            d.push("muc".to_owned());
            if let Some(h) = x.get_child("history", NS_MUC) {
                let attrs: Vec<String> = ["maxstanzas", "maxchars", "seconds", "since"]
                    .iter()
                    .filter_map(|k| h.attr(*k).map(|v| format!("{k}={v}")))
                    .collect();
                d.push(format!("history[{}]", attrs.join(",")));
            }
            if let Some(p) = x.get_child("password", NS_MUC) {
                d.push(format!("password={}", p.text()));
            }
        }
    }
    if let Some(role) = stanza::muc_item(e).and_then(|i| i.attr("role")) {
        d.push(format!("role={role}"));
    }
    if room_state && let Some(nick) = stanza::muc_item(e).and_then(|i| i.attr("nick")) {
        d.push(format!("nick={nick}"));
    }
    let codes = stanza::status_codes(e);
    if !codes.is_empty() {
        let codes: Vec<String> = codes.iter().map(u16::to_string).collect();
        d.push(codes.join(","));
    }
    if room_state
        && e.get_child("x", NS_MUC_USER)
            .is_some_and(|x| x.has_child("destroy", NS_MUC_USER))
    {
        d.push("destroy".to_owned());
    }
    if let Some(c) = stanza::error_condition(e) {
        d.push(format!("err={c}"));
    }
    if let Some(b) = e.get_child("body", NS_CLIENT) {
        d.push(format!("body={}", b.text()));
    }
    if let Some(s) = e.get_child("subject", NS_CLIENT) {
        d.push(format!("subject={}", s.text()));
    }
    if let Some(delay) = e.get_child("delay", NS_DELAY) {
        d.push(format!("delay={}", delay.attr("stamp").unwrap_or("?")));
    }
    if !room_state
        && e.name() == "iq"
        && let Some(c) = e.children().find(|c| c.name() != "error")
    {
        d.push(format!(
            "[{}]",
            c.ns().rsplit(['/', ':']).next().unwrap_or("")
        ));
    }
    d.join(" ")
}

// ---------------------------------------------------------------------------------------
// One event's outcome as a test sees it

/// One event's outcome, with every action turned into the stanza that leaves.
#[derive(Debug)]
pub struct Seen {
    pub handled: bool,
    pub user: Option<String>,
    pub persist: bool,
    pub archive: bool,
    pub notes: Vec<String>,
    /// The notes are warnings.
    pub warn: bool,
    /// `"<resource> <- <stanza>"` for a delivery, `"send <stanza>"` for the account.
    pub acts: Vec<String>,
    /// The stanzas as they leave: `Some(resource)` delivered, `None` sent by the account.
    pub stanzas: Vec<(Option<String>, Element)>,
}

impl Seen {
    pub fn of<D: Describe>(o: &Outcome, incoming: &Element) -> Seen {
        let mut seen = Seen {
            handled: o.handled,
            user: o.user.clone(),
            persist: o.persist,
            archive: o.archive,
            notes: o.notes.clone(),
            warn: o.warn,
            acts: Vec::new(),
            stanzas: Vec::new(),
        };
        for (resource, e) in leaving(o, incoming, ACCOUNT) {
            match &resource {
                Some(r) => seen.acts.push(format!("{r} <- {}", D::describe(&e, false))),
                None => seen.acts.push(format!("send {}", D::describe(&e, true))),
            }
            seen.stanzas.push((resource, e));
        }
        seen
    }

    /// (resource, description) of each delivery, in order.
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.acts
            .iter()
            .filter_map(|a| a.split_once(" <- "))
            .map(|(r, d)| (r.to_owned(), d.to_owned()))
            .collect()
    }

    /// `"<resource> <- <stanza>"` of each delivery, in order.
    pub fn delivered_acts(&self) -> Vec<String> {
        self.acts
            .iter()
            .filter(|a| !a.starts_with("send "))
            .cloned()
            .collect()
    }

    pub fn sent(&self) -> Vec<&Element> {
        self.stanzas
            .iter()
            .filter(|(r, _)| r.is_none())
            .map(|(_, e)| e)
            .collect()
    }

    /// Handled for alice, with nothing delivered and nothing sent.
    pub fn swallowed(&self) -> bool {
        self.handled && self.user.as_deref() == Some(USER) && self.acts.is_empty()
    }

    /// Not handled: Prosody goes on as if the module were not loaded.
    pub fn passed(&self) -> bool {
        !self.handled && self.acts.is_empty()
    }

    /// Not handled, no actions, nothing to store: as if the module were not loaded.
    pub fn passed_untouched(&self) -> bool {
        self.passed() && !self.persist && !self.archive
    }

    /// The id the account used for the one IQ sent.
    pub fn sent_id(&self) -> String {
        let sent = self.sent();
        assert_eq!(sent.len(), 1, "one stanza sent: {:?}", self.acts);
        sent[0].attr("id").expect("an id").to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// The world a test drives

/// The host of example.com at a clock, driven as Prosody drives it, and what the room was
/// told of alice's presence. `D` is how the stanzas that leave are described.
pub struct World<D> {
    pub host: Host,
    pub now: i64,
    /// What the room was last told of alice's presence in R: `show/status` of the last
    /// available presence the account sent to R (join or update).
    pub room_sees: Option<String>,
    describe: PhantomData<D>,
}

impl<D: Describe> World<D> {
    pub fn new() -> Self {
        Self::with(Config::default())
    }

    pub fn with(config: Config) -> Self {
        World {
            host: Host::new(DOMAIN, config),
            now: T0,
            room_sees: None,
            describe: PhantomData,
        }
    }

    fn seen(&mut self, o: &Outcome, incoming: &Element) -> Seen {
        let seen = Seen::of::<D>(o, incoming);
        for e in seen.sent() {
            let to_r = e
                .attr("to")
                .is_some_and(|t| t.starts_with(&format!("{R}/")));
            if e.name() == "presence" && e.attr("type").is_none() && to_r {
                let show = e.get_child("show", NS_CLIENT).map(Element::text);
                let status = e.get_child("status", NS_CLIENT).map(Element::text);
                self.room_sees = Some(format!(
                    "{}/{}",
                    show.as_deref().unwrap_or("available"),
                    status.as_deref().unwrap_or("")
                ));
            }
        }
        seen
    }

    /// alice/`resource` sends a stanza (`from` set as Prosody sets it).
    pub fn session(&mut self, resource: &str, xml: &str) -> Seen {
        let e = el_with(xml, &format!(" from='{ACCOUNT}/{resource}'"));
        let o = self.host.session_stanza(USER, resource, &e, self.now);
        self.seen(&o, &e)
    }

    /// alice/`resource` sends a presence update to R/`nick` (no MUC payload).
    pub fn show(&mut self, resource: &str, nick: &str, show: &str, status: &str) -> Seen {
        let xml = format!(
            "<presence to='$R/{nick}'>{}</presence>",
            payload(show, status)
        );
        self.session(resource, &xml)
    }

    /// alice/`resource` sends its broadcast presence (no `to`).
    pub fn broadcast(&mut self, resource: &str, show: &str, status: &str) -> Seen {
        self.session(
            resource,
            &format!("<presence>{}</presence>", payload(show, status)),
        )
    }

    /// A stanza arrives for the account's bare JID.
    pub fn room(&mut self, xml: &str) -> Seen {
        self.room_raw(&xml.replacen(' ', &format!(" to='{ACCOUNT}' "), 1))
    }

    /// A stanza arrives for whatever `to` it names.
    pub fn room_raw(&mut self, xml: &str) -> Seen {
        let e = el(xml);
        let o = self.host.room_stanza(&e, self.now);
        // The room's answers can make the account's presence go out (a join completing).
        self.seen(&o, &e)
    }

    pub fn end(&mut self, resource: &str) -> Seen {
        let o = self.host.session_ended(USER, resource);
        self.seen(&o, &el("<presence/>"))
    }

    pub fn bookmark(&mut self, nick: Option<&str>, password: Option<&str>, autojoin: bool) -> Seen {
        let o = self.host.bookmark(USER, R, nick, password, autojoin);
        self.seen(&o, &el("<presence/>"))
    }

    pub fn restore(&mut self, room: &str, nick: &str, password: Option<&str>) -> Seen {
        let o = self.host.restore(USER, room, nick, password);
        self.seen(&o, &el("<presence/>"))
    }

    pub fn leave(&mut self, room: &str, why: &str) -> Seen {
        let o = self.host.leave(USER, room, why);
        Seen::of::<D>(&o, &el("<presence/>"))
    }

    /// Time passes to `now`; the host does what is due (its timers).
    pub fn tick(&mut self, now: i64) -> Vec<Seen> {
        self.now = now;
        let outcomes = self.host.tick(now);
        outcomes
            .iter()
            .map(|o| self.seen(o, &el("<presence/>")))
            .collect()
    }

    pub fn members(&self) -> Vec<(String, String, Vec<String>)> {
        self.host.memberships_of(USER)
    }

    pub fn persisted(&self) -> Vec<(String, String, Option<String>)> {
        self.host.persisted(USER)
    }
}
