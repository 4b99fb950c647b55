//! Outages end no membership (SPEC flow 18; flow 13 for 332/333) through the I/O-free core:
//! an error kick (333) or a service shutdown (332) keeps the membership and the module
//! rejoins with backoff, a bounded number of times; while no session is joined, the account
//! self-pings each room (XEP-0410) and rejoins the rooms that forgot it; a real removal
//! stays final. Time passes with `tick`, as the shim's timer drives it.
//!
//! Stanzas use the shorthands of tests/common (`$R` the room, `$MU` muc#user, `$ST` stanza
//! errors); action descriptions shorten the room to `R` and the account to `A`.

mod common;

use common::{ACCOUNT, R, T0, USER, groupchat, join, membership, occupant, subject};

use minimix::host::Config;
use minimix::outage::{FIRST_BACKOFF, backoff, seed, spread};

type World = common::World<common::RoomState>;

const INTERVAL: i64 = 300;

fn self_presence(nick: &str) -> String {
    format!(
        "<presence from='$R/{nick}'><x xmlns='$MU'><item affiliation='member' role='participant'/><status code='110'/></x></presence>"
    )
}

/// The room puts alice out with these status codes (besides 110).
fn put_out(code: u16) -> String {
    format!(
        "<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='member' role='none'/><status code='110'/><status code='{code}'/></x></presence>"
    )
}

fn join_error(error_type: &str, condition: &str) -> String {
    format!(
        "<presence type='error' from='$R/Al'><x xmlns='$MUC'/><error type='{error_type}'><{condition} xmlns='$ST'/></error></presence>"
    )
}

fn ping_result(id: &str) -> String {
    format!("<iq type='result' from='$R/Al' id='{id}'/>")
}

fn ping_error(id: &str, condition: &str) -> String {
    format!(
        "<iq type='error' from='$R/Al' id='{id}'><ping xmlns='urn:xmpp:ping'/><error type='cancel'><{condition} xmlns='$ST'/></error></iq>"
    )
}

/// What the module sends to join R as Al on its own: no history, from the account.
const MODULE_JOIN: &str = "send presence to=R/Al muc history[maxstanzas=0]";

/// alice joined R as "Al" from phone, bob in the room, the subject in.
fn joined_in(mut w: World) -> World {
    w.session("phone", &join("Al", ""));
    w.room(&occupant("bob"));
    w.room(&self_presence("Al"));
    w.room(&subject("Topic"));
    assert_eq!(w.members(), membership("Al", &["phone"]));
    w
}

fn joined() -> World {
    joined_in(World::new())
}

/// `joined()` with phone gone: the account is in R with no session.
fn joined_offline() -> World {
    let mut w = joined();
    w.end("phone");
    assert_eq!(w.members(), membership("Al", &[]));
    w
}

/// When the first self-ping check of R falls, the room confirmed at `at`.
fn first_check(at: i64) -> i64 {
    at + 1 + spread(INTERVAL, seed(USER, R, 0))
}

/// When rejoin attempt `attempt` goes out after a kick or failure at `at`.
fn attempt_at(at: i64, attempt: u32) -> i64 {
    at + backoff(attempt, seed(USER, R, attempt))
}

/// All actions of what the ticks at `now` did, in order.
fn tick(w: &mut World, now: i64) -> Vec<String> {
    w.tick(now).into_iter().flat_map(|s| s.acts).collect()
}

fn tick_notes(w: &mut World, now: i64) -> Vec<String> {
    w.tick(now).into_iter().flat_map(|s| s.notes).collect()
}

/// Time passes to the first check: the account's self-ping goes out; its id.
fn pinged(w: &mut World) -> String {
    let at = first_check(T0);
    assert_eq!(w.host.next_deadline(), Some(at));
    let seen = w.tick(at);
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    let ping = s.sent()[0];
    assert_eq!(s.acts.len(), 1, "{:?}", s.acts);
    assert_eq!(ping.name(), "iq");
    assert_eq!(ping.attr("type"), Some("get"));
    assert_eq!(ping.attr("from"), Some(ACCOUNT));
    assert_eq!(ping.attr("to"), Some(&*format!("{R}/Al")));
    assert!(ping.has_child("ping", "urn:xmpp:ping"));
    ping.attr("id").expect("an id").to_owned()
}

