//! The room lifecycle (issue 4) through the I/O-free core: presence aggregation (SPEC flow
//! 8), removal by the room (13), nick changes (14), bookmarks (15), the archive flag (16)
//! and restart, persistence and admin leave (17). Each test drives `Host` with the events
//! Prosody produces and asserts the exact actions, and the `persist`/`archive` flags.
//!
//! Stanzas are written without their namespace (`jabber:client` is added) and with a few
//! shorthands: `$R` the room, `$O` another room, `$A` the account, `$MUC`, `$MU` (muc#user)
//! and `$ST` (stanza error) namespaces. Action descriptions shorten the rooms to `R` and `O`
//! and the account to `A`.

mod common;

use common::{
    ACCOUNT, O, R, T0, USER, groupchat, join, membership, occupant, payload, room_history,
    self_left, subject,
};

use minidom::Element;
use minimix::host::Config;
use minimix::stanza::{self, NS_MUC, NS_MUC_USER};
use minimix::time::format_stamp;

// ---------------------------------------------------------------------------------------
// Helpers (the shared ones are in tests/common)

type World = common::World<common::RoomState>;

fn stored(room: &str, nick: &str, password: Option<&str>) -> (String, String, Option<String>) {
    (
        room.to_owned(),
        nick.to_owned(),
        password.map(str::to_owned),
    )
}

/// A join to R/`nick` carrying the session's show and status.
fn join_showing(nick: &str, show: &str, status: &str) -> String {
    format!(
        "<presence to='$R/{nick}' id='join-{nick}'><x xmlns='$MUC'/>{}</presence>",
        payload(show, status)
    )
}

fn self_presence_in(room: &str, nick: &str, codes: &[u16]) -> String {
    let codes: String = codes
        .iter()
        .map(|c| format!("<status code='{c}'/>"))
        .collect();
    format!(
        "<presence from='{room}/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant'/>{codes}</x></presence>"
    )
}

fn self_presence(nick: &str, codes: &[u16]) -> String {
    self_presence_in("$R", nick, codes)
}

/// The room removes alice: `extra` is what muc#user carries besides the item and 110.
fn removed(nick: &str, extra: &str) -> String {
    format!(
        "<presence type='unavailable' from='$R/{nick}'><x xmlns='$MU'><item affiliation='none' role='none'/><status code='110'/>{extra}</x></presence>"
    )
}

/// alice joined R as "Al" from phone: bob and carol are in the room, one message of
/// history (stamped an hour ago) and the subject "Topic" arrived.
fn joined() -> World {
    joined_in(World::new())
}

/// `joined()` on a host with these settings.
fn joined_in(mut w: World) -> World {
    assert_eq!(
        w.session("phone", &join("Al", "")).acts,
        ["send presence to=R/Al id=join-Al muc"]
    );
    w.room(&occupant("bob"));
    w.room(&occupant("carol"));
    w.room(&self_presence("Al", &[100, 110]));
    w.room(&room_history("bob", "old", T0 - 3600));
    w.room(&subject("Topic"));
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.room_sees.as_deref(), Some("available/"));
    w
}

/// `joined()` with laptop joined too (served locally, nothing sent).
fn joined_twice() -> World {
    let mut w = joined();
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(s.delivered_acts().len(), 5);
    assert!(s.sent().is_empty());
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
    w
}

/// What a session that joins R served locally gets, for `joined()`, its own presence
/// carrying `own_codes`.
fn served(resource: &str, nick: &str, own_codes: &str) -> Vec<String> {
    vec![
        format!("{resource} <- presence from=R/bob role=participant"),
        format!("{resource} <- presence from=R/carol role=participant"),
        format!("{resource} <- presence from=R/{nick} role=participant {own_codes}"),
        format!(
            "{resource} <- message groupchat from=R/bob id=old body=old delay={}",
            format_stamp(T0 - 3600)
        ),
        format!("{resource} <- message groupchat from=R/bob id=subj subject=Topic"),
    ]
}

/// No element anywhere under `e` is in a MUC namespace.
fn has_no_muc_payload(e: &Element) -> bool {
    e.children()
        .all(|c| c.ns() != NS_MUC && c.ns() != NS_MUC_USER)
}

// ---------------------------------------------------------------------------------------
// Flow 8: one presence per account in the room

#[test]
fn presence_updates_reach_the_room_only_when_the_aggregate_changes() {
    let mut w = joined_twice();
    // phone goes away while laptop stays available: the room still shows available.
    let s = w.show("phone", "Al", "away", "");
    assert!(s.swallowed(), "{:?}", s.acts);
    assert!(!s.persist && !s.archive);
    // laptop goes dnd: phone (away) is now the most available.
    let s = w.show("laptop", "Al", "dnd", "");
    assert!(s.handled);
    assert_eq!(s.acts, ["send presence to=R/Al show=away"]);
    let update = s.sent()[0];
    assert!(has_no_muc_payload(update), "{}", String::from(update));
    assert_eq!(update.attr("type"), None);
    assert!(!s.persist);
    // laptop goes xa: still below away.
    assert!(w.show("laptop", "Al", "xa", "").swallowed());
    // phone goes dnd: laptop's xa is the best now.
    let s = w.show("phone", "Al", "dnd", "");
    assert_eq!(s.acts, ["send presence to=R/Al show=xa"]);
    // The same presence again changes nothing.
    assert!(w.show("phone", "Al", "dnd", "").swallowed());
    assert!(w.show("laptop", "Al", "xa", "").swallowed());
    // A status text is part of what the room shows.
    let s = w.show("laptop", "Al", "xa", "gone fishing");
    assert_eq!(
        s.acts,
        ["send presence to=R/Al show=xa status=gone fishing"]
    );
    assert_eq!(w.room_sees.as_deref(), Some("xa/gone fishing"));
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
}

#[test]
fn the_most_available_session_wins_chat_available_away_xa_dnd() {
    let order = ["chat", "", "away", "xa", "dnd"];
    for (i, better) in order.iter().enumerate() {
        for worse in &order[i + 1..] {
            // Whichever session set its presence last, the better one is shown.
            for (first, second) in [(better, worse), (worse, better)] {
                let mut w = joined_twice();
                w.show("phone", "Al", first, "phone");
                w.show("laptop", "Al", second, "laptop");
                let expected = if better.is_empty() {
                    "available"
                } else {
                    better
                };
                let who = if first == better { "phone" } else { "laptop" };
                assert_eq!(
                    w.room_sees,
                    Some(format!("{expected}/{who}")),
                    "phone {first:?} then laptop {second:?}"
                );
            }
        }
    }
}

