//! Deterministic identifiers (UUIDv5). Re-running a step produces the same ids, so a replay
//! that does re-emit is recognisable downstream and an outbox insert can de-duplicate.

use uuid::Uuid;

/// authsync's UUIDv5 namespace (fixed forever: changing it changes every derived id).
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c2e_9b4d_4e8a_a7c5_1d2e_3f40_5b6c);

/// Id of the result event of `result_type` caused by input event `input_event_id`.
pub fn result_event_id(input_event_id: &str, result_type: &str) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        format!("result:{input_event_id}:{result_type}").as_bytes(),
    )
}

/// Id of the user created by the first login of `(provider, subject)`.
pub fn user_id(provider: &str, subject: &str) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        format!("user:{}:{provider}:{subject}", provider.len()).as_bytes(),
    )
}

/// An id derived from another one (the user's tenant, organization, collections…).
pub fn derived(parent: Uuid, what: &str) -> Uuid {
    Uuid::new_v5(&parent, what.as_bytes())
}

/// Entity tag of a user version.
pub fn user_etag(user: Uuid, version: i64) -> String {
    Uuid::new_v5(&user, format!("etag:{version}").as_bytes())
        .simple()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(
            result_event_id("e1", "user.synced"),
            result_event_id("e1", "user.synced")
        );
        assert_ne!(
            result_event_id("e1", "user.synced"),
            result_event_id("e1", "user.signed_up")
        );
        assert_ne!(
            result_event_id("e1", "user.synced"),
            result_event_id("e2", "user.synced")
        );
        // The provider length prefix keeps `a:b` + `c` apart from `a` + `b:c`.
        assert_ne!(user_id("a:b", "c"), user_id("a", "b:c"));
        assert_ne!(
            user_etag(user_id("a", "b"), 1),
            user_etag(user_id("a", "b"), 2)
        );
    }
}
