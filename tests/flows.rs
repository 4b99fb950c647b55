//! The behaviour contract (/work/shared/SPEC.md), flow by flow, driven through the I/O-free
//! core with the events Prosody produces: what a session of alice@example.com sends
//! (`session_stanza`), what a room sends to the account's bare JID (`room_stanza`) and a
//! session ending (`session_ended`). Each test asserts the exact actions: which session
//! gets which stanza, in which order and how often, and what leaves from the account.
//!
//! Stanzas are written without their namespace (`jabber:client` is added) and with a few
//! shorthands: `$R` the room, `$A` the account, `$MUC`, `$MU` (muc#user) and `$ST` (stanza
//! error) namespaces. Action descriptions shorten the room to `R` and the account to `A`.

mod common;

use common::{
    ACCOUNT, R, Seen, T0, USER, groupchat, join, membership, occupant, room_history, self_left,
    short, subject,
};

use minidom::Element;
use minimix::host::Config;
use minimix::stanza::{self, NS_CLIENT, NS_DELAY};
use minimix::time::format_stamp;

const OTHER_ROOM: &str = common::O;

// ---------------------------------------------------------------------------------------
// Helpers (the shared ones are in tests/common)

type World = common::World<common::Routing>;

fn join_room(room: &str, nick: &str) -> String {
    format!("<presence to='{room}/{nick}' id='join'><x xmlns='$MUC'/></presence>")
}

fn occupant_left(nick: &str) -> String {
    format!(
        "<presence type='unavailable' from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='none'/></x></presence>"
    )
}

fn self_presence(nick: &str, affiliation: &str, role: &str, codes: &[u16]) -> String {
    let codes: String = codes
        .iter()
        .map(|c| format!("<status code='{c}'/>"))
        .collect();
    format!(
        "<presence from='$R/{nick}'><x xmlns='$MU'><item affiliation='{affiliation}' role='{role}'/>{codes}</x></presence>"
    )
}

/// What Prosody's MUC sends last on a join to a room without a subject.
fn empty_subject() -> String {
    "<message type='groupchat' from='$R'><subject/></message>".to_owned()
}

fn presence_error(nick: &str, error_type: &str, condition: &str) -> String {
    format!(
        "<presence type='error' from='$R/{nick}' id='join-{nick}'><x xmlns='$MUC'/><error type='{error_type}' by='$R'><{condition} xmlns='$ST'/></error></presence>"
    )
}

/// alice joined R as "Al" from phone: bob and carol are in the room, one message of
/// history (stamped an hour ago by the room) and the subject "Topic" arrived.
fn joined() -> World {
    let mut w = World::new();
    assert_eq!(w.session("phone", &join("Al", "")).acts.len(), 1);
    w.room(&occupant("bob"));
    w.room(&occupant("carol"));
    w.room(&self_presence("Al", "member", "participant", &[100, 110]));
    w.room(&room_history("bob", "old", T0 - 3600));
    w.room(&subject("Topic"));
    assert_eq!(w.members(), membership("Al", &["phone"]));
    w
}

/// `joined()` with laptop joined too (served locally).
fn joined_twice() -> World {
    let mut w = joined();
    assert_eq!(w.session("laptop", &join("Al", "")).acts.len(), 5);
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
    w
}

fn stamp(t: i64) -> String {
    format_stamp(t)
}

// ---------------------------------------------------------------------------------------
// Flow 1: first join

#[test]
fn first_join_goes_out_from_the_account_and_answers_reach_the_session() {
    let mut w = World::new();
    let s = w.session(
        "phone",
        &join("Al", "<history maxstanzas='20'/><password>pw</password>"),
    );
    assert!(s.handled);
    assert_eq!(s.user.as_deref(), Some(USER));
    assert_eq!(s.acts, ["send presence to=R/Al id=join-Al"]);
    // The original goes out, password and history request included.
    let out = s.sent()[0];
    assert_eq!(out.attr("from"), Some(ACCOUNT));
    let x = out
        .get_child("x", "http://jabber.org/protocol/muc")
        .unwrap();
    assert!(x.has_child("password", "http://jabber.org/protocol/muc"));
    assert!(x.has_child("history", "http://jabber.org/protocol/muc"));
    // Recorded before the room answers, but not joined yet.
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(w.host.stats().memberships, 1);
    assert_eq!(w.host.stats().joined_sessions, 0);

    let s = w.room(&occupant("bob"));
    assert!(s.handled);
    assert_eq!(s.acts, ["phone <- presence from=R/bob role=participant"]);
    assert_eq!(s.stanzas[0].1.attr("to"), Some("alice@example.com/phone"));
    assert_eq!(w.members(), membership("Al", &[]));

    let s = w.room(&self_presence("Al", "owner", "moderator", &[110, 201]));
    assert_eq!(
        s.acts,
        ["phone <- presence from=R/Al role=moderator 110,201"]
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.host.stats().joined_sessions, 1);

    let s = w.room(&room_history("bob", "old", T0 - 60));
    assert_eq!(
        s.acts,
        [format!(
            "phone <- message groupchat from=R/bob id=old body=old delay={}",
            stamp(T0 - 60)
        )]
    );
    let s = w.room(&subject("Topic"));
    assert_eq!(
        s.acts,
        ["phone <- message groupchat from=R/bob id=subj subject=Topic"]
    );
    let st = w.host.stats();
    assert_eq!(
        (
            st.accounts,
            st.memberships,
            st.cached_presences,
            st.cached_messages
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn first_join_answers_reach_every_joining_session_exactly_once() {
    let mut w = World::new();
    assert_eq!(w.session("phone", &join("Al", "")).acts.len(), 1);
    w.room(&occupant("bob"));
    // laptop joins while the account's join is in flight: what arrived, nothing sent.
    let s = w.session("laptop", &join("Al", ""));
    assert!(s.handled);
    assert_eq!(s.acts, ["laptop <- presence from=R/bob role=participant"]);
    // phone repeats its join: not a second recipient, nothing sent again.
    let s = w.session("phone", &join("Al", ""));
    assert_eq!(s.acts, ["phone <- presence from=R/bob role=participant"]);

    let s = w.room(&occupant("carol"));
    assert_eq!(
        s.acts,
        [
            "phone <- presence from=R/carol role=participant",
            "laptop <- presence from=R/carol role=participant",
        ]
    );
    let s = w.room(&self_presence("Al", "member", "participant", &[110]));
    assert_eq!(
        s.acts,
        [
            "phone <- presence from=R/Al role=participant 110",
            "laptop <- presence from=R/Al role=participant 110",
        ]
    );
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
    let s = w.room(&room_history("bob", "old", T0 - 60));
    assert_eq!(s.delivered().len(), 2);
    let s = w.room(&subject("Topic"));
    assert_eq!(
        s.acts,
        [
            "phone <- message groupchat from=R/bob id=subj subject=Topic",
            "laptop <- message groupchat from=R/bob id=subj subject=Topic",
        ]
    );
    // tablet never joined: it got nothing above, and its presence does not count.
    assert_eq!(w.host.stats().joined_sessions, 2);
}

// ---------------------------------------------------------------------------------------
// Flow 2: join errors

#[test]
fn join_errors_reach_the_joining_sessions_and_drop_the_membership() {
    for (error_type, condition) in [
        ("cancel", "conflict"),            // 409
        ("auth", "not-authorized"),        // 401
        ("auth", "forbidden"),             // 403
        ("auth", "registration-required"), // 407
        ("wait", "service-unavailable"),   // 503
    ] {
        let mut w = World::new();
        w.session("phone", &join("Al", ""));
        w.session("laptop", &join("Al", ""));
        let s = w.room(&presence_error("Al", error_type, condition));
        assert!(s.handled, "{condition}");
        let line = format!("presence error from=R/Al id=join-Al err={condition}");
        assert_eq!(
            s.acts,
            [format!("phone <- {line}"), format!("laptop <- {line}")],
            "{condition}"
        );
        assert!(w.members().is_empty(), "{condition}");
        assert_eq!(w.host.stats().accounts, 0, "{condition}");
        // Nothing is forked for the room any more.
        assert!(w.room(&groupchat("bob", "hi")).passed(), "{condition}");
        // A later join starts afresh.
        let s = w.session("phone", &join("Al2", ""));
        assert_eq!(
            s.acts,
            ["send presence to=R/Al2 id=join-Al2"],
            "{condition}"
        );
        assert_eq!(w.members(), membership("Al2", &[]), "{condition}");
    }
}

// ---------------------------------------------------------------------------------------
// Flow 3: later join served locally

#[test]
fn later_join_is_served_locally_in_xep0045_order() {
    let mut w = joined();
    let s = w.session("laptop", &join("Al", ""));
    assert!(s.handled);
    assert_eq!(
        s.acts,
        [
            "laptop <- presence from=R/bob role=participant".to_owned(),
            "laptop <- presence from=R/carol role=participant".to_owned(),
            "laptop <- presence from=R/Al role=participant 100,110".to_owned(),
            format!(
                "laptop <- message groupchat from=R/bob id=old body=old delay={}",
                stamp(T0 - 3600)
            ),
            "laptop <- message groupchat from=R/bob id=subj subject=Topic".to_owned(),
        ]
    );
    // The room's delay is kept, not doubled.
    let history = &s.stanzas[3].1;
    assert_eq!(
        history
            .children()
            .filter(|c| c.is("delay", NS_DELAY))
            .count(),
        1
    );
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
}

#[test]
fn later_join_self_presence_drops_201_and_adds_210_for_another_nick() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al", "owner", "moderator", &[110, 201]));
    w.room(&empty_subject());
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(
        s.acts,
        [
            "laptop <- presence from=R/Al role=moderator 110",
            "laptop <- message groupchat from=R subject=",
        ]
    );
    let s = w.session("tablet", &join("Alice-tablet", ""));
    assert!(s.sent().is_empty());
    assert_eq!(
        s.acts,
        [
            "tablet <- presence from=R/Al role=moderator 110,210",
            "tablet <- message groupchat from=R subject=",
        ]
    );
    // The account's nick stays.
    assert_eq!(
        w.members(),
        membership("Al", &["phone", "laptop", "tablet"])
    );
}

#[test]
fn later_join_without_a_subject_gets_an_empty_one_from_the_room() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&occupant("bob"));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    w.room(&empty_subject());
    let s = w.session("laptop", &join("Al", ""));
    let last = &s.stanzas.last().unwrap().1;
    assert_eq!(last.attr("type"), Some("groupchat"));
    assert_eq!(last.attr("from"), Some(R));
    let subject = last.get_child("subject", NS_CLIENT).unwrap();
    assert_eq!(subject.text(), "");
    assert!(!last.has_child("body", NS_CLIENT));
}