#[test]
fn ties_go_to_the_latest_session() {
    let mut w = joined_twice();
    let s = w.show("phone", "Al", "chat", "phone");
    assert_eq!(s.acts, ["send presence to=R/Al show=chat status=phone"]);
    let s = w.show("laptop", "Al", "chat", "laptop");
    assert_eq!(s.acts, ["send presence to=R/Al show=chat status=laptop"]);
    let s = w.show("phone", "Al", "chat", "phone");
    assert_eq!(s.acts, ["send presence to=R/Al show=chat status=phone"]);
    // Tie on a plain "available" too.
    let s = w.show("laptop", "Al", "", "");
    assert!(s.swallowed(), "chat beats available: {:?}", s.acts);
    let s = w.show("phone", "Al", "", "back");
    assert_eq!(s.acts, ["send presence to=R/Al status=back"]);
    let s = w.show("laptop", "Al", "", "");
    assert_eq!(s.acts, ["send presence to=R/Al"]);
    assert!(has_no_muc_payload(s.sent()[0]));
}

#[test]
fn broadcast_presence_counts_in_every_room_the_session_joined() {
    let mut w = joined_twice();
    // phone is also alone in O.
    let s = w.session(
        "phone",
        &format!("<presence to='{O}/Al' id='j2'><x xmlns='$MUC'/></presence>"),
    );
    assert_eq!(s.acts, ["send presence to=O/Al id=j2 muc"]);
    w.room(&self_presence_in(O, "Al", &[110]));

    // phone goes away for everyone: R keeps showing laptop; O learns it. Prosody goes on
    // with its own broadcast (not handled), the actions are carried out all the same.
    let s = w.broadcast("phone", "away", "");
    assert!(!s.handled);
    assert_eq!(s.user.as_deref(), Some(USER));
    assert_eq!(s.acts, ["send presence to=O/Al show=away"]);
    assert!(has_no_muc_payload(s.sent()[0]));
    assert!(!s.persist);
    // laptop (in R only) goes xa: R now shows phone's away.
    let s = w.broadcast("laptop", "xa", "");
    assert!(!s.handled);
    assert_eq!(s.acts, ["send presence to=R/Al show=away"]);
    // phone goes offline for everyone (no session_ended yet): R shows laptop's xa; O is
    // left alone (no session of alice shows a presence there any more).
    let s = w.session("phone", "<presence type='unavailable'/>");
    assert!(!s.handled);
    assert_eq!(s.acts, ["send presence to=R/Al show=xa"]);
    // A session that joined nothing, or a broadcast that is not a presence change.
    assert!(w.broadcast("tablet", "dnd", "").passed_untouched());
    assert!(
        w.session("laptop", "<presence type='probe'/>")
            .acts
            .is_empty()
    );
    let mut fresh = World::new();
    assert!(fresh.broadcast("phone", "away", "").passed_untouched());
}

#[test]
fn a_later_join_updates_the_room_only_when_it_is_more_available() {
    let mut w = joined();
    // Alone, phone's change is the aggregate's.
    let s = w.show("phone", "Al", "away", "");
    assert_eq!(s.acts, ["send presence to=R/Al show=away"]);
    // laptop joins less available: served locally, nothing for the room.
    let s = w.session("laptop", &join_showing("Al", "xa", ""));
    assert_eq!(s.acts, served("laptop", "Al", "100,110"));
    // tablet joins more available: served locally, then the room learns it.
    let s = w.session("tablet", &join_showing("Al", "chat", ""));
    let mut expected = served("tablet", "Al", "100,110");
    expected.push("send presence to=R/Al show=chat".to_owned());
    assert_eq!(s.acts, expected);
    assert!(has_no_muc_payload(s.sent()[0]));
    assert_eq!(
        w.members(),
        membership("Al", &["phone", "laptop", "tablet"])
    );
    assert!(!s.persist);
}

#[test]
fn leaving_or_ending_the_most_available_session_updates_the_room() {
    let mut w = joined_twice();
    assert_eq!(
        w.show("phone", "Al", "chat", "").acts,
        ["send presence to=R/Al show=chat"]
    );
    assert!(w.show("laptop", "Al", "away", "").swallowed());
    // phone leaves, laptop stays: phone gets the local answer, the room laptop's away.
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al' id='l1'/>");
    assert_eq!(
        s.acts,
        [
            "phone <- presence unavailable from=R/Al role=none 110",
            "send presence to=R/Al show=away",
        ]
    );
    assert!(!s.persist);
    // phone comes back in chat, then its session ends without leaving.
    let s = w.session("phone", &join_showing("Al", "chat", ""));
    assert_eq!(s.acts.last().unwrap(), "send presence to=R/Al show=chat");
    let s = w.end("phone");
    assert!(!s.handled);
    assert_eq!(s.acts, ["send presence to=R/Al show=away"]);
    assert!(!s.persist);
    assert_eq!(w.members(), membership("Al", &["laptop"]));
    // A session whose end changes nothing (it was not the best) sends nothing.
    w.session("tablet", &join_showing("Al", "xa", ""));
    assert!(w.end("tablet").acts.is_empty());
    // The last session ends: the account stays, showing what it showed.
    let s = w.end("laptop");
    assert!(s.acts.is_empty());
    assert!(!s.persist);
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(w.room_sees.as_deref(), Some("away/"));
}

/// A client's entity capabilities (XEP-0115), as each client sends them.
fn caps(client: &str) -> String {
    format!(
        "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://{client}.example' ver='{client}='/>"
    )
}

/// A join to R/Al from a client with its own caps and `extra` payload.
fn join_with(client: &str, extra: &str) -> String {
    format!(
        "<presence to='$R/Al' id='join-{client}'><x xmlns='$MUC'/>{extra}{}</presence>",
        caps(client)
    )
}

/// A presence update to R/Al with `payload` and the client's caps.
fn update_with(client: &str, payload: &str) -> String {
    format!("<presence to='$R/Al'>{payload}{}</presence>", caps(client))
}

