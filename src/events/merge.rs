//! `auth.merge` events: the merge-users request (`newUserID`, `oldUserId`, `reason`).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{decode_envelope, DecodeError, ErrorClass};

pub const MERGE_EVENT_TYPE: &str = "auth.merge";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeRequest {
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
    pub new_user_id: Uuid,
    pub old_user_id: Uuid,
    pub reason: String,
    /// Who asked (an operator, a ticket): required, recorded in the audit and the event.
    pub requested_by: String,
}

#[derive(Deserialize)]
struct MergeData {
    #[serde(rename = "newUserID")]
    new_user_id: Option<String>,
    #[serde(rename = "oldUserId")]
    old_user_id: Option<String>,
    reason: Option<String>,
    #[serde(rename = "requestedBy")]
    requested_by: Option<String>,
}

fn user_id(field: &str, value: Option<String>) -> Result<Uuid, DecodeError> {
    let value = value.ok_or_else(|| {
        DecodeError::new(
            ErrorClass::MissingField,
            format!("required field `data.{field}` is missing"),
        )
    })?;
    Uuid::parse_str(value.trim()).map_err(|e| {
        DecodeError::new(
            ErrorClass::InvalidField,
            format!("field `data.{field}` is not a UUID: {e}"),
        )
    })
}

impl MergeRequest {
    pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Self, DecodeError> {
        let envelope = decode_envelope(value, max_bytes, MERGE_EVENT_TYPE)?;
        let mut de = serde_json::Deserializer::from_str(envelope.data.get());
        let data: MergeData = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            DecodeError::new(
                ErrorClass::InvalidField,
                format!("field `data.{path}`: {}", e.into_inner()),
            )
        })?;
        let reason = data.reason.unwrap_or_default();
        if reason.len() > 1024 {
            return Err(DecodeError::new(
                ErrorClass::InvalidField,
                "field `data.reason` is over 1024 bytes",
            ));
        }
        let new_user_id = user_id("newUserID", data.new_user_id)?;
        let old_user_id = user_id("oldUserId", data.old_user_id)?;
        // A merge moves an account: it must say who asked for it.
        let requested_by = match data.requested_by.map(|r| r.trim().to_string()) {
            Some(r) if r.len() > 255 => {
                return Err(DecodeError::new(
                    ErrorClass::InvalidField,
                    "field `data.requestedBy` is over 255 bytes",
                ))
            }
            Some(r) if !r.is_empty() => r,
            _ => {
                return Err(DecodeError::new(
                    ErrorClass::MissingField,
                    "required field `data.requestedBy` is missing or empty",
                ))
            }
        };
        Ok(MergeRequest {
            event_id: envelope.id,
            occurred_at: envelope.time,
            new_user_id,
            old_user_id,
            reason,
            requested_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Vec<u8> {
        format!(r#"{{"specversion":"1.0","id":"m1","source":"ops","type":"auth.merge","time":"2026-01-01T00:00:00Z","data":{data}}}"#).into_bytes()
    }

    #[test]
    fn decodes_and_validates() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let ok = MergeRequest::decode(
            Some(&event(&format!(
                r#"{{"newUserID":"{a}","oldUserId":"{b}","reason":"dup","requestedBy":"ops@x"}}"#
            ))),
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            (ok.new_user_id, ok.old_user_id, ok.reason.as_str()),
            (a, b, "dup")
        );
        let err = MergeRequest::decode(
            Some(&event(r#"{"newUserID":"nope","oldUserId":"x"}"#)),
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidField);
        assert!(err.reason.contains("newUserID"));
        let err = MergeRequest::decode(Some(&event(&format!(r#"{{"newUserID":"{a}"}}"#))), 1 << 20)
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        // Nobody asked: refused.
        let err = MergeRequest::decode(
            Some(&event(&format!(
                r#"{{"newUserID":"{a}","oldUserId":"{b}","reason":"dup"}}"#
            ))),
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
        assert!(err.reason.contains("requestedBy"), "{}", err.reason);
    }
}