/// A room with five live messages m1..m5 that arrived at T0+10 .. T0+50; the clock at T0+60.
fn room_with_history() -> World {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    w.room(&subject("Topic"));
    for i in 1..=5 {
        w.now = T0 + 10 * i;
        w.room(&groupchat("bob", &format!("m{i}")));
    }
    w.now = T0 + 60;
    w
}

/// The bodies a join with this `<history/>` request gets, checking each delay stamp.
fn history_served(history: &str) -> Vec<String> {
    let mut w = room_with_history();
    let s = w.session("laptop", &join("Al", history));
    assert!(s.sent().is_empty());
    assert_eq!(s.stanzas.len(), s.delivered().len());
    assert!(s.acts.last().unwrap().ends_with("subject=Topic"));
    s.stanzas
        .iter()
        .filter_map(|(_, e)| {
            let body = e.get_child("body", NS_CLIENT)?.text();
            let i: i64 = body[1..].parse().unwrap();
            let delay = e.get_child("delay", NS_DELAY).expect("a delay stamp");
            assert_eq!(delay.attr("from"), Some(R));
            assert_eq!(delay.attr("stamp"), Some(stamp(T0 + 10 * i).as_str()));
            Some(body)
        })
        .collect()
}

#[test]
fn later_join_history_honours_each_limit() {
    assert_eq!(history_served(""), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(history_served("<history/>"), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(history_served("<history maxstanzas='2'/>"), ["m4", "m5"]);
    assert!(history_served("<history maxstanzas='0'/>").is_empty());
    assert!(history_served("<history maxchars='0'/>").is_empty());
    // Clock at T0+60: the last 25 seconds hold m4 (T0+40) and m5 (T0+50).
    assert_eq!(history_served("<history seconds='25'/>"), ["m4", "m5"]);
    let since = stamp(T0 + 25);
    assert_eq!(
        history_served(&format!("<history since='{since}'/>")),
        ["m3", "m4", "m5"]
    );
    assert_eq!(
        history_served(&format!("<history since='{since}' maxstanzas='1'/>")),
        ["m5"]
    );
    // maxchars: room for one message only (they all serialise to the same length).
    let one = {
        let mut w = room_with_history();
        let s = w.session("laptop", &join("Al", ""));
        let (_, m5) = s
            .stanzas
            .iter()
            .find(|(_, e)| {
                e.get_child("body", NS_CLIENT)
                    .is_some_and(|b| b.text() == "m5")
            })
            .unwrap();
        // Measured as the core measures it: as the room sent it to the account.
        let mut m5 = m5.clone();
        stanza::set_attr(&mut m5, "to", ACCOUNT);
        String::from(&m5).len()
    };
    assert_eq!(
        history_served(&format!("<history maxchars='{}'/>", one + 10)),
        ["m5"]
    );
}

#[test]
fn join_while_the_account_join_is_in_flight_gets_what_arrived_then_the_rest() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&occupant("bob"));
    w.room(&occupant("carol"));
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(
        s.acts,
        [
            "laptop <- presence from=R/bob role=participant",
            "laptop <- presence from=R/carol role=participant",
        ]
    );
    let mut laptop = Vec::new();
    for xml in [
        self_presence("Al", "member", "participant", &[110]),
        room_history("bob", "old", T0 - 60),
        subject("Topic"),
    ] {
        let s = w.room(&xml);
        assert_eq!(s.delivered().len(), 2);
        laptop.extend(s.delivered().into_iter().filter(|(r, _)| r == "laptop"));
    }
    let laptop: Vec<String> = laptop.into_iter().map(|(_, d)| d).collect();
    assert_eq!(
        laptop,
        [
            "presence from=R/Al role=participant 110".to_owned(),
            format!(
                "message groupchat from=R/bob id=old body=old delay={}",
                stamp(T0 - 60)
            ),
            "message groupchat from=R/bob id=subj subject=Topic".to_owned(),
        ]
    );
}