// ---------------------------------------------------------------------------------------
// 332 and 333: outages, not removals

#[test]
fn an_error_kick_or_shutdown_reaches_the_sessions_and_the_account_rejoins() {
    for code in [333, 332] {
        let mut w = joined();
        w.session("laptop", &join("Al", ""));
        let s = w.room(&put_out(code));
        let line = format!("presence unavailable from=R/Al role=none 110,{code}");
        assert_eq!(
            s.acts,
            [format!("phone <- {line}"), format!("laptop <- {line}")],
            "{code}"
        );
        assert_eq!(s.notes.len(), 1, "{code}");
        assert!(s.notes[0].contains("rejoining"), "{:?}", s.notes);
        // The membership stays (and stays stored); the sessions were told they are out.
        assert_eq!(w.members(), membership("Al", &[]), "{code}");
        assert_eq!(w.persisted().len(), 1, "{code}");
        // Nothing goes to the room until the first attempt is due.
        let first = attempt_at(T0, 1);
        assert!(first - T0 >= FIRST_BACKOFF);
        assert_eq!(w.host.next_deadline(), Some(first));
        assert!(tick(&mut w, first - 1).is_empty());
        assert_eq!(tick(&mut w, first), [MODULE_JOIN], "{code}");
        assert_eq!(w.host.stats().rejoins, 1);
        // The room takes the account back: joined again, with no session.
        let s = w.room(&self_presence("Al"));
        assert!(s.acts.is_empty(), "{:?}", s.acts);
        assert_eq!(w.members(), membership("Al", &[]));
        // Live traffic is archived again.
        assert!(w.room(&groupchat("bob", "after")).archive);
        // A later join is served locally again: nothing to the room.
        let s = w.session("phone", &join("Al", ""));
        assert!(s.sent().is_empty(), "{:?}", s.acts);
        assert_eq!(w.members(), membership("Al", &["phone"]));
    }
}

#[test]
fn a_session_joining_while_the_rejoin_waits_makes_the_module_join_at_once() {
    let mut w = joined_offline();
    w.room(&put_out(333));
    let s = w.session("laptop", &join("Al", ""));
    assert_eq!(s.acts, [MODULE_JOIN]);
    assert_eq!(w.host.stats().rejoins, 1);
    // The room's answer reaches it; no second join when the first attempt's time comes.
    let s = w.room(&occupant("bob"));
    assert_eq!(s.acts, ["laptop <- presence from=R/bob role=participant"]);
    let s = w.room(&self_presence("Al"));
    assert_eq!(
        s.acts,
        ["laptop <- presence from=R/Al role=participant 110"]
    );
    assert_eq!(w.members(), membership("Al", &["laptop"]));
    assert!(tick(&mut w, attempt_at(T0, 1)).is_empty());
    assert_eq!(w.host.stats().rejoins, 1);
}

#[test]
fn a_kick_ban_or_destruction_while_offline_stays_final() {
    for extra in [
        "<status code='307'/>",
        "<status code='301'/>",
        "<status code='321'/>",
        "<status code='322'/>",
        "<destroy/>",
    ] {
        let mut w = joined_offline();
        let xml = format!(
            "<presence type='unavailable' from='$R/Al'><x xmlns='$MU'><item affiliation='none' role='none'/><status code='110'/>{extra}</x></presence>"
        );
        let s = w.room(&xml);
        assert!(s.swallowed() && s.persist, "{extra}");
        assert!(w.members().is_empty(), "{extra}");
        assert!(w.persisted().is_empty(), "{extra}");
        // Nothing is due any more: no ping, no rejoin, ever.
        for t in [T0 + 10, T0 + 700, T0 + 3600] {
            assert!(tick(&mut w, t).is_empty(), "{extra}");
        }
        let st = w.host.stats();
        assert_eq!((st.rejoins, st.self_pings), (0, 0), "{extra}");
    }
}