/// The room's update is the aggregate as the session sent it, caps included.
fn caps_node(e: &Element) -> Option<String> {
    e.get_child("c", "http://jabber.org/protocol/caps")
        .and_then(|c| c.attr("node"))
        .map(str::to_owned)
}

/// SPEC flow 8 (issue 14, item 5): other clients of the account joining and leaving with
/// their own caps change nothing other occupants see, so the room hears nothing; a change
/// of what they see reaches it once, carrying the aggregate as the session sent it.
#[test]
fn clients_coming_and_going_with_their_own_caps_leave_the_room_quiet() {
    let mut w = World::new();
    let s = w.session("phone", &join_with("phone", ""));
    assert_eq!(s.acts, ["send presence to=R/Al id=join-phone muc"]);
    w.room(&occupant("bob"));
    w.room(&self_presence("Al", &[110]));
    w.room(&subject("Topic"));
    // laptop and tablet join (each the latest on a tie, so each the aggregate in turn).
    for client in ["laptop", "tablet"] {
        let s = w.session(client, &join_with(client, ""));
        assert!(s.sent().is_empty(), "{client} joins: {:?}", s.acts);
        assert_eq!(s.delivered_acts().len(), 3, "{:?}", s.acts);
    }
    // A client's new caps (an upgrade, a feature switched on), a broadcast with them.
    assert!(w.session("tablet", &update_with("tablet2", "")).swallowed());
    assert!(w.broadcast("laptop", "", "").acts.is_empty());
    let b = format!("<presence>{}</presence>", caps("laptop2"));
    assert!(w.session("laptop", &b).acts.is_empty());
    // They leave, and end; phone rejoins after a reconnect with other caps.
    let s = w.session("tablet", "<presence type='unavailable' to='$R/Al'/>");
    assert_eq!(
        s.acts,
        ["tablet <- presence unavailable from=R/Al role=none 110"]
    );
    assert!(w.end("laptop").acts.is_empty());
    assert!(w.end("phone").acts.is_empty());
    let s = w.session("phone", &join_with("phone2", ""));
    assert!(s.sent().is_empty(), "{:?}", s.acts);
    // laptop joins away: the room learns nothing (phone is more available); then phone
    // goes away too, so the latest away (phone's) is what the room sees, with its caps.
    let s = w.session("laptop", &join_with("laptop", "<show>away</show>"));
    assert!(s.sent().is_empty(), "{:?}", s.acts);
    let s = w.session("phone", &update_with("phone2", "<show>away</show>"));
    assert_eq!(s.acts, ["send presence to=R/Al show=away"]);
    assert_eq!(
        caps_node(s.sent()[0]).as_deref(),
        Some("https://phone2.example")
    );
    assert!(has_no_muc_payload(s.sent()[0]));
    // A status reaches the room once; the same again, or with a priority, does not.
    let status = "<show>away</show><status>lunch</status>";
    let s = w.session("phone", &update_with("phone2", status));
    assert_eq!(s.acts, ["send presence to=R/Al show=away status=lunch"]);
    assert!(
        w.session("phone", &update_with("phone3", status))
            .swallowed()
    );
    let with_priority = format!("{status}<priority>5</priority>");
    assert!(
        w.session("phone", &update_with("phone2", &with_priority))
            .swallowed()
    );
}

/// SPEC flow 8: what other occupants see, besides show and status (README, "Presence in
/// the room"): the avatar hash, a status in another language, idle time, a XEP-0172 nick.
#[test]
fn avatar_hash_idle_nick_and_each_status_language_are_seen() {
    let photo = |hash: &str| format!("<x xmlns='vcard-temp:x:update'><photo>{hash}</photo></x>");
    let mut w = joined_twice();
    let s = w.session("phone", &update_with("phone", &photo("abc")));
    assert_eq!(s.acts, ["send presence to=R/Al"]);
    assert!(s.sent()[0].has_child("x", "vcard-temp:x:update"));
    assert!(
        w.session("phone", &update_with("phone", &photo("abc")))
            .swallowed()
    );
    // laptop (the latest on a tie) says nothing of an avatar: occupants keep abc.
    assert!(w.session("laptop", &update_with("laptop", "")).swallowed());
    let not_ready = "<x xmlns='vcard-temp:x:update'/>";
    assert!(
        w.session("laptop", &update_with("laptop", not_ready))
            .swallowed()
    );
    assert!(
        w.session("laptop", &update_with("laptop", &photo("abc")))
            .swallowed()
    );
    // A new hash, and an empty one (the avatar removed), are seen.
    let s = w.session("laptop", &update_with("laptop", &photo("def")));
    assert_eq!(s.acts, ["send presence to=R/Al"]);
    assert_eq!(
        w.session("laptop", &update_with("laptop", &photo("")))
            .acts
            .len(),
        1
    );
    assert!(
        w.session("phone", &update_with("phone", &photo("")))
            .swallowed()
    );

    let mut w = joined();
    for (payload, seen) in [
        ("<status>hi</status>", true),
        (
            "<status>hi</status><status xml:lang='de'>hallo</status>",
            true,
        ),
        (
            "<status>hi</status><status xml:lang='fr'>hallo</status>",
            true,
        ),
        (
            "<status>hi</status><status xml:lang='fr'>hallo</status>",
            false,
        ),
        (
            "<idle xmlns='urn:xmpp:idle:1' since='2027-01-15T07:00:00Z'/>",
            true,
        ),
        (
            "<idle xmlns='urn:xmpp:idle:1' since='2027-01-15T07:00:00Z'/>",
            false,
        ),
        (
            "<idle xmlns='urn:xmpp:idle:1' since='2027-01-15T07:30:00Z'/>",
            true,
        ),
        ("", true),
        (
            "<nick xmlns='http://jabber.org/protocol/nick'>Alice</nick>",
            true,
        ),
        (
            "<nick xmlns='http://jabber.org/protocol/nick'>Alice</nick><delay xmlns='urn:xmpp:delay' stamp='2027-01-15T07:00:00Z'/>",
            false,
        ),
    ] {
        let s = w.session("phone", &update_with("phone", payload));
        assert_eq!(s.sent().len(), usize::from(seen), "{payload}: {:?}", s.acts);
    }
}

