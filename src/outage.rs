//! Outages that end no membership (flow 18): where the module stands in bringing the
//! account back into a room it was put out of by no one's choice (an error kick, 333; a
//! service shutdown, 332; a room that forgot it, found by a self-ping), and the self-pings
//! that find out. Pure values and arithmetic; the host drives them from its timers.

/// The account is out of a room it should be in, and the module brings it back: a join
/// every so often, at most `minimix_rejoin_attempts` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejoin {
    /// Join attempt `attempt` (1 for the first) is due at the membership's wake time.
    Due { attempt: u32 },
    /// Join attempt `attempt` was sent at `sent` (none: not known yet, stamped at the next
    /// tick: a join sent after a restart, where no clock came with the event).
    InFlight { attempt: u32, sent: Option<i64> },
    /// Every attempt failed: the membership is kept (for the next start, or a session
    /// that joins the room), and nothing more is tried until then.
    GaveUp,
}

impl Rejoin {
    /// The number of joins already sent.
    pub fn attempts_made(self) -> u32 {
        match self {
            Rejoin::Due { attempt } => attempt.saturating_sub(1),
            Rejoin::InFlight { attempt, .. } => attempt,
            Rejoin::GaveUp => 0,
        }
    }

    /// No join of the module's is in flight: the account is not in the room and nothing
    /// is on its way there (a session that joins makes the module join at once).
    pub fn waiting(self) -> bool {
        !matches!(self, Rejoin::InFlight { .. })
    }
}

/// The account's own XEP-0410 self-ping of a room, sent while no session is joined; one
/// per room in flight at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfPing {
    /// The IQ's id (the module's own) and where it went (`room/nick`): the reply must come
    /// from there.
    pub id: String,
    pub to: String,
    pub sent: i64,
}

/// What the room's answer to a self-ping says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PingAnswer {
    /// The account is an occupant (a result; or, XEP-0410 §3.2, `service-unavailable` or
    /// `feature-not-implemented`: the ping went through to an occupant that cannot answer).
    Joined,
    /// The room does not know the account (`not-acceptable`, `item-not-found`, and any
    /// other error of the room's, XEP-0410 §3.2): rejoin.
    Gone,
    /// Nothing is known: the network failed (the room's server is unreachable or did not
    /// answer). Try again later.
    Unknown,
}

/// XEP-0410 §3.2, with the network failures Prosody's s2s reports told apart: the room's
/// server cannot be reached now, which says nothing about the membership.
pub fn ping_answer(error: bool, condition: Option<&str>) -> PingAnswer {
    if !error {
        return PingAnswer::Joined;
    }
    match condition {
        Some("service-unavailable" | "feature-not-implemented") => PingAnswer::Joined,
        Some("remote-server-not-found" | "remote-server-timeout") => PingAnswer::Unknown,
        _ => PingAnswer::Gone,
    }
}

/// Whether an error answer to a rejoin is worth another attempt: the error says to wait
/// (RFC 6120 §8.3.2: "retry after waiting", e.g. a full room), or it comes from the way
/// there rather than from the room: the room's server could not be reached, mod_smacks
/// answered what a dropped s2s link never acknowledged (`recipient-unavailable`), a server
/// failed on the way (`internal-server-error`, `resource-constraint`,
/// `undefined-condition`), or the error names no condition at all. Anything else (banned,
/// members-only, a password refused, a room that is gone) is the room's last word, as for
/// any join (flow 2).
pub fn join_error_is_transient(error_type: Option<&str>, condition: Option<&str>) -> bool {
    error_type == Some("wait")
        || matches!(
            condition,
            None | Some(
                "remote-server-not-found"
                    | "remote-server-timeout"
                    | "recipient-unavailable"
                    | "internal-server-error"
                    | "resource-constraint"
                    | "undefined-condition"
            )
        )
}

/// First delay of the backoff between rejoin attempts after a kick or a failed attempt,
/// in seconds; it doubles with each attempt, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: i64 = 5;
pub const MAX_BACKOFF: i64 = 600;

