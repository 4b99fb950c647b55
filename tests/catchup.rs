//! Outages leave no gap (SPEC flow 18), the part that is about history: every rejoin the
//! module makes asks the room for the history since the last message the account got, and
//! what the room replays is archived and forked once — what the account already had is
//! recognised (by the room's stanza-id, the sender's origin-id, or sender, body and time).
//!
//! Stanzas as in tests/lifecycle.rs (shorthands `$R`, `$A`, `$MUC`, `$MU`).

mod common;

use common::{R, T0, USER, groupchat, join, occupant, room_history, subject};

use minimix::host::{Config, Host};
use minimix::received::{NS_SID, REJOIN_MARGIN};
use minimix::time::format_stamp;

type World = common::World<common::RoomState>;

fn self_presence(nick: &str) -> String {
    format!(
        "<presence from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant'/><status code='110'/></x></presence>"
    )
}

fn with_room_id(xml: &str, id: &str) -> String {
    xml.replace(
        "</message>",
        &format!("<stanza-id xmlns='{NS_SID}' by='{R}' id='{id}'/></message>"),
    )
}

/// alice joined R from phone; bob said "one" and "two" live at T0 and T0 + 10.
fn with_two_messages() -> World {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&occupant("bob"));
    w.room(&self_presence("Al"));
    w.room(&subject("Topic"));
    w.now = T0;
    assert!(w.room(&groupchat("bob", "one")).archive);
    w.now = T0 + 10;
    assert!(w.room(&groupchat("bob", "two")).archive);
    w
}

/// A new host (a restart) that restores alice's membership in R from what `w` stored.
fn restarted(w: &World) -> (World, Vec<String>) {
    let got = w.host.received(USER, R);
    assert!(!got.is_empty());
    let (room, nick, password) = w.persisted().remove(0);
    let mut after = World::new();
    after.now = T0 + 3600;
    let o = after
        .host
        .restore_with(USER, &room, &nick, password.as_deref(), Some(&got));
    let acts = common::Seen::of::<common::RoomState>(&o, &common::el("<presence/>")).acts;
    (after, acts)
}

#[test]
fn a_restore_asks_for_the_history_since_the_last_message() {
    let w = with_two_messages();
    let (after, acts) = restarted(&w);
    assert_eq!(
        acts,
        [format!(
            "send presence to=R/Al muc history[since={}]",
            format_stamp(T0 + 10 - REJOIN_MARGIN)
        )]
    );
    assert_eq!(after.host.stats().rejoins, 1);
    // Nothing known: no history, as before.
    let mut fresh = Host::new("example.com", Config::default());
    let o = fresh.restore(USER, R, "Al", None);
    let el = common::leaving(&o, &common::el("<presence/>"), common::ACCOUNT);
    let history = el[0].1.get_child("x", minimix::stanza::NS_MUC).unwrap();
    assert!(
        history
            .children()
            .any(|h| h.attr("maxstanzas") == Some("0"))
    );
}

#[test]
fn the_replay_after_a_restart_is_archived_once_and_what_was_had_is_not() {
    let w = with_two_messages();
    let (mut w, _) = restarted(&w);
    w.room(&occupant("bob"));
    w.room(&self_presence("Al"));
    // The room's stamps are its own clock: a second off ours here.
    let one = w.room(&room_history("bob", "one", T0 - 1));
    let two = w.room(&room_history("bob", "two", T0 + 11));
    let three = w.room(&room_history("bob", "three", T0 + 600));
    let four = w.room(&room_history("bob", "four", T0 + 700));
    for known in [&one, &two] {
        assert!(known.swallowed() && !known.archive, "{:?}", known.acts);
    }
    for new in [&three, &four] {
        assert!(new.handled && new.archive, "{:?}", new.acts);
    }
    let end = w.room(&subject("Topic"));
    assert_eq!(
        end.notes,
        [format!(
            "alice caught up in {R}: 2 new message(s), 2 already got"
        )]
    );
    let stats = w.host.stats();
    assert_eq!((stats.replayed_new, stats.replayed_known), (2, 2));
    // Later history from the room (a session's own join) is not taken for a replay.
    assert!(!w.room(&room_history("bob", "five", T0 + 800)).archive);
    // The next rejoin asks since the newest of them.
    assert_eq!(
        minimix::received::Received::from_text(&w.host.received(USER, R)).since(),
        Some(T0 + 700 - REJOIN_MARGIN)
    );
    assert_eq!(w.host.take_unsaved(), ["alice"]);
    assert!(w.host.take_unsaved().is_empty());
}

#[test]
fn a_session_joining_during_the_rejoin_gets_the_whole_replay_once() {
    let w = with_two_messages();
    let (mut w, _) = restarted(&w);
    // tablet joins while the account's join is in flight.
    let s = w.session("tablet", &join("Al", "<history maxstanzas='5'/>"));
    assert!(s.sent().is_empty(), "{:?}", s.acts);
    w.room(&self_presence("Al"));
    let one = w.room(&room_history("bob", "one", T0));
    let three = w.room(&room_history("bob", "three", T0 + 600));
    assert_eq!(one.delivered().len(), 1);
    assert!(!one.archive);
    assert_eq!(three.delivered().len(), 1);
    assert!(three.archive);
}

