//! Pure membership decisions: which hosts should vote.
//!
//! The leader's manager feeds this what it knows (each member's role, health and whether it has
//! caught up) and applies the answer with one joint-consensus membership change. No I/O here.

use std::collections::BTreeSet;

use novacron_types::HostRole;

/// What the planner knows about one Raft member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFacts {
    pub id: u64,
    pub role: HostRole,
    pub voter: bool,
    /// Heard from within the offline threshold.
    pub online: bool,
    /// Its log is close enough to the leader's to vote without stalling commits.
    pub caught_up: bool,
}

impl MemberFacts {
    fn healthy(&self) -> bool {
        self.online && self.caught_up
    }
}

/// The voter set the cluster should have, or `None` when the current one is right.
///
/// Rules, in order:
/// 1. Healthy voters stay voters (the leader is always healthy).
/// 2. Healthy learners are promoted until there are `target` voters; full hosts before
///    witnesses, lower IDs first.
/// 3. A witness votes only while no healthy full host could take its place.
/// 4. Offline voters are kept only to fill seats nobody healthy can take (removing them would
///    not add fault tolerance, and keeping them lets them rejoin without a change).
/// 5. Never more than `target` voters: extras go, witnesses first, then the highest IDs.
pub fn plan_voters(members: &[MemberFacts], leader: u64, target: usize) -> Option<BTreeSet<u64>> {
    let target = target.max(1);
    let rank = |m: &&MemberFacts| (m.role == HostRole::Witness, m.id);

    let mut healthy: Vec<&MemberFacts> = members
        .iter()
        .filter(|m| m.id == leader || m.healthy())
        .collect();
    // Voters first (so they keep their seat), then full hosts before witnesses, then by ID.
    healthy.sort_by_key(|m| (m.id != leader, !m.voter, m.role == HostRole::Witness, m.id));

    let full_healthy = healthy.iter().filter(|m| m.role == HostRole::Full).count();
    let mut want: Vec<&MemberFacts> = Vec::new();
    // Full hosts take seats first; witnesses only fill what full hosts cannot.
    for m in healthy
        .iter()
        .filter(|m| m.role == HostRole::Full || m.id == leader)
    {
        if want.len() < target {
            want.push(m);
        }
    }
    let witness_seats = target.saturating_sub(full_healthy.min(target));
    for m in healthy
        .iter()
        .filter(|m| m.role == HostRole::Witness && m.id != leader)
        .take(witness_seats)
    {
        if want.len() < target {
            want.push(m);
        }
    }
    // Seats still empty: keep offline (or lagging) voters in them.
    let mut stale_voters: Vec<&MemberFacts> = members
        .iter()
        .filter(|m| m.voter && !want.iter().any(|w| w.id == m.id))
        .collect();
    stale_voters.sort_by_key(rank);
    for m in stale_voters {
        if want.len() < target {
            want.push(m);
        }
    }
    let want: BTreeSet<u64> = want.iter().map(|m| m.id).collect();
    let current: BTreeSet<u64> = members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    (want != current && !want.is_empty()).then_some(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, voter: bool, online: bool) -> MemberFacts {
        MemberFacts {
            id,
            role: HostRole::Full,
            voter,
            online,
            caught_up: true,
        }
    }

    fn w(id: u64, voter: bool, online: bool) -> MemberFacts {
        MemberFacts {
            role: HostRole::Witness,
            ..m(id, voter, online)
        }
    }

    fn set(ids: &[u64]) -> Option<BTreeSet<u64>> {
        Some(ids.iter().copied().collect())
    }

    #[test]
    fn learners_are_promoted_up_to_the_target() {
        let ms = [
            m(1, true, true),
            m(2, false, true),
            m(3, false, true),
            m(4, false, true),
        ];
        assert_eq!(plan_voters(&ms, 1, 3), set(&[1, 2, 3]));
        assert_eq!(plan_voters(&ms, 1, 5), set(&[1, 2, 3, 4]));
    }

    #[test]
    fn a_right_voter_set_is_left_alone() {
        let ms = [
            m(1, true, true),
            m(2, true, true),
            m(3, true, true),
            m(4, false, true),
        ];
        assert_eq!(plan_voters(&ms, 2, 3), None);
    }

    #[test]
    fn a_learner_that_has_not_caught_up_waits() {
        let mut lagging = m(2, false, true);
        lagging.caught_up = false;
        let ms = [m(1, true, true), lagging];
        assert_eq!(plan_voters(&ms, 1, 3), None);
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_healthy_learner() {
        let ms = [
            m(1, true, true),
            m(2, true, true),
            m(3, true, false),
            m(4, false, true),
        ];
        assert_eq!(plan_voters(&ms, 1, 3), set(&[1, 2, 4]));
    }

    #[test]
    fn a_dead_voter_without_replacement_keeps_its_seat() {
        let ms = [m(1, true, true), m(2, true, true), m(3, true, false)];
        assert_eq!(plan_voters(&ms, 1, 3), None);
    }

    #[test]
    fn a_witness_votes_only_when_full_hosts_are_missing() {
        // Two full hosts and a witness: the witness is the third vote.
        let ms = [m(1, true, true), m(2, false, true), w(3, false, true)];
        assert_eq!(plan_voters(&ms, 1, 3), set(&[1, 2, 3]));
        // A third full host arrives: it takes the witness's seat.
        let ms = [
            m(1, true, true),
            m(2, true, true),
            w(3, true, true),
            m(4, false, true),
        ];
        assert_eq!(plan_voters(&ms, 1, 3), set(&[1, 2, 4]));
    }

    #[test]
    fn extras_are_demoted_witnesses_first() {
        let ms = [
            m(1, true, true),
            m(2, true, true),
            w(3, true, true),
            m(4, true, true),
            m(5, true, true),
        ];
        assert_eq!(plan_voters(&ms, 5, 3), set(&[1, 2, 5]));
    }

    #[test]
    fn the_leader_always_keeps_its_vote() {
        let ms = [
            w(9, true, true),
            m(1, false, true),
            m(2, false, true),
            m(3, false, true),
        ];
        let plan = plan_voters(&ms, 9, 3).expect("a change");
        assert!(plan.contains(&9), "{plan:?}");
        assert_eq!(plan.len(), 3);
    }
}