/// SPEC flows 8 and 14: after a nick change, and after a join the module made (restart,
/// bookmark), caps alone still make no update.
#[test]
fn caps_alone_make_no_update_after_a_nick_change_or_a_module_join() {
    let mut w = joined_twice();
    let s = w.session("phone", "<presence to='$R/Alice'/>");
    assert_eq!(s.acts, ["send presence to=R/Alice"]);
    w.room("<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='participant' nick='Alice'/><status code='303'/><status code='110'/></x></presence>");
    w.room(&self_presence("Alice", &[110]));
    let s = w.session(
        "laptop",
        &format!("<presence to='$R/Alice'>{}</presence>", caps("laptop")),
    );
    assert!(s.swallowed(), "{:?}", s.acts);

    let mut w = World::new();
    w.restore(R, "Al", None);
    w.room(&self_presence("Al", &[110]));
    w.room(&subject("Topic"));
    let s = w.session("phone", &join_with("phone", ""));
    assert!(s.sent().is_empty(), "{:?}", s.acts);
    let s = w.session("phone", &update_with("phone", "<show>dnd</show>"));
    assert_eq!(s.acts, ["send presence to=R/Al show=dnd"]);
}

/// SPEC flow 8: the room shows the most available joined session's presence. A presence
/// change made while the account's join is in flight must reach the room once joined.
#[test]

fn presence_changed_while_joining_reaches_the_room_once_joined() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    let s = w.broadcast("phone", "away", "");
    assert!(s.acts.is_empty(), "nothing for a room not joined yet");
    let s = w.room(&self_presence("Al", &[110]));
    assert_eq!(
        s.delivered_acts(),
        ["phone <- presence from=R/Al role=participant 110"]
    );
    assert_eq!(w.room_sees.as_deref(), Some("away/"));

    // Same with a second session joining, more available, during the join.
    let mut w = World::new();
    w.session("phone", &join_showing("Al", "away", ""));
    w.session("laptop", &join_showing("Al", "chat", ""));
    w.room(&self_presence("Al", &[110]));
    assert_eq!(w.room_sees.as_deref(), Some("chat/"));
}

// ---------------------------------------------------------------------------------------
// Flow 13: removed from the room

#[test]
fn removal_reaches_every_joined_session_and_forgets_the_membership() {
    let cases = [
        ("kick", "<status code='307'/>", "110,307"),
        ("ban", "<status code='301'/>", "110,301"),
        ("affiliation", "<status code='321'/>", "110,321"),
        ("members-only", "<status code='322'/>", "110,322"),
        (
            "destroyed",
            "<destroy jid='new@conference.example.com'><reason>moved</reason></destroy>",
            "110 destroy",
        ),
    ];
    for (what, extra, described) in cases {
        let mut w = joined_twice();
        // tablet is joined elsewhere only; it hears nothing of R.
        w.session(
            "tablet",
            &format!("<presence to='{O}/Al'><x xmlns='$MUC'/></presence>"),
        );
        w.room(&self_presence_in(O, "Al", &[110]));
        assert_eq!(w.persisted().len(), 2);

        let s = w.room(&removed("Al", extra));
        let line = format!("presence unavailable from=R/Al role=none {described}");
        assert!(s.handled, "{what}");
        assert_eq!(
            s.acts,
            [format!("phone <- {line}"), format!("laptop <- {line}")],
            "{what}"
        );
        assert!(s.persist, "{what}");
        assert!(!s.archive, "{what}");
        assert!(!s.notes.is_empty(), "{what}");
        assert_eq!(
            w.members(),
            vec![(O.to_owned(), "Al".to_owned(), vec!["tablet".to_owned()])],
            "{what}"
        );
        assert_eq!(w.persisted(), [stored(O, "Al", None)], "{what}");

        // Nobody rejoins: no session's activity brings the account back on its own.
        assert!(w.room(&groupchat("bob", "x")).passed_untouched(), "{what}");
        assert!(w.end("phone").acts.is_empty(), "{what}");
        assert!(w.broadcast("laptop", "away", "").acts.is_empty(), "{what}");
        assert!(w.bookmark(None, None, false).passed_untouched(), "{what}");
        // A join afterwards starts afresh, from the account.
        let mut w2 = joined();
        w2.room(&removed("Al", extra));
        let s = w2.session("phone", &join("Al", ""));
        assert_eq!(s.acts, ["send presence to=R/Al id=join-Al muc"], "{what}");
    }
}

#[test]
fn removal_with_no_session_online_drops_the_membership_silently() {
    let mut w = joined();
    w.end("phone");
    assert_eq!(w.members(), membership("Al", &[]));
    let s = w.room(&removed("Al", "<status code='307'/>"));
    assert!(s.swallowed());
    assert!(s.persist);
    assert!(w.members().is_empty());
    assert!(w.persisted().is_empty());
    let st = w.host.stats();
    assert_eq!((st.accounts, st.memberships), (0, 0));
    // A restored membership removed while the restart join is answered: same.
    let mut w = World::new();
    w.restore(R, "Al", None);
    let s = w.room(&removed("Al", "<status code='301'/>"));
    assert!(s.swallowed());
    assert!(s.persist);
    assert!(w.persisted().is_empty());
}

// ---------------------------------------------------------------------------------------
// Flow 14: nick change

#[test]
fn nick_change_goes_out_from_the_account_and_the_new_nick_sticks() {
    let mut w = joined_twice();
    let s = w.session("phone", "<presence to='$R/Alice' id='n1'/>");
    assert!(s.handled);
    assert_eq!(s.acts, ["send presence to=R/Alice id=n1"]);
    assert!(has_no_muc_payload(s.sent()[0]));
    assert_eq!(s.sent()[0].attr("from"), Some(ACCOUNT));

    // The room: 303 for the old nick, then the new self-presence; both reach everyone.
    let s = w.room("<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='participant' nick='Alice'/><status code='303'/><status code='110'/></x></presence>");
    let line = "presence unavailable from=R/Al role=participant nick=Alice 303,110";
    assert_eq!(
        s.acts,
        [format!("phone <- {line}"), format!("laptop <- {line}")]
    );
    assert!(s.persist);
    assert_eq!(w.persisted(), [stored(R, "Alice", None)]);
    let s = w.room(&self_presence("Alice", &[110]));
    assert_eq!(
        s.acts,
        [
            "phone <- presence from=R/Alice role=participant 110",
            "laptop <- presence from=R/Alice role=participant 110",
        ]
    );
    assert_eq!(w.members(), membership("Alice", &["phone", "laptop"]));
    assert_eq!(w.persisted(), [stored(R, "Alice", None)]);

    // A later session asking the old nick gets the account's new one, with 210.
    let s = w.session("tablet", &join("Al", ""));
    let mut expected = served("tablet", "Alice", "110,210");
    expected.retain(|l| !l.contains("from=R/Al "));
    assert_eq!(s.acts, expected);
    assert_eq!(
        w.members(),
        membership("Alice", &["phone", "laptop", "tablet"])
    );
    // Presence to the new nick is now an update, not another nick change.
    assert!(w.show("laptop", "Alice", "away", "").swallowed());
    // The old nick is what would be a nick change now.
    let s = w.show("laptop", "Al", "", "");
    assert_eq!(s.acts, ["send presence to=R/Al"]);
}