/// SPEC flow 3: a later join gets the room "in XEP-0045 order" and one subject. After the
/// self-presence (110) the room still sends history and subject; a session joining in that
/// window must not get a local (empty) subject before the real history and subject.
#[test]

fn join_between_self_presence_and_subject_keeps_xep0045_order() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&occupant("bob"));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    let mut laptop: Vec<String> = w
        .session("laptop", &join("Al", ""))
        .delivered()
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    for xml in [room_history("bob", "old", T0 - 60), subject("Topic")] {
        let s = w.room(&xml);
        laptop.extend(
            s.delivered()
                .into_iter()
                .filter(|(r, _)| r == "laptop")
                .map(|(_, d)| d),
        );
    }
    assert_eq!(
        laptop,
        [
            "presence from=R/bob role=participant".to_owned(),
            "presence from=R/Al role=participant 110".to_owned(),
            format!(
                "message groupchat from=R/bob id=old body=old delay={}",
                stamp(T0 - 60)
            ),
            "message groupchat from=R/bob id=subj subject=Topic".to_owned(),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Flow 4: fork

#[test]
fn room_traffic_is_forked_to_each_joined_session_exactly_once() {
    let mut w = joined_twice();
    // tablet is online but never joined R.
    let s = w.room(&groupchat("bob", "hello"));
    assert!(s.handled);
    assert_eq!(s.user.as_deref(), Some(USER));
    assert_eq!(
        s.acts,
        [
            "phone <- message groupchat from=R/bob id=hello body=hello",
            "laptop <- message groupchat from=R/bob id=hello body=hello",
        ]
    );
    let to: Vec<_> = s
        .stanzas
        .iter()
        .map(|(_, e)| e.attr("to").unwrap())
        .collect();
    assert_eq!(to, ["alice@example.com/phone", "alice@example.com/laptop"]);

    let s = w.room(&occupant("dave"));
    assert_eq!(
        s.acts,
        [
            "phone <- presence from=R/dave role=participant",
            "laptop <- presence from=R/dave role=participant",
        ]
    );
    // A private message through the room.
    let s = w.room(
        "<message type='chat' from='$R/bob' id='pm1'><body>psst</body><x xmlns='$MU'/></message>",
    );
    assert_eq!(
        s.acts,
        [
            "phone <- message chat from=R/bob id=pm1 body=psst",
            "laptop <- message chat from=R/bob id=pm1 body=psst",
        ]
    );
    // A message from the room itself (e.g. a configuration change notice).
    let s = w.room("<message type='groupchat' from='$R' id='c1'><x xmlns='$MU'><status code='104'/></x></message>");
    assert_eq!(
        s.acts,
        [
            "phone <- message groupchat from=R id=c1 104",
            "laptop <- message groupchat from=R id=c1 104",
        ]
    );
}

#[test]
fn traffic_of_rooms_alice_has_not_joined_passes() {
    let mut w = joined();
    let other = |xml: &str| xml.replace("$R", OTHER_ROOM);
    assert!(w.room(&other(&groupchat("bob", "hi"))).passed());
    assert!(w.room(&other(&occupant("bob"))).passed());
    assert!(
        w.room(&other(
            "<message type='chat' from='$R/bob'><body>pm</body><x xmlns='$MU'/></message>"
        ))
        .passed()
    );
    // A mediated invitation from another room, and a direct one from a user.
    assert!(
        w.room(&other("<message from='$R' id='inv'><x xmlns='$MU'><invite from='bob@example.com'><reason>come</reason></invite></x></message>"))
            .passed()
    );
    assert!(
        w.room("<message from='bob@example.com/pc' id='dinv'><x xmlns='jabber:x:conference' jid='other@conference.example.com'/></message>")
            .passed()
    );
    assert_eq!(w.host.stats().memberships, 1);
}

// ---------------------------------------------------------------------------------------
// Flow 5: no session online

#[test]
fn with_no_session_online_the_room_is_swallowed_and_cached_for_later_joins() {
    let mut w = joined();
    let s = w.end("phone");
    assert!(s.acts.is_empty());
    assert_eq!(w.members(), membership("Al", &[]));

    w.now = T0 + 100;
    assert!(w.room(&groupchat("carol", "while-away")).swallowed());
    assert!(w.room(&occupant("dave")).swallowed());
    assert!(w.room(&occupant_left("bob")).swallowed());
    assert!(w.room(&subject("New topic")).swallowed());
    assert!(
        w.room(
            "<message type='chat' from='$R/carol' id='pm'><body>pm</body><x xmlns='$MU'/></message>"
        )
        .swallowed()
    );

    w.now = T0 + 200;
    let s = w.session("laptop", &join("Al", ""));
    assert!(s.sent().is_empty());
    assert_eq!(
        s.acts,
        [
            "laptop <- presence from=R/carol role=participant".to_owned(),
            "laptop <- presence from=R/dave role=participant".to_owned(),
            "laptop <- presence from=R/Al role=participant 100,110".to_owned(),
            format!(
                "laptop <- message groupchat from=R/bob id=old body=old delay={}",
                stamp(T0 - 3600)
            ),
            format!(
                "laptop <- message groupchat from=R/carol id=while-away body=while-away delay={}",
                stamp(T0 + 100)
            ),
            "laptop <- message groupchat from=R/bob id=subj subject=New topic".to_owned(),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Flow 6: sending

#[test]
fn what_a_joined_session_sends_to_the_room_leaves_from_the_account() {
    let mut w = joined();
    for (xml, line) in [
        (
            "<message type='groupchat' to='$R' id='g1'><body>hi</body></message>",
            "send message groupchat to=R id=g1 body=hi",
        ),
        (
            "<message type='chat' to='$R/bob' id='pm1'><body>psst</body><x xmlns='$MU'/></message>",
            "send message chat to=R/bob id=pm1 body=psst",
        ),
        (
            "<message to='$R' id='inv1'><x xmlns='$MU'><invite to='dave@example.com'/></x></message>",
            "send message to=R id=inv1",
        ),
        (
            "<message type='groupchat' to='$R' id='s1'><subject>New</subject></message>",
            "send message groupchat to=R id=s1 subject=New",
        ),
    ] {
        let s = w.session("phone", xml);
        assert!(s.handled, "{xml}");
        assert_eq!(s.acts, [line], "{xml}");
        assert_eq!(s.sent()[0].attr("from"), Some(ACCOUNT));
    }
    // The invitation goes out untouched.
    let s = w.session("phone", "<message to='$R' id='inv2'><x xmlns='$MU'><invite to='dave@example.com'><reason>r</reason></invite></x></message>");
    let x = s.sent()[0]
        .get_child("x", "http://jabber.org/protocol/muc#user")
        .unwrap();
    assert_eq!(
        x.get_child("invite", "http://jabber.org/protocol/muc#user")
            .and_then(|i| i.attr("to")),
        Some("dave@example.com")
    );
}

#[test]
fn iqs_get_a_module_id_and_the_reply_reaches_only_the_asking_session() {
    let mut w = joined_twice();
    let iqs = [
        (
            "<iq type='get' to='$R' id='q1'><ping xmlns='urn:xmpp:ping'/></iq>",
            R.to_owned(),
            "[ping]",
        ),
        (
            "<iq type='get' to='$R/bob' id='q2'><vCard xmlns='vcard-temp'/></iq>",
            format!("{R}/bob"),
            "[vcard-temp]",
        ),
        (
            "<iq type='get' to='$R/bob' id='q3'><query xmlns='jabber:iq:version'/></iq>",
            format!("{R}/bob"),
            "[version]",
        ),
        (
            "<iq type='set' to='$R' id='q4'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='bob' role='visitor'/></query></iq>",
            R.to_owned(),
            "[muc#admin]",
        ),
        (
            "<iq type='get' to='$R' id='q5'><query xmlns='http://jabber.org/protocol/muc#owner'/></iq>",
            R.to_owned(),
            "[muc#owner]",
        ),
    ];
    let mut ours = Vec::new();
    for (i, (xml, to, payload)) in iqs.iter().enumerate() {
        let s = w.session("laptop", xml);
        assert!(s.handled, "{xml}");
        let id = s.sent_id();
        assert_ne!(id, format!("q{}", i + 1));
        let kind = if xml.contains("type='set'") {
            "set"
        } else {
            "get"
        };
        assert_eq!(
            s.acts,
            [format!("send iq {kind} to={} id={id} {payload}", short(to))]
        );
        ours.push(id);
    }
    let mut unique = ours.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ours.len(), "module ids are unique: {ours:?}");
    assert_eq!(w.host.stats().pending_iqs, 5);

    for (i, ((_, to, _), id)) in iqs.iter().zip(&ours).enumerate() {
        // A reply with that id from anyone else is not routed.
        let spoof = w.room(&format!(
            "<iq type='result' from='{OTHER_ROOM}/bob' id='{id}'/>"
        ));
        assert!(spoof.passed());
        let s = w.room(&format!("<iq type='result' from='{to}' id='{id}'/>"));
        assert!(s.handled);
        assert_eq!(
            s.acts,
            [format!(
                "laptop <- iq result from={} id=q{}",
                short(to),
                i + 1
            )]
        );
        // Only once.
        assert!(
            w.room(&format!("<iq type='result' from='{to}' id='{id}'/>"))
                .passed()
        );
    }
    assert_eq!(w.host.stats().pending_iqs, 0);
}

#[test]
fn same_iq_id_from_two_sessions_is_told_apart() {
    let mut w = joined_twice();
    let xml = "<iq type='get' to='$R/bob' id='1'><query xmlns='jabber:iq:version'/></iq>";
    let phone = w.session("phone", xml).sent_id();
    let laptop = w.session("laptop", xml).sent_id();
    assert_ne!(phone, laptop);
    let s = w.room(&format!("<iq type='error' from='$R/bob' id='{laptop}'><error type='cancel'><service-unavailable xmlns='$ST'/></error></iq>"));
    assert_eq!(
        s.acts,
        ["laptop <- iq error from=R/bob id=1 err=service-unavailable"]
    );
    let s = w.room(&format!("<iq type='result' from='$R/bob' id='{phone}'><query xmlns='jabber:iq:version'><name>x</name></query></iq>"));
    assert_eq!(s.acts, ["phone <- iq result from=R/bob id=1 [version]"]);
}

#[test]
fn error_stanzas_from_a_joined_session_are_dropped() {
    let mut w = joined();
    // Either would make the room kick the account.
    let s = w.session("phone", "<message type='error' to='$R/bob' id='e1'><error type='cancel'><service-unavailable xmlns='$ST'/></error></message>");
    assert!(s.swallowed());
    let s = w.session("phone", "<message type='error' to='$R' id='e2'><error type='cancel'><item-not-found xmlns='$ST'/></error></message>");
    assert!(s.swallowed());
    let s = w.session("phone", "<presence type='error' to='$R/Al' id='e3'><error type='cancel'><gone xmlns='$ST'/></error></presence>");
    assert!(s.swallowed());
    let s = w.session("phone", "<presence type='error' to='$R/bob' id='e4'><error type='cancel'><recipient-unavailable xmlns='$ST'/></error></presence>");
    assert!(s.swallowed());
    assert_eq!(w.members(), membership("Al", &["phone"]));
}

#[test]
fn a_session_that_did_not_join_speaks_for_itself() {
    let mut w = joined();
    for xml in [
        "<message type='groupchat' to='$R' id='g1'><body>hi</body></message>",
        "<message type='chat' to='$R/bob' id='pm1'><body>psst</body></message>",
        "<iq type='get' to='$R/bob' id='v1'><vCard xmlns='vcard-temp'/></iq>",
        "<presence type='unavailable' to='$R/Al'/>",
        "<message type='error' to='$R/bob' id='e1'><error type='cancel'><gone xmlns='$ST'/></error></message>",
        "<presence type='error' to='$R/Al' id='e2'><error type='cancel'><gone xmlns='$ST'/></error></presence>",
    ] {
        assert!(w.session("tablet", xml).passed(), "{xml}");
    }
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.host.stats().pending_iqs, 0);
}

#[test]
fn an_iq_the_room_forwards_to_the_account_goes_to_one_session_and_its_reply_out() {
    let mut w = joined_twice();
    let s =
        w.room("<iq type='get' from='$R/bob' id='fwd1'><query xmlns='jabber:iq:version'/></iq>");
    assert_eq!(s.acts, ["laptop <- iq get from=R/bob id=fwd1 [version]"]);
    let s = w.session(
        "laptop",
        "<iq type='result' to='$R/bob' id='fwd1'><query xmlns='jabber:iq:version'/></iq>",
    );
    assert_eq!(s.acts, ["send iq result to=R/bob id=fwd1 [version]"]);
}

/// Prosody's room sends vCard and PEP queries for an occupant to the occupant's bare JID
/// on purpose (muc.lib.lua handle_iq_to_occupant), so that the user's server answers them
/// (avatars). Since the occupant is the account, these must be left to mod_vcard/mod_pep.
#[test]

fn vcard_and_pep_queries_from_the_room_are_left_to_the_server() {
    let mut w = joined();
    assert!(
        w.room("<iq type='get' from='$R/bob' id='vc'><vCard xmlns='vcard-temp'/></iq>")
            .passed()
    );
    assert!(
        w.room("<iq type='get' from='$R/bob' id='ps'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:avatar:metadata'/></pubsub></iq>")
            .passed()
    );
    assert!(
        w.room("<iq type='get' from='$R/bob' id='vc4'><vcard xmlns='urn:ietf:params:xml:ns:vcard-4.0'/></iq>")
            .passed()
    );
}

// ---------------------------------------------------------------------------------------
// Flow 7: self-ping

fn self_ping(id: &str) -> String {
    format!("<iq type='get' to='$R/Al' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>")
}

#[test]
fn self_ping_from_a_joined_session_is_answered_by_the_room() {
    let mut w = joined_twice();
    let s = w.session("phone", &self_ping("sp1"));
    let id = s.sent_id();
    assert_eq!(s.acts, [format!("send iq get to=R/Al id={id} [ping]")]);
    let s = w.room(&format!("<iq type='result' from='$R/Al' id='{id}'/>"));
    assert_eq!(s.acts, ["phone <- iq result from=R/Al id=sp1"]);
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
}

#[test]
fn self_ping_not_acceptable_drops_the_membership_and_is_relayed() {
    let mut w = joined_twice();
    let id = w.session("phone", &self_ping("sp1")).sent_id();
    let s = w.room(&format!(
        "<iq type='error' from='$R/Al' id='{id}'><error type='cancel' by='$R'><not-acceptable xmlns='$ST'/></error></iq>"
    ));
    assert!(s.handled);
    assert_eq!(
        s.acts,
        ["phone <- iq error from=R/Al id=sp1 err=not-acceptable"]
    );
    assert!(w.members().is_empty());
    assert_eq!(w.host.stats().accounts, 0);
    // The room is no longer forked; the client's rejoin goes to the room for real.
    assert!(w.room(&groupchat("bob", "hi")).passed());
    let s = w.session("phone", &join("Al", ""));
    assert_eq!(s.acts, ["send presence to=R/Al id=join-Al"]);
}

/// XEP-0410 §3.2: `service-unavailable` and `feature-not-implemented` mean the ping reached
/// a client of the occupant, i.e. still joined; SPEC flow 7 drops only on `not-acceptable`.
#[test]

fn self_ping_errors_that_mean_still_joined_keep_the_membership() {
    for condition in ["service-unavailable", "feature-not-implemented"] {
        let mut w = joined();
        let id = w.session("phone", &self_ping("sp1")).sent_id();
        let s = w.room(&format!(
            "<iq type='error' from='$R/Al' id='{id}'><error type='cancel'><{condition} xmlns='$ST'/></error></iq>"
        ));
        assert_eq!(
            s.acts,
            [format!(
                "phone <- iq error from=R/Al id=sp1 err={condition}"
            )]
        );
        assert_eq!(w.members(), membership("Al", &["phone"]), "{condition}");
        assert!(w.room(&groupchat("bob", "hi")).handled, "{condition}");
    }
}

#[test]
fn self_ping_from_a_session_that_did_not_join_gets_not_acceptable_locally() {
    let mut w = joined();
    let s = w.session("tablet", &self_ping("sp9"));
    assert!(s.handled);
    assert_eq!(
        s.acts,
        ["tablet <- iq error from=R/Al id=sp9 err=not-acceptable"]
    );
    let error = s.stanzas[0]
        .1
        .children()
        .find(|c| c.name() == "error")
        .unwrap();
    assert_eq!(error.attr("type"), Some("cancel"));
    assert_eq!(w.host.stats().pending_iqs, 0);
    // When the account is not in the room at all, the room answers for itself.
    let mut w = World::new();
    assert!(w.session("tablet", &self_ping("sp9")).passed());
}

// ---------------------------------------------------------------------------------------
// Flows 9 and 10: leaving

#[test]
fn leave_of_one_of_several_sessions_is_answered_locally() {
    let mut w = joined_twice();
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al' id='l1'/>");
    assert!(s.handled);
    assert_eq!(
        s.acts,
        ["phone <- presence unavailable from=R/Al role=none 110"]
    );
    let item = stanza::muc_item(&s.stanzas[0].1).unwrap();
    assert_eq!(item.attr("affiliation"), Some("member"));
    assert_eq!(w.members(), membership("Al", &["laptop"]));
    let s = w.room(&groupchat("bob", "after"));
    assert_eq!(
        s.acts,
        ["laptop <- message groupchat from=R/bob id=after body=after"]
    );
    // A second unavailable from phone is no longer ours.
    assert!(
        w.session("phone", "<presence type='unavailable' to='$R/Al'/>")
            .passed()
    );
}

#[test]
fn leave_of_the_last_session_leaves_the_room() {
    let mut w = joined();
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al' id='l1'/>");
    assert!(s.handled);
    assert_eq!(s.acts, ["send presence unavailable to=R/Al id=l1"]);
    // While the room has not answered, its traffic goes nowhere (and is not bounced).
    assert!(w.room(&groupchat("bob", "late")).swallowed());
    assert!(w.room(&occupant("dave")).swallowed());
    let s = w.room(&self_left("Al"));
    assert!(s.handled);
    assert_eq!(
        s.acts,
        ["phone <- presence unavailable from=R/Al role=none 110"]
    );
    assert!(w.members().is_empty());
    let st = w.host.stats();
    assert_eq!((st.accounts, st.memberships), (0, 0));
    assert!(w.room(&groupchat("bob", "gone")).passed());
}

#[test]
fn leave_during_the_join_waits_for_the_room() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al' id='l1'/>");
    assert_eq!(s.acts, ["send presence unavailable to=R/Al id=l1"]);
    assert!(w.room(&occupant("bob")).swallowed());
    assert!(
        w.room(&self_presence("Al", "member", "participant", &[110]))
            .swallowed()
    );
    let s = w.room(&self_left("Al"));
    assert_eq!(
        s.acts,
        ["phone <- presence unavailable from=R/Al role=none 110"]
    );
    assert!(w.members().is_empty());
}

// ---------------------------------------------------------------------------------------
// Flow 11: session ends without leaving

#[test]
fn session_end_keeps_the_account_joined() {
    let mut w = joined_twice();
    let s = w.end("phone");
    assert!(s.acts.is_empty());
    assert_eq!(w.members(), membership("Al", &["laptop"]));
    let s = w.room(&groupchat("bob", "x"));
    assert_eq!(
        s.acts,
        ["laptop <- message groupchat from=R/bob id=x body=x"]
    );
    let s = w.end("laptop");
    assert!(s.acts.is_empty());
    assert_eq!(w.members(), membership("Al", &[]));
    assert!(w.room(&groupchat("bob", "y")).swallowed());
    assert!(w.room(&occupant("dave")).swallowed());
    // Ending a session that never joined changes nothing.
    assert!(w.end("tablet").acts.is_empty());
    assert_eq!(w.host.stats().memberships, 1);
}

#[test]
fn iqs_pending_for_an_ended_session_are_forgotten() {
    let mut w = joined_twice();
    let id = w
        .session(
            "phone",
            "<iq type='get' to='$R/bob' id='v1'><vCard xmlns='vcard-temp'/></iq>",
        )
        .sent_id();
    w.end("phone");
    assert_eq!(w.host.stats().pending_iqs, 0);
    assert!(
        w.room(&format!("<iq type='result' from='$R/bob' id='{id}'/>"))
            .passed()
    );
}

// ---------------------------------------------------------------------------------------
// Flow 12: others leave

#[test]
fn others_leaving_is_forked_and_forgotten() {
    let mut w = joined_twice();
    assert_eq!(w.host.stats().cached_presences, 2);
    let s = w.room(&occupant_left("bob"));
    assert_eq!(
        s.acts,
        [
            "phone <- presence unavailable from=R/bob role=none",
            "laptop <- presence unavailable from=R/bob role=none",
        ]
    );
    assert_eq!(w.host.stats().cached_presences, 1);
    // carol changes nick to caro: 303 then the new presence.
    let s = w.room("<presence type='unavailable' from='$R/carol'><x xmlns='$MU'><item affiliation='member' role='participant' nick='caro'/><status code='303'/></x></presence>");
    assert_eq!(s.delivered().len(), 2);
    assert_eq!(w.room(&occupant("caro")).delivered().len(), 2);
    let s = w.session("tablet", &join("Al", "<history maxstanzas='0'/>"));
    assert_eq!(
        s.acts,
        [
            "tablet <- presence from=R/caro role=participant",
            "tablet <- presence from=R/Al role=participant 100,110",
            "tablet <- message groupchat from=R/bob id=subj subject=Topic",
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Room creation and configuration

#[test]
fn room_creation_and_owner_configuration_go_through_the_account() {
    let mut w = World::new();
    assert_eq!(w.session("phone", &join("Al", "")).acts.len(), 1);
    let s = w.room(&self_presence("Al", "owner", "moderator", &[110, 201]));
    assert_eq!(
        s.acts,
        ["phone <- presence from=R/Al role=moderator 110,201"]
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));

    let s = w.session("phone", "<iq type='get' to='$R' id='cfg1'><query xmlns='http://jabber.org/protocol/muc#owner'/></iq>");
    let id = s.sent_id();
    assert_ne!(id, "cfg1");
    assert_eq!(s.acts, [format!("send iq get to=R id={id} [muc#owner]")]);
    let s = w.room(&format!("<iq type='result' from='$R' id='{id}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='form'/></query></iq>"));
    assert_eq!(s.acts, ["phone <- iq result from=R id=cfg1 [muc#owner]"]);
    assert!(
        s.stanzas[0]
            .1
            .get_child("query", "http://jabber.org/protocol/muc#owner")
            .unwrap()
            .has_child("x", "jabber:x:data")
    );

    let s = w.session("phone", "<iq type='set' to='$R' id='cfg2'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>");
    let id = s.sent_id();
    assert_eq!(s.acts, [format!("send iq set to=R id={id} [muc#owner]")]);
    let s = w.room(&format!("<iq type='result' from='$R' id='{id}'/>"));
    assert_eq!(s.acts, ["phone <- iq result from=R id=cfg2"]);
    assert_eq!(w.host.stats().pending_iqs, 0);
}

// ---------------------------------------------------------------------------------------
// Limits

#[test]
fn max_rooms_is_a_resource_constraint_error_and_nothing_is_sent() {
    let mut w = World::with(Config {
        max_rooms: 1,
        ..Config::default()
    });
    assert_eq!(w.session("phone", &join("Al", "")).acts.len(), 1);
    let s = w.session("phone", &join_room(OTHER_ROOM, "Al"));
    assert!(s.handled);
    assert_eq!(
        s.acts,
        [
            "phone <- presence error from=other@conference.example.com/Al id=join err=resource-constraint"
        ]
    );
    let error = s.stanzas[0]
        .1
        .children()
        .find(|c| c.name() == "error")
        .unwrap();
    assert_eq!(error.attr("type"), Some("wait"));
    assert_eq!(w.members(), membership("Al", &[]));
    // The room already joined still takes more sessions.
    w.room(&self_presence("Al", "member", "participant", &[110]));
    assert!(w.session("laptop", &join("Al", "")).sent().is_empty());
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
}

#[test]
fn max_occupants_limits_the_cache_but_not_the_fork() {
    let mut w = World::with(Config {
        max_occupants: 2,
        ..Config::default()
    });
    w.session("phone", &join("Al", ""));
    for nick in ["bob", "carol", "dave"] {
        assert_eq!(w.room(&occupant(nick)).delivered().len(), 1, "{nick}");
    }
    assert_eq!(w.host.stats().cached_presences, 2);
    w.room(&self_presence("Al", "member", "participant", &[110]));
    w.room(&empty_subject());
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(
        s.acts,
        [
            "laptop <- presence from=R/bob role=participant",
            "laptop <- presence from=R/carol role=participant",
            "laptop <- presence from=R/Al role=participant 110",
            "laptop <- message groupchat from=R subject=",
        ]
    );
}

#[test]
fn history_length_keeps_only_the_latest_messages() {
    let mut w = World::with(Config {
        history_length: 2,
        ..Config::default()
    });
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    for body in ["a", "b", "c"] {
        assert_eq!(w.room(&groupchat("bob", body)).delivered().len(), 1);
    }
    assert_eq!(w.host.stats().cached_messages, 2);
    let s = w.session("laptop", &join("Al", ""));
    let bodies: Vec<_> = s
        .stanzas
        .iter()
        .filter_map(|(_, e)| e.get_child("body", NS_CLIENT).map(Element::text))
        .collect();
    assert_eq!(bodies, ["b", "c"]);
}

#[test]
fn pending_iqs_are_bounded_in_number_and_time() {
    let mut w = World::with(Config {
        max_pending_iqs: 1,
        iq_timeout: 120,
        ..Config::default()
    });
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    let version = "<iq type='get' to='$R/bob' id='v'><query xmlns='jabber:iq:version'/></iq>";
    let first = w.session("phone", version).sent_id();
    let second = w.session("phone", version).sent_id();
    assert_eq!(w.host.stats().pending_iqs, 1);
    assert!(
        w.room(&format!("<iq type='result' from='$R/bob' id='{first}'/>"))
            .passed()
    );
    assert_eq!(
        w.room(&format!("<iq type='result' from='$R/bob' id='{second}'/>"))
            .acts,
        ["phone <- iq result from=R/bob id=v"]
    );

    let mut w = World::with(Config {
        iq_timeout: 120,
        ..Config::default()
    });
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    let old = w.session("phone", version).sent_id();
    w.now += 121;
    let new = w.session("phone", version).sent_id();
    assert!(
        w.room(&format!("<iq type='result' from='$R/bob' id='{old}'/>"))
            .passed()
    );
    assert_eq!(
        w.room(&format!("<iq type='result' from='$R/bob' id='{new}'/>"))
            .delivered()
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------
// Exclusions, other hosts, spoofing

#[test]
fn excluded_hosts_and_rooms_are_left_alone() {
    let mut w = World::with(Config {
        excluded_hosts: vec!["irc.example.org".to_owned()],
        excluded_rooms: vec![R.to_owned()],
        ..Config::default()
    });
    assert!(w.session("phone", &join("Al", "")).passed());
    assert!(
        w.session(
            "phone",
            &join_room("#chan%irc.libera.chat@irc.example.org", "Al")
        )
        .passed()
    );
    assert!(
        w.session(
            "phone",
            "<message type='groupchat' to='$R' id='g'><body>x</body></message>"
        )
        .passed()
    );
    assert!(
        w.room(&self_presence("Al", "member", "participant", &[110]))
            .passed()
    );
    assert!(w.room(&groupchat("bob", "hi")).passed());
    assert_eq!(w.host.stats().accounts, 0);
    // Other rooms still work.
    let s = w.session("phone", &join_room(OTHER_ROOM, "Al"));
    assert_eq!(s.sent().len(), 1);
}

#[test]
fn stanzas_to_and_from_other_places_pass() {
    let mut w = joined();
    // To this host (a user, not a room), to a bare domain, to the room's bare JID.
    for xml in [
        "<message type='chat' to='bob@example.com' id='c'><body>hi</body></message>",
        "<iq type='get' to='conference.example.com' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        "<presence to='$R' type='unavailable'/>",
    ] {
        assert!(w.session("phone", xml).passed(), "{xml}");
    }
    // A joined session's presence to the bare room JID is a presence update, as Prosody's
    // MUC takes it from an occupant: unchanged here, so the room hears nothing.
    let s = w.session("phone", "<presence to='$R'/>");
    assert!(s.handled);
    assert!(s.acts.is_empty(), "{:?}", s.acts);
    // For an account of another host, for a session's full JID, or without a sender.
    assert!(
        w.room_raw(&groupchat("bob", "x").replacen(' ', " to='alice@elsewhere.org' ", 1))
            .passed()
    );
    assert!(
        w.room_raw(&groupchat("bob", "x").replacen(' ', " to='alice@example.com/phone' ", 1))
            .passed()
    );
    assert!(
        w.room("<message type='groupchat' id='n'><body>x</body></message>")
            .passed()
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));
}

#[test]
fn room_stanzas_for_rooms_never_joined_create_no_state() {
    let mut w = World::new();
    let fake_self = self_presence("Al", "owner", "moderator", &[110, 201]);
    assert!(w.room(&fake_self).passed());
    assert!(w.room(&occupant("bob")).passed());
    assert!(w.room(&groupchat("bob", "spam")).passed());
    assert!(w.room(&subject("spam")).passed());
    assert!(w.room(&self_left("Al")).passed());
    assert!(w.room("<iq type='result' from='$R' id='mmx1'/>").passed());
    assert_eq!(w.host.stats().accounts, 0);
    assert!(w.members().is_empty());

    // With R joined, a presence from another room (or for another account) is not ours.
    let mut w = joined();
    assert!(w.room(&fake_self.replace("$R", OTHER_ROOM)).passed());
    assert!(
        w.room_raw(&occupant("eve").replacen(' ', " to='bob@example.com' ", 1))
            .passed()
    );
    let st = w.host.stats();
    assert_eq!(
        (st.accounts, st.memberships, st.cached_presences),
        (1, 1, 2)
    );
}

// ---------------------------------------------------------------------------------------
// Around the listed flows: rejoin while leaving, removal (13), nick change (14), bad input

#[test]
fn rejoin_while_the_leave_is_in_flight_starts_a_fresh_join() {
    let mut w = joined();
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al' id='l1'/>");
    assert_eq!(s.acts, ["send presence unavailable to=R/Al id=l1"]);
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(s.acts, ["send presence to=R/Al id=join-Al"]);
    // The room answers the leave (to the leaver), then the join (to the joiner).
    let s = w.room(&self_left("Al"));
    assert_eq!(
        s.acts,
        ["phone <- presence unavailable from=R/Al role=none 110"]
    );
    assert_eq!(w.members(), membership("Al", &[]));
    let s = w.room(&occupant("bob"));
    assert_eq!(s.acts, ["laptop <- presence from=R/bob role=participant"]);
    let s = w.room(&self_presence("Al", "member", "participant", &[110]));
    assert_eq!(
        s.acts,
        ["laptop <- presence from=R/Al role=participant 110"]
    );
    assert_eq!(w.members(), membership("Al", &["laptop"]));
}

#[test]
fn removal_by_the_room_reaches_every_session_and_drops_the_membership() {
    // (332 and 333 are outages, not removals: tests/outage.rs.)
    for code in [307, 301, 321, 322] {
        let mut w = joined_twice();
        let s = w.room(&format!(
            "<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='none' role='none'/><status code='110'/><status code='{code}'/></x></presence>"
        ));
        let line = format!("presence unavailable from=R/Al role=none 110,{code}");
        assert_eq!(
            s.acts,
            [format!("phone <- {line}"), format!("laptop <- {line}")]
        );
        assert!(w.members().is_empty(), "{code}");
        assert!(w.room(&groupchat("bob", "x")).passed(), "{code}");
    }
}

#[test]
fn nick_change_reaches_every_session_and_a_conflict_only_the_asker() {
    let mut w = joined_twice();
    let s = w.session("laptop", "<presence to='$R/bob' id='n1'/>");
    assert_eq!(s.acts, ["send presence to=R/bob id=n1"]);
    let s = w.room(&presence_error("bob", "cancel", "conflict").replace("join-bob", "n1"));
    assert_eq!(
        s.acts,
        ["laptop <- presence error from=R/bob id=n1 err=conflict"]
    );
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));

    let s = w.session("phone", "<presence to='$R/Alice' id='n2'/>");
    assert_eq!(s.acts, ["send presence to=R/Alice id=n2"]);
    let s = w.room("<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='participant' nick='Alice'/><status code='303'/><status code='110'/></x></presence>");
    assert_eq!(s.delivered().len(), 2);
    let s = w.room(&self_presence("Alice", "member", "participant", &[110]));
    assert_eq!(
        s.acts,
        [
            "phone <- presence from=R/Alice role=participant 110",
            "laptop <- presence from=R/Alice role=participant 110",
        ]
    );
    assert_eq!(w.members(), membership("Alice", &["phone", "laptop"]));
}

/// SPEC "Rules": bad input changes no other state. A refused first join leaves an empty
/// account entry behind (counted in `stats().accounts`).
#[test]

fn a_refused_first_join_leaves_no_state() {
    let mut w = World::new();
    let nick = "n".repeat(2000);
    assert!(w.session("phone", &join(&nick, "")).passed());
    assert_eq!(w.host.stats().accounts, 0);

    let mut w = World::with(Config {
        max_rooms: 0,
        ..Config::default()
    });
    let s = w.session("phone", &join("Al", ""));
    assert_eq!(s.delivered().len(), 1);
    assert_eq!(w.host.stats().accounts, 0);
}

// ---------------------------------------------------------------------------------------
// Only MUC traffic is the module's (SPEC, rules that always hold)

/// A directed presence to a contact's full JID: `<status/>`, no `<x/>`.
fn directed_presence(to: &str) -> String {
    format!("<presence to='{to}' id='dp'><status>around</status></presence>")
}

#[test]
fn a_directed_presence_to_a_contact_is_left_alone_also_from_a_session_in_a_room() {
    let mut w = joined();
    for contact in [
        "bob@remote.example/desk",
        "carol@other.example.com/laptop",
        "dave@conference.example.net/x",
    ] {
        let s = w.session("phone", &directed_presence(contact));
        assert!(s.passed(), "{contact}: {:?}", s.acts);
        // Its end, a probe and an error to the contact are not the module's either.
        for t in ["unavailable", "probe", "error"] {
            let s = w.session("phone", &format!("<presence to='{contact}' type='{t}'/>"));
            assert!(s.passed(), "{contact} {t}: {:?}", s.acts);
        }
        // Chat and IQs to the contact pass too.
        let s = w.session(
            "phone",
            &format!("<message to='{contact}' type='chat'><body>hi</body></message>"),
        );
        assert!(s.passed(), "{contact}: {:?}", s.acts);
        let s = w.session(
            "phone",
            &format!(
                "<iq to='{contact}' type='get' id='v'><query xmlns='jabber:iq:version'/></iq>"
            ),
        );
        assert!(s.passed(), "{contact}: {:?}", s.acts);
    }
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.host.persisted(USER).len(), 1);
}

#[test]
fn a_presence_without_x_joins_only_on_a_service_known_as_a_muc() {
    let mut w = World::new();
    let plain = "<presence to='room@muc.remote.example/Al' id='p'/>";
    assert!(w.session("phone", plain).passed());
    assert!(w.members().is_empty());
    // The shim learned (local component, or disco#info) that the service is a MUC.
    w.host.learn_service("muc.remote.example", true);
    let s = w.session("phone", plain);
    assert_eq!(s.acts, ["send presence to=room@muc.remote.example/Al id=p"]);
    assert_eq!(w.host.memberships_of(USER).len(), 1);
    // And unlearned: only rooms the account is in there keep counting.
    w.host.learn_service("muc.remote.example", false);
    assert!(
        w.session("phone", "<presence to='other@muc.remote.example/Al'/>")
            .handled
    );
    assert!(
        w.session("phone", "<presence to='other@elsewhere.example/Al'/>")
            .passed()
    );
}

#[test]
fn a_presence_without_x_to_a_service_the_account_has_rooms_on_is_a_join() {
    let mut w = joined();
    let s = w.session(
        "laptop",
        "<presence to='second@conference.example.com/Al' id='p2'/>",
    );
    assert_eq!(
        s.acts,
        ["send presence to=second@conference.example.com/Al id=p2"]
    );
    // On the room it is in, a later join is served locally, as with <x/>.
    let s = w.session("laptop", "<presence to='$R/Al' id='p3'/>");
    assert!(s.handled);
    assert!(s.sent().is_empty(), "{:?}", s.acts);
    assert_eq!(w.host.memberships_of(USER)[0].2, ["phone", "laptop"]);
}

#[test]
fn a_membership_counts_as_confirmed_once_the_room_sends_the_self_presence() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    assert!(!w.host.confirmed(USER, R));
    w.room(&self_presence("Al", "member", "participant", &[110]));
    assert!(w.host.confirmed(USER, R));
    // A rejoin after a restart is confirmed again only by the room.
    let mut w2 = World::new();
    w2.host.restore(USER, R, "Al", None);
    assert!(!w2.host.confirmed(USER, R));
    w2.room(&self_presence("Al", "member", "participant", &[110]));
    assert!(w2.host.confirmed(USER, R));
}

// ---------------------------------------------------------------------------------------
// A session sees itself as without the module: its full JID in its self-presences

/// The account's self-presence as the room sends it: the account's (bare) real JID.
fn own_presence(nick: &str, type_: &str, codes: &[u16], extra: &str) -> String {
    let codes: String = codes
        .iter()
        .map(|c| format!("<status code='{c}'/>"))
        .collect();
    format!(
        "<presence{type_} from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant' jid='$A'{extra}/>{codes}</x></presence>"
    )
}

/// The `<item jid>` of each stanza delivered, by session.
fn item_jids(s: &Seen) -> Vec<(String, String)> {
    s.stanzas
        .iter()
        .filter_map(|(r, e)| {
            let jid = stanza::muc_item(e)?.attr("jid")?.to_owned();
            Some((r.clone()?, jid))
        })
        .collect()
}

fn full(resource: &str) -> String {
    format!("{ACCOUNT}/{resource}")
}

#[test]
fn each_joining_session_sees_its_own_full_jid_in_the_self_presence() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.session("laptop", &join("Al", ""));
    let s = w.room(&own_presence("Al", "", &[110, 201], ""));
    assert_eq!(
        item_jids(&s),
        [
            ("phone".to_owned(), full("phone")),
            ("laptop".to_owned(), full("laptop"))
        ]
    );
    // Nothing else of the stanza changed: the creation status reaches both.
    assert_eq!(
        s.delivered(),
        [
            (
                "phone".to_owned(),
                "presence from=R/Al role=participant 110,201".to_owned()
            ),
            (
                "laptop".to_owned(),
                "presence from=R/Al role=participant 110,201".to_owned()
            )
        ]
    );
    // A later join served locally, and a probe of the own nick, name the session too.
    w.room(&subject("Topic"));
    let s = w.session("tablet", &join("Al", ""));
    assert_eq!(item_jids(&s), [("tablet".to_owned(), full("tablet"))]);
    let s = w.session("tablet", "<presence to='$R/Al' type='probe'/>");
    assert_eq!(item_jids(&s), [("tablet".to_owned(), full("tablet"))]);
}