/// How long after a failure join attempt `attempt` (2 and up; 1 after a kick) goes out:
/// 5 s, 10 s, 20 s, … up to 10 minutes, plus up to a quarter more, spread by `seed` so
/// that the accounts a room lost at once (a shutdown) do not all come back at once.
pub fn backoff(attempt: u32, seed: u64) -> i64 {
    let doubling = attempt.saturating_sub(1).min(20);
    let base = FIRST_BACKOFF.saturating_mul(1 << doubling).min(MAX_BACKOFF);
    base + (seed % (base as u64 / 4 + 1)) as i64
}

/// Where in each self-ping period one membership's check falls: spread over the period by
/// `seed`, so that the rooms of a server (all restored at once after a start) are not
/// all pinged at once.
pub fn spread(interval: i64, seed: u64) -> i64 {
    if interval <= 0 {
        return 0;
    }
    (seed % interval as u64) as i64
}

/// A stable seed for one account's membership of one room (FNV-1a), and `salt` (an
/// attempt number) mixed in. The same every time, so tests and logs can tell when.
pub fn seed(user: &str, room: &str, salt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user
        .bytes()
        .chain([0])
        .chain(room.bytes())
        .chain(salt.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_forgot_the_account_only_when_it_says_so() {
        assert_eq!(ping_answer(false, None), PingAnswer::Joined);
        for c in ["not-acceptable", "item-not-found", "forbidden", "gone"] {
            assert_eq!(ping_answer(true, Some(c)), PingAnswer::Gone, "{c}");
        }
        assert_eq!(ping_answer(true, None), PingAnswer::Gone);
        for c in ["service-unavailable", "feature-not-implemented"] {
            assert_eq!(ping_answer(true, Some(c)), PingAnswer::Joined, "{c}");
        }
        for c in ["remote-server-not-found", "remote-server-timeout"] {
            assert_eq!(ping_answer(true, Some(c)), PingAnswer::Unknown, "{c}");
        }
    }

    #[test]
    fn only_network_failures_and_wait_errors_are_tried_again() {
        assert!(join_error_is_transient(
            Some("cancel"),
            Some("remote-server-not-found")
        ));
        assert!(join_error_is_transient(
            Some("wait"),
            Some("remote-server-timeout")
        ));
        assert!(join_error_is_transient(
            Some("wait"),
            Some("service-unavailable")
        ));
        assert!(!join_error_is_transient(Some("auth"), Some("forbidden")));
        assert!(!join_error_is_transient(
            Some("auth"),
            Some("registration-required")
        ));
        assert!(!join_error_is_transient(Some("cancel"), Some("gone")));
        assert!(!join_error_is_transient(Some("cancel"), Some("conflict")));
        assert!(!join_error_is_transient(
            Some("cancel"),
            Some("service-unavailable")
        ));
        // What a link that went away bounces (mod_smacks), a failure on the way, and an
        // error that says nothing: tried again.
        assert!(join_error_is_transient(
            Some("cancel"),
            Some("recipient-unavailable")
        ));
        assert!(join_error_is_transient(
            Some("cancel"),
            Some("internal-server-error")
        ));
        assert!(join_error_is_transient(None, None));
    }

    #[test]
    fn backoff_doubles_up_to_ten_minutes_with_at_most_a_quarter_more() {
        let bases = [5, 10, 20, 40, 80, 160, 320, 600, 600];
        for (i, base) in bases.iter().enumerate() {
            for s in 0..200 {
                let d = backoff(i as u32 + 1, seed("alice", "r@c", s));
                assert!(d >= *base && d <= base + base / 4, "attempt {}: {d}", i + 1);
            }
        }
        assert_eq!(backoff(u32::MAX, 0), MAX_BACKOFF);
    }

    #[test]
    fn checks_spread_over_the_interval() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..300 {
            let at = spread(300, seed("alice", &format!("room{i}@c"), 0));
            assert!((0..300).contains(&at));
            seen.insert(at / 30);
        }
        // 300 rooms fall in every tenth of the period.
        assert_eq!(seen.len(), 10);
        assert_eq!(spread(0, 12345), 0);
    }
}