#[test]
fn nick_conflict_goes_only_to_the_asking_session() {
    let mut w = joined_twice();
    let s = w.session("laptop", "<presence to='$R/bob' id='n1'/>");
    assert_eq!(s.acts, ["send presence to=R/bob id=n1"]);
    let s = w.room("<presence type='error' from='$R/bob' id='n1'><error type='cancel' by='$R'><conflict xmlns='$ST'/></error></presence>");
    assert_eq!(
        s.acts,
        ["laptop <- presence error from=R/bob id=n1 err=conflict"]
    );
    assert!(!s.persist);
    assert_eq!(w.members(), membership("Al", &["phone", "laptop"]));
    assert_eq!(w.persisted(), [stored(R, "Al", None)]);
    // Room traffic still reaches both, under the old nick.
    assert_eq!(w.room(&groupchat("bob", "hi")).delivered_acts().len(), 2);
    let s = w.session("tablet", &join("Al", ""));
    let mut expected = served("tablet", "Al", "100,110");
    expected.insert(
        4,
        format!(
            "tablet <- message groupchat from=R/bob id=hi body=hi delay={}",
            format_stamp(T0)
        ),
    );
    assert_eq!(s.acts, expected);
}

/// SPEC flow 8 with flow 14: a nick change carries the asking session's presence to the
/// room; once the change is done the room must show the aggregate again.
#[test]

fn nick_change_presence_does_not_override_the_aggregate() {
    let mut w = joined_twice();
    assert!(w.show("phone", "Al", "away", "").swallowed());
    w.show("phone", "Alice", "away", "");
    w.room("<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='participant' nick='Alice'/><status code='303'/><status code='110'/></x></presence>");
    let s = w.room(&self_presence("Alice", &[110]));
    assert_eq!(s.delivered_acts().len(), 2);
    assert_eq!(w.members(), membership("Alice", &["phone", "laptop"]));
    // laptop is still available: that is what the room must end up showing.
    assert_eq!(w.room_sees.as_deref(), Some("available/"));
}

/// SPEC flow 14: a 409 goes to the asking session only. When that session ended before
/// the room answered, nobody should get it (a presence error from R/… tells other clients
/// their own join failed).
#[test]

fn nick_conflict_for_an_ended_session_reaches_nobody() {
    let mut w = joined_twice();
    w.session("laptop", "<presence to='$R/bob' id='n1'/>");
    w.end("laptop");
    let s = w.room("<presence type='error' from='$R/bob' id='n1'><error type='cancel' by='$R'><conflict xmlns='$ST'/></error></presence>");
    assert!(s.swallowed(), "{:?}", s.acts);
    assert_eq!(w.members(), membership("Al", &["phone"]));
}

// ---------------------------------------------------------------------------------------
// Flow 15: bookmarks

#[test]
fn bookmark_with_autojoin_joins_from_the_account_with_no_session() {
    let mut w = World::new();
    let s = w.bookmark(Some("Al"), Some("secret"), true);
    assert!(s.handled);
    assert_eq!(s.user.as_deref(), Some(USER));
    assert!(s.persist);
    assert!(!s.notes.is_empty());
    assert_eq!(
        s.acts,
        ["send presence to=R/Al muc history[maxstanzas=0] password=secret"]
    );
    assert_eq!(s.sent()[0].attr("type"), None);
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(w.persisted(), [stored(R, "Al", Some("secret"))]);

    // The room's answer is handled and kept, delivered to nobody.
    assert!(w.room(&occupant("bob")).swallowed());
    assert!(w.room(&occupant("carol")).swallowed());
    let s = w.room(&self_presence("Al", &[100, 110]));
    assert!(s.swallowed());
    assert!(s.persist);
    assert!(w.room(&room_history("bob", "old", T0 - 3600)).swallowed());
    assert!(w.room(&subject("Topic")).swallowed());
    assert_eq!(w.members(), membership("Al", &[]));

    // A session joining later is served locally.
    let s = w.session("phone", &join_showing("Al", "", "on the phone"));
    assert_eq!(s.delivered_acts(), served("phone", "Al", "100,110"));
    assert_eq!(s.acts.len(), 6);
    assert_eq!(
        s.acts.last().unwrap(),
        "send presence to=R/Al status=on the phone"
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.host.stats().joins_served_locally, 1);
}

#[test]
fn bookmark_without_a_nick_uses_the_username_and_no_password() {
    let mut w = World::new();
    let s = w.bookmark(None, None, true);
    assert_eq!(
        s.acts,
        ["send presence to=R/alice muc history[maxstanzas=0]"]
    );
    let x = s.sent()[0].get_child("x", NS_MUC).unwrap();
    assert!(!x.has_child("password", NS_MUC));
    assert_eq!(w.members(), membership("alice", &[]));
    assert_eq!(w.persisted(), [stored(R, "alice", None)]);
}

#[test]
fn bookmark_for_a_room_already_joined_or_joining_does_nothing() {
    let mut w = joined();
    let s = w.bookmark(Some("Other"), Some("pw"), true);
    assert!(s.passed_untouched(), "{:?}", s.acts);
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.persisted(), [stored(R, "Al", None)]);

    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    assert!(w.bookmark(Some("Al"), None, true).passed_untouched());
    let mut w = World::new();
    w.bookmark(Some("Al"), None, true);
    assert!(w.bookmark(Some("Al"), None, true).passed_untouched());
    // A bookmark without autojoin for a room alice is not in: nothing either.
    let mut w = World::new();
    assert!(w.bookmark(Some("Al"), None, false).passed_untouched());
    assert_eq!(w.host.stats().accounts, 0);
}