#[test]
fn nick_change_kick_and_leave_name_each_session() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&own_presence("Al", "", &[110], ""));
    w.room(&empty_subject());
    w.session("laptop", &join("Al", ""));
    // A nick change: the 303 and the new presence, to each with its own JID.
    w.session("phone", "<presence to='$R/Ali'/>");
    let s = w.room(&own_presence(
        "Al",
        " type='unavailable'",
        &[303, 110],
        " nick='Ali'",
    ));
    assert_eq!(
        item_jids(&s),
        [
            ("phone".to_owned(), full("phone")),
            ("laptop".to_owned(), full("laptop"))
        ]
    );
    let s = w.room(&own_presence("Ali", "", &[110], ""));
    assert_eq!(
        item_jids(&s),
        [
            ("phone".to_owned(), full("phone")),
            ("laptop".to_owned(), full("laptop"))
        ]
    );
    // One of two leaves: the presence made for it names it.
    let s = w.session("laptop", "<presence to='$R/Ali' type='unavailable'/>");
    assert_eq!(item_jids(&s), [("laptop".to_owned(), full("laptop"))]);
    // A kick reaches the one left, naming it; other occupants' JIDs are not touched.
    w.session("laptop", &join("Ali", ""));
    let s = w.room(
        "<presence from='$R/bob'><x xmlns='$MU'><item affiliation='member' role='participant' jid='bob@example.net/x'/></x></presence>",
    );
    assert_eq!(
        item_jids(&s),
        [
            ("phone".to_owned(), "bob@example.net/x".to_owned()),
            ("laptop".to_owned(), "bob@example.net/x".to_owned())
        ]
    );
    let s = w.room(&own_presence("Ali", " type='unavailable'", &[307, 110], ""));
    assert_eq!(
        item_jids(&s),
        [
            ("phone".to_owned(), full("phone")),
            ("laptop".to_owned(), full("laptop"))
        ]
    );
    assert!(w.members().is_empty());
}

#[test]
fn the_last_session_leaving_gets_the_rooms_answer_with_its_own_jid() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&own_presence("Al", "", &[110], ""));
    w.session("phone", "<presence to='$R/Al' type='unavailable'/>");
    let s = w.room(&own_presence("Al", " type='unavailable'", &[110], ""));
    assert_eq!(item_jids(&s), [("phone".to_owned(), full("phone"))]);
}