// ---------------------------------------------------------------------------------------
// Rejoins: backoff, bounded attempts, transient and final errors

#[test]
fn failed_rejoins_back_off_and_after_the_last_the_membership_is_kept_for_the_next_start() {
    let mut w = World::with(Config {
        rejoin_attempts: 3,
        ..Config::default()
    });
    w = joined_in(w);
    w.end("phone");
    w.room(&put_out(333));
    let mut at = attempt_at(T0, 1);
    for attempt in 1..=3u32 {
        assert_eq!(w.host.next_deadline(), Some(at), "attempt {attempt}");
        assert_eq!(tick(&mut w, at), [MODULE_JOIN], "attempt {attempt}");
        let s = w.room(&join_error("cancel", "remote-server-not-found"));
        assert!(s.swallowed(), "{:?}", s.acts);
        assert_eq!(w.members(), membership("Al", &[]), "attempt {attempt}");
        if attempt < 3 {
            assert!(!s.warn);
            assert!(s.notes[0].contains("next attempt in"), "{:?}", s.notes);
            let next = attempt_at(w.now, attempt + 1);
            // Each wait at least doubles.
            assert!(
                next - w.now >= FIRST_BACKOFF << attempt,
                "attempt {attempt}"
            );
            at = next;
        } else {
            assert!(s.warn);
            assert_eq!(
                s.notes,
                [format!(
                    "alice gave up rejoining {R} after 3 attempts: the membership is kept for the \
                     next start"
                )]
            );
        }
    }
    let st = w.host.stats();
    assert_eq!((st.rejoins, st.rejoins_given_up), (3, 1));
    // Kept (and stored) for the next start, and nothing more is tried meanwhile.
    assert_eq!(w.persisted().len(), 1);
    assert!(w.host.confirmed(USER, R));
    for t in [w.now + 700, w.now + 7200] {
        assert!(tick(&mut w, t).is_empty());
    }
    // A session that joins brings the account back at once.
    let s = w.session("phone", &join("Al", ""));
    assert_eq!(s.acts, [MODULE_JOIN]);
    w.room(&self_presence("Al"));
    assert_eq!(w.members(), membership("Al", &["phone"]));
}

#[test]
fn a_session_waiting_on_a_failed_rejoin_gets_the_error_once() {
    let mut w = joined_offline();
    w.room(&put_out(333));
    w.session("laptop", &join("Al", ""));
    let s = w.room(&join_error("wait", "remote-server-timeout"));
    assert_eq!(
        s.acts,
        ["laptop <- presence error from=R/Al muc err=remote-server-timeout"]
    );
    assert_eq!(w.members(), membership("Al", &[]));
    // The next attempt follows, the session no longer takes part.
    let next = attempt_at(w.now, 2);
    assert_eq!(tick(&mut w, next), [MODULE_JOIN]);
    assert!(w.room(&occupant("bob")).acts.is_empty());
}

#[test]
fn a_rejoin_refused_for_good_drops_the_membership() {
    for (error_type, condition) in [
        ("auth", "forbidden"),
        ("auth", "registration-required"),
        ("cancel", "gone"),
    ] {
        let mut w = joined_offline();
        w.room(&put_out(333));
        tick(&mut w, attempt_at(T0, 1));
        let s = w.room(&join_error(error_type, condition));
        assert!(s.persist, "{condition}");
        assert!(w.members().is_empty(), "{condition}");
        assert!(w.persisted().is_empty(), "{condition}");
        assert!(tick(&mut w, T0 + 3600).is_empty(), "{condition}");
    }
}