#[test]
fn bookmark_retraction_leaves_and_every_joined_session_gets_the_answer() {
    let mut w = joined_twice();
    let s = w.bookmark(None, None, false);
    assert!(s.handled);
    assert!(s.persist);
    assert_eq!(s.acts, ["send presence unavailable to=R/Al"]);
    assert_eq!(s.sent()[0].attr("from"), Some(ACCOUNT));
    assert!(w.persisted().is_empty());
    // What the room sends meanwhile goes nowhere.
    assert!(w.room(&groupchat("bob", "late")).swallowed());
    assert!(!w.room(&groupchat("bob", "late2")).archive);
    let s = w.room(&self_left("Al"));
    assert_eq!(
        s.acts,
        [
            "phone <- presence unavailable from=R/Al role=none 110",
            "laptop <- presence unavailable from=R/Al role=none 110",
        ]
    );
    assert!(s.persist);
    assert!(w.members().is_empty());
    assert!(w.room(&groupchat("bob", "gone")).passed_untouched());
    // A second retraction: nothing.
    assert!(w.bookmark(None, None, false).passed_untouched());
}

#[test]
fn bookmark_retracted_while_its_join_is_in_flight_leaves() {
    let mut w = World::new();
    w.bookmark(Some("Al"), None, true);
    let s = w.bookmark(Some("Al"), None, false);
    assert_eq!(s.acts, ["send presence unavailable to=R/Al"]);
    assert!(s.persist);
    assert!(w.persisted().is_empty());
    assert!(w.room(&occupant("bob")).swallowed());
    assert!(w.room(&self_presence("Al", &[110])).swallowed());
    assert!(w.room(&self_left("Al")).swallowed());
    assert!(w.members().is_empty());
    assert_eq!(w.host.stats().accounts, 0);
}

// ---------------------------------------------------------------------------------------
// Flow 17: persistence, restart, admin leave

#[test]
fn persisted_lists_joined_and_joining_rooms_with_nick_and_password() {
    let mut w = World::new();
    assert!(w.persisted().is_empty());
    let s = w.session(
        "phone",
        "<presence to='$R/Al'><x xmlns='$MUC'><password>pw</password></x></presence>",
    );
    assert!(s.persist);
    assert_eq!(w.persisted(), [stored(R, "Al", Some("pw"))]);
    let s = w.room(&self_presence("Al", &[110]));
    assert!(s.persist);
    let s = w.session(
        "phone",
        &format!("<presence to='{O}/Ali'><x xmlns='$MUC'/></presence>"),
    );
    assert!(s.persist);
    assert_eq!(
        w.persisted(),
        [stored(O, "Ali", None), stored(R, "Al", Some("pw"))]
    );
    // Plain traffic and later joins change nothing to store.
    assert!(!w.room(&groupchat("bob", "x")).persist);
    assert!(!w.session("laptop", &join("Al", "")).persist);
    assert!(!w.end("laptop").persist);
    // The last session leaving R: R is no longer stored, even before the room answers.
    let s = w.session("phone", "<presence type='unavailable' to='$R/Al'/>");
    assert!(s.persist);
    assert_eq!(w.persisted(), [stored(O, "Ali", None)]);
    // A join error drops what was stored.
    let s = w.room(&format!(
        "<presence type='error' from='{O}/Ali'><error type='auth' by='{O}'><not-authorized xmlns='$ST'/></error></presence>"
    ));
    assert!(s.persist);
    assert!(w.persisted().is_empty());
}

#[test]
fn restore_rejoins_with_no_history_and_no_session_gets_anything() {
    let mut w = World::new();
    let s = w.restore(R, "Al", Some("pw"));
    assert!(s.handled);
    assert!(s.persist);
    assert!(!s.notes.is_empty());
    assert_eq!(
        s.acts,
        ["send presence to=R/Al muc history[maxstanzas=0] password=pw"]
    );
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(w.persisted(), [stored(R, "Al", Some("pw"))]);
    // Restoring twice does nothing.
    assert!(w.restore(R, "Al", Some("pw")).passed_untouched());

    assert!(w.room(&occupant("bob")).swallowed());
    assert!(w.room(&occupant("carol")).swallowed());
    assert!(w.room(&self_presence("Al", &[110])).swallowed());
    assert!(w.room(&subject("Topic")).swallowed());
    w.now += 60;
    let s = w.room(&groupchat("bob", "old"));
    assert!(s.swallowed());
    assert!(s.archive);
    w.now += 60;

    // The first session to join is served locally; the live message comes stamped.
    let s = w.session("phone", &join_showing("Al", "", "here"));
    assert_eq!(
        s.delivered_acts(),
        [
            "phone <- presence from=R/bob role=participant",
            "phone <- presence from=R/carol role=participant",
            "phone <- presence from=R/Al role=participant 110",
            &format!(
                "phone <- message groupchat from=R/bob id=old body=old delay={}",
                format_stamp(T0 + 60)
            ),
            "phone <- message groupchat from=R/bob id=subj subject=Topic",
        ]
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.persisted(), [stored(R, "Al", Some("pw"))]);
}

#[test]
fn a_session_joining_while_the_restore_join_is_in_flight_gets_the_rest_as_it_comes() {
    let mut w = World::new();
    w.restore(R, "Al", None);
    assert!(w.room(&occupant("bob")).swallowed());
    let s = w.session("phone", &join("Al", ""));
    assert_eq!(s.acts, ["phone <- presence from=R/bob role=participant"]);
    let s = w.room(&self_presence("Al", &[110]));
    assert_eq!(s.acts, ["phone <- presence from=R/Al role=participant 110"]);
    let s = w.room(&subject("Topic"));
    assert_eq!(
        s.acts,
        ["phone <- message groupchat from=R/bob id=subj subject=Topic"]
    );
    assert_eq!(w.members(), membership("Al", &["phone"]));
    assert_eq!(w.room_sees.as_deref(), Some("available/"));
}

#[test]
fn restore_of_an_excluded_or_invalid_room_does_nothing() {
    let mut w = World::with(Config {
        excluded_hosts: vec!["conference.example.com".to_owned()],
        ..Config::default()
    });
    assert!(w.restore(R, "Al", None).passed_untouched());
    assert!(w.bookmark(Some("Al"), None, true).passed_untouched());
    let mut w = World::new();
    assert!(w.restore("not a jid@@", "Al", None).passed_untouched());
    assert!(w.persisted().is_empty());
}