#[test]
fn an_outage_rejoin_asks_since_the_last_message_and_forks_the_replay_once() {
    let mut w = with_two_messages();
    let s = w.session("laptop", &join("Al", ""));
    assert!(s.sent().is_empty());
    // An error kick (333): an outage. The sessions get the room's presence and take part
    // no more; the account rejoins on its own after a backoff.
    w.now = T0 + 3600;
    w.room(
        "<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='none'/><status code='110'/><status code='333'/></x></presence>",
    );
    let due = w.host.next_deadline().expect("a rejoin is due");
    let acts: Vec<String> = w.tick(due).into_iter().flat_map(|s| s.acts).collect();
    assert_eq!(
        acts,
        [format!(
            "send presence to=R/Al muc history[since={}]",
            format_stamp(T0 + 10 - REJOIN_MARGIN)
        )]
    );
    // desk joins while the rejoin is in flight.
    w.session("desk", &join("Al", ""));
    w.room(&self_presence("Al"));
    let two = w.room(&room_history("bob", "two", T0 + 10));
    let three = w.room(&room_history("bob", "three", T0 + 600));
    assert_eq!(
        two.delivered(),
        [(
            "desk".to_owned(),
            format!(
                "message groupchat from=R/bob id=two body=two delay={}",
                format_stamp(T0 + 10)
            )
        )]
    );
    let to: Vec<String> = three.delivered().into_iter().map(|(r, _)| r).collect();
    assert_eq!(to, ["desk"]);
    assert!(three.archive && !two.archive);
    // The local history for later joins holds each message once.
    w.room(&subject("Topic"));
    let served = w.session("tv", &join("Al", ""));
    let bodies: Vec<String> = served
        .delivered()
        .into_iter()
        .filter(|(_, d)| d.contains("body="))
        .map(|(_, d)| {
            d.split("body=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(bodies, ["one", "two", "three"]);
}

#[test]
fn the_rooms_stanza_id_recognises_a_message_whatever_its_time() {
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al"));
    w.room(&subject("Topic"));
    w.now = T0;
    w.room(&with_room_id(&groupchat("bob", "same"), "r1"));
    let (mut w, _) = restarted(&w);
    w.room(&self_presence("Al"));
    // The same id, far off in time: the same message. Same body, another id: another.
    let again = w.room(&with_room_id(&room_history("bob", "same", T0 + 400), "r1"));
    assert!(!again.archive);
    let other = w.room(&with_room_id(&room_history("bob", "same", T0 + 5), "r2"));
    assert!(other.archive);
}

#[test]
fn marks_found_in_the_archive_at_start_count_as_got() {
    // A crash: what was stored is older than what the archive holds.
    let w = with_two_messages();
    let stale = w.host.received(USER, R);
    let mut after = World::new();
    after.now = T0 + 3600;
    let archived: minidom::Element = common::el(&format!(
        "<message type='groupchat' from='{R}/bob' to='{}'><body>three</body></message>",
        common::ACCOUNT
    ));
    after.host.remember(USER, R, &archived, T0 + 60);
    let o = after.host.restore_with(USER, R, "Al", None, Some(&stale));
    let seen = common::Seen::of::<common::RoomState>(&o, &common::el("<presence/>"));
    assert_eq!(
        seen.acts,
        [format!(
            "send presence to=R/Al muc history[since={}]",
            format_stamp(T0 + 60 - REJOIN_MARGIN)
        )]
    );
    after.room(&self_presence("Al"));
    assert!(!after.room(&room_history("bob", "two", T0 + 10)).archive);
    assert!(!after.room(&room_history("bob", "three", T0 + 60)).archive);
    assert!(after.room(&room_history("bob", "four", T0 + 90)).archive);
}

#[test]
fn the_same_words_said_again_are_a_new_message_in_the_replay() {
    // A room without stanza-ids, a client without origin-ids: "ok" is matched by sender,
    // body and time, and each message the account got stands for one in the replay.
    let mut w = World::new();
    w.session("phone", &join("Al", ""));
    w.room(&self_presence("Al"));
    w.room(&subject("Topic"));
    w.now = T0;
    assert!(w.room(&groupchat("bob", "ok")).archive);
    let (mut w, _) = restarted(&w);
    w.room(&self_presence("Al"));
    let again = w.room(&room_history("bob", "ok", T0));
    assert!(!again.archive, "{:?}", again.acts);
    let said_again = w.room(&room_history("bob", "ok", T0 + 60));
    assert!(said_again.archive, "{:?}", said_again.acts);
    let end = w.room(&subject("Topic"));
    assert_eq!(
        end.notes,
        [format!(
            "alice caught up in {R}: 1 new message(s), 1 already got"
        )]
    );
}