#[test]
fn a_bounce_from_a_link_that_went_away_is_tried_again_and_a_late_error_ends_nothing() {
    // mod_smacks answers what a dropped s2s link never acknowledged with
    // recipient-unavailable; that is no refusal by the room.
    let mut w = joined_offline();
    w.room(&put_out(333));
    let sent_at = attempt_at(T0, 1);
    assert_eq!(tick(&mut w, sent_at), [MODULE_JOIN]);
    w.now = sent_at + 1;
    let s = w.room(&join_error("cancel", "recipient-unavailable"));
    assert!(!s.persist);
    assert_eq!(w.persisted().len(), 1);
    let next = attempt_at(sent_at + 1, 2);
    assert_eq!(tick(&mut w, next), [MODULE_JOIN]);
    // That attempt gets no answer in time: counted as failed; its error comes later and
    // ends nothing (no join of the module's waits then).
    let timeout = w.host.config().iq_timeout;
    tick(&mut w, next + timeout);
    w.now = next + timeout + 1;
    let late = w.room(&join_error("cancel", "remote-server-timeout"));
    assert!(late.acts.is_empty() && !late.persist, "{:?}", late.acts);
    assert_eq!(w.persisted().len(), 1);
    assert!(w.host.next_deadline().is_some());
}

#[test]
fn an_unanswered_rejoin_is_a_failed_attempt() {
    let mut w = joined_offline();
    w.room(&put_out(333));
    let sent_at = attempt_at(T0, 1);
    tick(&mut w, sent_at);
    w.now = sent_at + 1;
    w.session("laptop", &join("Al", ""));
    let timeout = w.host.config().iq_timeout;
    assert_eq!(w.host.next_deadline(), Some(sent_at + timeout));
    let acts = tick(&mut w, sent_at + timeout);
    assert_eq!(
        acts,
        ["laptop <- presence error from=R/Al muc err=remote-server-timeout"]
    );
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(
        tick(&mut w, attempt_at(sent_at + timeout, 2)),
        [MODULE_JOIN]
    );
}

#[test]
fn a_restart_rejoin_the_network_refuses_is_tried_again() {
    let mut w = World::new();
    let s = w.restore(R, "Al", None);
    assert_eq!(s.acts, [MODULE_JOIN]);
    assert_eq!(w.host.stats().rejoins, 1);
    // Stamped at the first tick (no clock came with the restore).
    assert_eq!(w.host.next_deadline(), Some(0));
    assert!(tick(&mut w, T0).is_empty());
    let s = w.room(&join_error("cancel", "remote-server-not-found"));
    assert!(s.swallowed());
    assert_eq!(w.members(), membership("Al", &[]));
    assert_eq!(tick(&mut w, attempt_at(T0, 2)), [MODULE_JOIN]);
    w.room(&self_presence("Al"));
    assert!(w.host.confirmed(USER, R));
}

#[test]
fn an_admin_leave_while_the_rejoin_waits_sends_nothing() {
    let mut w = joined_offline();
    w.room(&put_out(332));
    let s = w.leave(R, "asked by an admin");
    assert!(s.acts.is_empty(), "{:?}", s.acts);
    assert!(s.persist);
    assert!(w.members().is_empty());
    assert!(tick(&mut w, T0 + 3600).is_empty());
    assert_eq!(w.host.stats().rejoins, 0);
}

// ---------------------------------------------------------------------------------------
// Self-pings while no session is joined

#[test]
fn the_account_self_pings_a_room_no_session_is_joined_to_and_the_answer_reaches_nobody() {
    let mut w = joined_offline();
    let id = pinged(&mut w);
    // One ping in flight at most: nothing more until it is answered or given up on.
    assert!(tick(&mut w, first_check(T0) + 60).is_empty());
    let s = w.room(&ping_result(&id));
    assert!(s.swallowed(), "{:?}", s.acts);
    let st = w.host.stats();
    assert_eq!(
        (st.self_pings, st.self_pings_answered, st.pending_iqs),
        (1, 1, 0)
    );
    // The next one period after the last.
    assert_eq!(w.host.next_deadline(), Some(first_check(T0) + INTERVAL));
    // A second answer to the same id is nobody's: it passes.
    assert!(w.room(&ping_result(&id)).passed());
}

#[test]
fn no_self_ping_while_a_session_is_joined() {
    let mut w = joined();
    for k in 0..3 {
        assert!(tick(&mut w, first_check(T0) + k * INTERVAL).is_empty());
    }
    assert_eq!(w.host.stats().self_pings, 0);
    // Once the last session is gone, the next check pings.
    w.end("phone");
    let acts = tick(&mut w, first_check(T0) + 3 * INTERVAL);
    assert_eq!(acts.len(), 1);
    assert!(acts[0].starts_with("send iq get to=R/Al"), "{acts:?}");
}