/// SPEC flows 3 and 8: once the account is in the room (here after a restart or from a
/// bookmark), a later join showing the same presence as the account's own join sends
/// nothing to the room.
#[test]
fn a_plain_join_after_restore_or_bookmark_sends_nothing_to_the_room() {
    for from_bookmark in [false, true] {
        let mut w = World::new();
        if from_bookmark {
            w.bookmark(Some("Al"), None, true);
        } else {
            w.restore(R, "Al", None);
        }
        w.room(&self_presence("Al", &[110]));
        w.room(&subject("Topic"));
        let s = w.session("phone", &join("Al", ""));
        assert_eq!(
            s.acts,
            [
                "phone <- presence from=R/Al role=participant 110",
                "phone <- message groupchat from=R/bob id=subj subject=Topic",
            ],
            "bookmark: {from_bookmark}"
        );
    }
}

#[test]
fn admin_leave_sends_unavailable_and_joined_sessions_get_the_answer() {
    let mut w = joined_twice();
    let s = w.leave(R, "asked by the admin");
    assert!(s.handled);
    assert!(s.persist);
    assert!(s.notes.iter().any(|n| n.contains("asked by the admin")));
    assert_eq!(s.acts, ["send presence unavailable to=R/Al"]);
    assert!(w.persisted().is_empty());
    // A second leave while the first is answered does nothing.
    assert!(w.leave(R, "again").passed_untouched());
    let s = w.room(&self_left("Al"));
    assert_eq!(
        s.acts,
        [
            "phone <- presence unavailable from=R/Al role=none 110",
            "laptop <- presence unavailable from=R/Al role=none 110",
        ]
    );
    assert!(s.persist);
    assert!(w.members().is_empty());
    // Leaving a room alice is not in does nothing.
    assert!(w.leave(R, "again").passed_untouched());
    assert!(w.leave(O, "never joined").passed_untouched());

    // With no session online, the room's answer goes nowhere.
    let mut w = World::new();
    w.restore(R, "Al", None);
    w.room(&self_presence("Al", &[110]));
    assert_eq!(
        w.leave(R, "admin").acts,
        ["send presence unavailable to=R/Al"]
    );
    assert!(w.room(&self_left("Al")).swallowed());
    assert!(w.members().is_empty());
}

// ---------------------------------------------------------------------------------------
// Flow 16: which stanzas are for the account's archive

#[test]
fn only_live_messages_from_a_joined_room_are_archived() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    // History the room replays during the join is not archived again.
    let s = w.room(&room_history("bob", "old", T0 - 3600));
    assert_eq!(s.delivered_acts().len(), 1);
    assert!(!s.archive);
    // A live message during the join is.
    let s = w.room(&groupchat("bob", "early"));
    assert!(s.archive);
    w.room(&self_presence("Al", &[110]));
    let s = w.room(&subject("Topic"));
    assert!(!s.archive);
    w.session("laptop", &join("Al", ""));

    let cases = [
        (groupchat("bob", "live"), true),
        (room_history("bob", "replayed", T0 - 60), false),
        (subject("New topic"), false),
        ("<message type='groupchat' from='$R/bob'><active xmlns='http://jabber.org/protocol/chatstates'/></message>".to_owned(), false),
        // Private messages are archived, as mod_mam would have done without the module.
        ("<message type='chat' from='$R/bob' id='pm'><body>psst</body><x xmlns='$MU'/></message>".to_owned(), true),
        ("<message type='error' from='$R' id='e'><error type='cancel'><forbidden xmlns='$ST'/></error></message>".to_owned(), false),
        (occupant("dave"), false),
    ];
    for (xml, archive) in &cases {
        let s = w.room(xml);
        assert!(s.handled, "{xml}");
        assert_eq!(s.delivered_acts().len(), 2, "forked to both: {xml}");
        assert_eq!(s.archive, *archive, "{xml}");
        assert!(!s.persist, "{xml}");
    }

    // With no session online, live messages are still archived (and kept); others not.
    w.end("phone");
    w.end("laptop");
    for (xml, archive) in &cases {
        let s = w.room(xml);
        assert!(s.swallowed(), "{xml}");
        assert_eq!(s.archive, *archive, "no session: {xml}");
    }

    // Rooms alice is not in, and rooms she is leaving: never archived.
    assert!(
        w.room(&groupchat("bob", "x").replace("$R", "$O"))
            .passed_untouched()
    );
    w.session("phone", &join("Al", ""));
    w.session("phone", "<presence type='unavailable' to='$R/Al'/>");
    let s = w.room(&groupchat("bob", "while leaving"));
    assert!(s.swallowed());
    assert!(!s.archive);
}

/// XEP-0045 §8.1: only a message with a `<subject/>` and no `<body/>` changes the subject;
/// one with both is an ordinary message, archived (SPEC flow 16) and kept as history.
#[test]

fn a_groupchat_message_with_subject_and_body_is_an_ordinary_message() {
    let mut w = joined();
    let s = w.room("<message type='groupchat' from='$R/bob' id='both'><subject>Re: plans</subject><body>see you</body></message>");
    assert_eq!(s.delivered_acts().len(), 1);
    assert!(s.archive);
    let s = w.session("laptop", &join("Al", ""));
    let lines = s.delivered_acts();
    assert!(
        lines.iter().any(|l| l.contains("body=see you")),
        "kept as history: {lines:?}"
    );
    assert_eq!(
        lines.last().unwrap(),
        "laptop <- message groupchat from=R/bob id=subj subject=Topic",
        "the subject is still Topic"
    );
}

// ---------------------------------------------------------------------------------------
// Presences to a room that are not joins, leaves or updates to the account's nick.

/// XEP-0045 §7.2.1: a join needs a nick. Prosody 13's MUC never answers one for a new room,
/// so the module answers for the room.
#[test]
fn a_join_without_a_nick_gets_jid_malformed_from_the_room() {
    let mut w = World::new();
    let s = w.session(
        "phone",
        "<presence to='$R' id='j'><x xmlns='$MUC'/></presence>",
    );
    assert!(s.handled);
    assert!(s.sent().is_empty());
    assert_eq!(s.stanzas.len(), 1);
    let (to, error) = &s.stanzas[0];
    assert_eq!(to.as_deref(), Some("phone"));
    assert_eq!(error.attr("type"), Some("error"));
    assert_eq!(error.attr("from"), Some(R));
    assert_eq!(stanza::error_condition(error), Some("jid-malformed"));
    assert!(w.members().is_empty());
}

