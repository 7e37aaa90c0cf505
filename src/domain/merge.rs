//! Merge decisions: is a merge request valid, a repeat, or not yet possible?

use uuid::Uuid;

/// What the merge step knows about one side of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeParty {
    pub id: Uuid,
    pub lifecycle_state: String,
    pub merged_into: Option<Uuid>,
}

/// Why a merge request is refused for good (the dead letter's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeRejection {
    SameUser,
    UnknownUser,
    AlreadyMergedElsewhere,
    Cycle,
    /// The survivor is not active (deactivated): nothing may be merged into it.
    TargetNotActive,
}

impl MergeRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeRejection::SameUser => "same_user",
            MergeRejection::UnknownUser => "unknown_user",
            MergeRejection::AlreadyMergedElsewhere => "already_merged_elsewhere",
            MergeRejection::Cycle => "cycle",
            MergeRejection::TargetNotActive => "target_not_active",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeDecision {
    /// Transfer everything from old to new.
    Apply,
    /// Already merged into this very target: nothing to do, nothing to announce.
    AlreadyDone,
    /// A user is missing; it may be a sign-up not synced yet: retry until the budget ends.
    NotYet,
    Reject(MergeRejection),
}

/// Decides a merge of `old` into `new`. `new_chain` is the `merged_into` chain starting at
/// the new user (empty when it is active), used to detect cycles.
pub fn decide(
    old_id: Uuid,
    new_id: Uuid,
    old: Option<&MergeParty>,
    new: Option<&MergeParty>,
    new_chain: &[Uuid],
    retry_budget_left: bool,
) -> MergeDecision {
    if old_id == new_id {
        return MergeDecision::Reject(MergeRejection::SameUser);
    }
    let (Some(old), Some(new)) = (old, new) else {
        return if retry_budget_left {
            MergeDecision::NotYet
        } else {
            MergeDecision::Reject(MergeRejection::UnknownUser)
        };
    };
    match old.merged_into {
        Some(target) if target == new.id => return MergeDecision::AlreadyDone,
        Some(_) => return MergeDecision::Reject(MergeRejection::AlreadyMergedElsewhere),
        None => {}
    }
    if new.merged_into.is_some() || new_chain.contains(&old.id) {
        // The target itself was merged away: into the old user (a cycle) or elsewhere
        // (merging into a user that no longer exists would strand the data).
        return MergeDecision::Reject(MergeRejection::Cycle);
    }
    if new.lifecycle_state != "active" {
        return MergeDecision::Reject(MergeRejection::TargetNotActive);
    }
    MergeDecision::Apply
}

/// Collection permission strength: the stronger one survives a de-duplication.
pub fn permission_rank(action: &str) -> u8 {
    match action {
        "owner" => 4,
        "admin" => 3,
        "write" => 2,
        "read" => 1,
        _ => 0,
    }
}

/// Organization role strength.
pub fn role_rank(role: &str) -> u8 {
    match role {
        "owner" => 4,
        "admin" => 3,
        "member" => 2,
        "viewer" => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(id: u128, merged_into: Option<u128>) -> MergeParty {
        MergeParty {
            id: Uuid::from_u128(id),
            lifecycle_state: if merged_into.is_some() {
                "merged"
            } else {
                "active"
            }
            .into(),
            merged_into: merged_into.map(Uuid::from_u128),
        }
    }

    #[test]
    fn decisions() {
        let (a, b, c) = (party(1, None), party(2, None), party(3, None));
        let id = |p: &MergeParty| p.id;
        assert_eq!(
            decide(id(&a), id(&a), Some(&a), Some(&a), &[], true),
            MergeDecision::Reject(MergeRejection::SameUser)
        );
        assert_eq!(
            decide(id(&a), id(&b), Some(&a), Some(&b), &[], true),
            MergeDecision::Apply
        );
        assert_eq!(
            decide(id(&a), id(&b), None, Some(&b), &[], true),
            MergeDecision::NotYet
        );
        assert_eq!(
            decide(id(&a), id(&b), Some(&a), None, &[], false),
            MergeDecision::Reject(MergeRejection::UnknownUser)
        );
        let a_into_b = party(1, Some(2));
        assert_eq!(
            decide(id(&a), id(&b), Some(&a_into_b), Some(&b), &[], true),
            MergeDecision::AlreadyDone
        );
        assert_eq!(
            decide(id(&a), id(&c), Some(&a_into_b), Some(&c), &[], true),
            MergeDecision::Reject(MergeRejection::AlreadyMergedElsewhere)
        );
        // A→B applied; now B→A: the target A is merged into B, the old user.
        assert_eq!(
            decide(id(&b), id(&a), Some(&b), Some(&a_into_b), &[b.id], true),
            MergeDecision::Reject(MergeRejection::Cycle)
        );
        assert!(permission_rank("owner") > permission_rank("write"));
        assert!(role_rank("admin") > role_rank("member"));
    }
}