#[test]
fn a_room_that_forgot_the_account_is_rejoined_at_once() {
    for condition in ["not-acceptable", "item-not-found"] {
        let mut w = joined_offline();
        let id = pinged(&mut w);
        let s = w.room(&ping_error(&id, condition));
        assert_eq!(s.acts, [MODULE_JOIN], "{condition}");
        assert!(s.notes[0].contains(condition), "{:?}", s.notes);
        let st = w.host.stats();
        assert_eq!((st.self_pings_gone, st.rejoins), (1, 1), "{condition}");
        // The occupants the account knew are stale: a join meanwhile gets none of them.
        let s = w.session("phone", &join("Al", ""));
        assert!(s.acts.is_empty(), "{:?}", s.acts);
        let s = w.room(&self_presence("Al"));
        assert_eq!(s.acts, ["phone <- presence from=R/Al role=participant 110"]);
    }
}

#[test]
fn a_network_error_or_no_answer_to_a_self_ping_means_try_later() {
    for condition in ["remote-server-not-found", "remote-server-timeout"] {
        let mut w = joined_offline();
        let id = pinged(&mut w);
        let s = w.room(&ping_error(&id, condition));
        assert!(s.swallowed(), "{:?}", s.acts);
        assert_eq!(
            s.notes,
            [format!(
                "alice could not self-ping {R} ({condition}): trying again later"
            )]
        );
        assert_eq!(w.members(), membership("Al", &[]));
        assert_eq!(w.host.stats().self_pings_failed, 1);
        assert_eq!(w.host.next_deadline(), Some(first_check(T0) + INTERVAL));
    }
    // No answer at all: given up on after iq_timeout, tried again one period later.
    let mut w = joined_offline();
    pinged(&mut w);
    let timeout = w.host.config().iq_timeout;
    let notes = tick_notes(&mut w, first_check(T0) + timeout);
    assert_eq!(
        notes,
        [format!(
            "alice could not self-ping {R} (no answer): trying again later"
        )]
    );
    assert_eq!(w.host.stats().self_pings_failed, 1);
    let acts = tick(&mut w, first_check(T0) + INTERVAL);
    assert_eq!(acts.len(), 1);
    assert!(acts[0].starts_with("send iq get to=R/Al"), "{acts:?}");
}

#[test]
fn self_pings_are_spread_over_the_interval_and_can_be_turned_off() {
    // Rooms confirmed at the same second are checked at points of the period of their
    // own.
    let checks: std::collections::BTreeSet<i64> = (0..20)
        .map(|i| {
            spread(
                INTERVAL,
                seed(USER, &format!("room{i}@conference.example.com"), 0),
            )
        })
        .collect();
    assert!(checks.len() >= 15, "{checks:?}");
    let mut w = World::with(Config {
        self_ping_interval: 0,
        ..Config::default()
    });
    w = joined_in(w);
    w.end("phone");
    assert_eq!(w.host.next_deadline(), None);
    assert!(tick(&mut w, T0 + 3600).is_empty());
    assert_eq!(w.host.stats().self_pings, 0);
}

#[test]
fn a_repeated_self_presence_leaves_the_ping_cycle_alone() {
    let mut w = joined_offline();
    let at = first_check(T0);
    assert_eq!(w.host.next_deadline(), Some(at));
    // The room repeats the account's self-presence (a role change, or a room flooding
    // them): the check stays where it was, and no timer entry is added.
    for k in 1..=3 {
        w.now = T0 + 10 * k;
        w.room(&self_presence("Al"));
        assert_eq!(w.host.next_deadline(), Some(at));
    }
    let id = pinged(&mut w);
    w.now = at + 1;
    w.room(&self_presence("Al"));
    // The ping in flight is still the account's: its answer reaches no session.
    let s = w.room(&ping_result(&id));
    assert!(s.handled && s.delivered().is_empty(), "{:?}", s.acts);
}