/// Prosody's MUC takes a presence to the bare room JID from an occupant as a presence
/// update; a joined session's goes into the account's aggregate.
#[test]
fn presence_to_the_bare_room_from_a_joined_session_is_a_presence_update() {
    let mut w = joined_twice();
    let s = w.session("phone", "<presence to='$R'><show>chat</show></presence>");
    assert!(s.handled);
    assert_eq!(s.acts, ["send presence to=R/Al show=chat"]);
    // From a session that did not join, it is left to the room.
    assert!(
        w.session("tablet", "<presence to='$R'/>")
            .passed_untouched()
    );
}

/// A probe from a joined session is answered from what the account knows of the room.
#[test]
fn a_probe_from_a_joined_session_is_answered_locally() {
    let mut w = joined_twice();
    let s = w.session("laptop", "<presence type='probe' to='$R/bob'/>");
    assert!(s.handled);
    assert!(s.sent().is_empty());
    assert_eq!(
        s.delivered_acts(),
        ["laptop <- presence from=R/bob role=participant"]
    );
    let s = w.session("laptop", "<presence type='probe' to='$R/Al'/>");
    assert_eq!(s.delivered_acts().len(), 1);
    assert!(s.delivered_acts()[0].starts_with("laptop <- presence from=R/Al"));
    // An occupant the account does not know of: the room is asked, from the account.
    let s = w.session("laptop", "<presence type='probe' to='$R/nobody'/>");
    assert_eq!(s.sent().len(), 1);
    assert_eq!(s.sent()[0].attr("to"), Some(&*format!("{R}/nobody")));
}

/// After a crash a room may be gone: the stored rejoin makes it anew, locked until its
/// owner configures it. The module accepts the default configuration for it.
#[test]
fn a_rejoin_that_makes_the_room_anew_accepts_its_default_configuration() {
    let mut w = World::new();
    w.restore(R, "Al", None);
    let s = w.room(&self_presence("Al", &[110, 201]));
    let sent = s.sent();
    assert_eq!(sent.len(), 1, "{:?}", s.acts);
    assert_eq!(sent[0].name(), "iq");
    assert_eq!(sent[0].attr("type"), Some("set"));
    assert_eq!(sent[0].attr("to"), Some(R));
    let form = sent[0]
        .get_child("query", "http://jabber.org/protocol/muc#owner")
        .and_then(|q| q.get_child("x", "jabber:x:data"))
        .unwrap();
    assert_eq!(form.attr("type"), Some("submit"));
    assert_eq!(w.members(), membership("Al", &[]));
    // A session's own join that creates a room is left to the session, as plain MUC.
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    let s = w.room(&self_presence("Al", &[110, 201]));
    assert!(s.sent().is_empty());
}

// ---------------------------------------------------------------------------------------
// Timers: a proxied IQ is waited for `iq_timeout` seconds (flow 6)

/// `joined()` with the account's self-pings off: the IQ timers alone.
fn joined_without_self_pings() -> World {
    joined_in(World::with(Config {
        self_ping_interval: 0,
        ..Config::default()
    }))
}

/// phone asks bob's version through the room at T0; the module's id for it.
fn version_asked(w: &mut World) -> String {
    let s = w.session(
        "phone",
        "<iq type='get' to='$R/bob' id='v1'><query xmlns='jabber:iq:version'/></iq>",
    );
    assert_eq!(s.sent().len(), 1, "{:?}", s.acts);
    s.sent()[0].attr("id").expect("an id").to_owned()
}

fn version_reply(id: &str) -> String {
    format!("<iq type='result' from='$R/bob' id='{id}'><query xmlns='jabber:iq:version'/></iq>")
}

#[test]
fn a_reply_after_the_iq_timeout_and_a_tick_is_not_routed() {
    let mut w = joined_without_self_pings();
    let timeout = w.host.config().iq_timeout;
    assert_eq!(w.host.next_deadline(), None);
    let id = version_asked(&mut w);
    assert_eq!(w.host.next_deadline(), Some(T0 + timeout + 1));
    // Nothing is sent when an IQ expires: Prosody tells a client nothing either.
    assert!(w.tick(T0 + timeout + 1).is_empty());
    let st = w.host.stats();
    assert_eq!((st.pending_iqs, st.iqs_expired), (0, 1));
    assert_eq!(w.host.next_deadline(), None);
    let s = w.room(&version_reply(&id));
    assert!(s.passed_untouched(), "{:?}", s.acts);
}

#[test]
fn a_reply_before_the_iq_timeout_is_routed_whatever_the_ticks() {
    let mut w = joined_without_self_pings();
    let timeout = w.host.config().iq_timeout;
    let id = version_asked(&mut w);
    assert!(w.tick(T0 + 1).is_empty());
    assert!(w.tick(T0 + timeout).is_empty());
    assert_eq!(w.host.stats().pending_iqs, 1);
    let s = w.room(&version_reply(&id));
    assert_eq!(s.acts, ["phone <- iq result from=R/bob id=v1"]);
    let st = w.host.stats();
    assert_eq!((st.pending_iqs, st.iqs_expired), (0, 0));
}

#[test]
fn the_next_deadline_is_the_first_pending_iq_to_expire() {
    let mut w = joined_without_self_pings();
    let timeout = w.host.config().iq_timeout;
    version_asked(&mut w);
    w.now = T0 + 10;
    let later = version_asked(&mut w);
    assert_eq!(w.host.next_deadline(), Some(T0 + timeout + 1));
    w.tick(T0 + timeout + 1);
    assert_eq!(w.host.stats().pending_iqs, 1);
    assert_eq!(w.host.next_deadline(), Some(T0 + 10 + timeout + 1));
    // An account left with nothing but expired IQs is forgotten.
    w.session("phone", &self_left_to("Al"));
    w.room(&self_left("Al"));
    assert_eq!(w.host.stats().accounts, 1);
    w.tick(T0 + 10 + timeout + 1);
    assert_eq!(w.host.stats().accounts, 0);
    assert!(w.room(&version_reply(&later)).passed_untouched());
}

fn self_left_to(nick: &str) -> String {
    format!("<presence type='unavailable' to='$R/{nick}'/>")
}
