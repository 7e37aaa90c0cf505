//! Request authentication, each provider's documented scheme. Every secret comparison is
//! constant-time; errors say which check failed, never what the secret is.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a request was not authenticated (the `reason` label of the signature-failure metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No signature or token header.
    Missing,
    /// A header that cannot be read (not `t=…,v1=…`, not a number, …).
    Malformed,
    /// The signed time is outside the tolerance (a replay, or a clock far off).
    Stale,
    /// Signed with no secret this endpoint holds, or the body was changed.
    Invalid,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Stale => "stale",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// What a verified request says about its delivery.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// The provider's delivery id (Standard Webhooks `webhook-id` / `svix-id`).
    pub delivery_id: Option<String>,
    /// The signed time of the delivery.
    pub signed_at: Option<DateTime<Utc>>,
}

pub enum Authenticator {
    /// Standard Webhooks, as Svix (Clerk) sends it: `webhook-*` or `svix-*` headers,
    /// `whsec_` base64 secrets, several `v1,` signatures during a rotation, 5 min tolerance.
    StandardWebhooks(Vec<standardwebhooks::Webhook>),
    /// `WorkOS-Signature: t=<ms>, v1=<hex HMAC-SHA256 of "t.body">`.
    Workos {
        secrets: Vec<Vec<u8>>,
        tolerance_secs: i64,
    },
    /// A shared secret in a header (Okta event hooks, Auth0 log streams, bearer forwarders):
    /// compared as SHA-256 digests, so neither content nor length leaks through timing.
    Token {
        header: HeaderName,
        digests: Vec<[u8; 32]>,
    },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::StandardWebhooks(_) => "StandardWebhooks(<secrets>)",
            Authenticator::Workos { .. } => "Workos(<secrets>)",
            Authenticator::Token { .. } => "Token(<secrets>)",
        })
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Authenticator {
    /// `scheme` is `standard_webhooks`, `workos` or `token`; `secrets` are resolved values.
    pub fn new(
        scheme: &str,
        secrets: &[String],
        header: Option<&str>,
        tolerance_secs: u64,
    ) -> Result<Self, String> {
        if secrets.iter().any(|s| s.is_empty()) || secrets.is_empty() {
            return Err("needs at least one non-empty secret".into());
        }
        match scheme {
            "standard_webhooks" => secrets
                .iter()
                .map(|s| {
                    standardwebhooks::Webhook::new(s).map_err(|_| {
                        "a Standard Webhooks secret is `whsec_` followed by base64".to_string()
                    })
                })
                .collect::<Result<_, _>>()
                .map(Authenticator::StandardWebhooks),
            "workos" => Ok(Authenticator::Workos {
                secrets: secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
                tolerance_secs: i64::try_from(tolerance_secs).unwrap_or(i64::MAX),
            }),
            "token" => Ok(Authenticator::Token {
                header: HeaderName::try_from(header.unwrap_or("authorization"))
                    .map_err(|_| "`header` is not a valid header name".to_string())?,
                digests: secrets.iter().map(|s| digest(s.as_bytes())).collect(),
            }),
            other => Err(format!(
                "auth `{other}` is not one of standard_webhooks, workos, token"
            )),
        }
    }

    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Verified, AuthFailure> {
        match self {
            Authenticator::StandardWebhooks(hooks) => standard_webhooks(hooks, headers, body),
            Authenticator::Workos {
                secrets,
                tolerance_secs,
            } => workos(secrets, *tolerance_secs, headers, body, now),
            Authenticator::Token { header, digests } => token(header, digests, headers),
        }
    }
}

/// Svix sends `svix-*`, other Standard Webhooks senders `webhook-*`: both are read.
fn standard_webhooks(
    hooks: &[standardwebhooks::Webhook],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Verified, AuthFailure> {
    let mut unbranded = HeaderMap::new();
    for (name, svix) in [
        ("webhook-id", "svix-id"),
        ("webhook-timestamp", "svix-timestamp"),
        ("webhook-signature", "svix-signature"),
    ] {
        let value = headers
            .get(name)
            .or_else(|| headers.get(svix))
            .ok_or(AuthFailure::Missing)?;
        unbranded.insert(HeaderName::from_static(name), value.clone());
    }
    let mut failure = AuthFailure::Invalid;
    for hook in hooks {
        match hook.verify(body, &unbranded) {
            Ok(()) => {
                let text = |h: &str| unbranded.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
                return Ok(Verified {
                    delivery_id: text("webhook-id").map(str::to_string),
                    signed_at: text("webhook-timestamp")
                        .and_then(|t| t.parse::<i64>().ok())
                        .and_then(|t| DateTime::from_timestamp(t, 0)),
                });
            }
            Err(
                standardwebhooks::WebhookError::TimestampTooOldError
                | standardwebhooks::WebhookError::FutureTimestampError,
            ) => return Err(AuthFailure::Stale),
            Err(
                standardwebhooks::WebhookError::InvalidTimestamp
                | standardwebhooks::WebhookError::InvalidHeader(_),
            ) => failure = AuthFailure::Malformed,
            Err(_) => {}
        }
    }
    Err(failure)
}

fn workos(
    secrets: &[Vec<u8>],
    tolerance_secs: i64,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Verified, AuthFailure> {
    let header = headers
        .get("workos-signature")
        .ok_or(AuthFailure::Missing)?
        .to_str()
        .map_err(|_| AuthFailure::Malformed)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = Some(t.trim()),
            Some(("v1", s)) => {
                signatures.push(hex::decode(s.trim()).map_err(|_| AuthFailure::Malformed)?)
            }
            _ => {}
        }
    }
    let (Some(t), false) = (timestamp, signatures.is_empty()) else {
        return Err(AuthFailure::Malformed);
    };
    let millis: i64 = t.parse().map_err(|_| AuthFailure::Malformed)?;
    let signed_at = DateTime::from_timestamp_millis(millis).ok_or(AuthFailure::Malformed)?;
    if (now - signed_at).num_seconds().abs() > tolerance_secs {
        return Err(AuthFailure::Stale);
    }
    for secret in secrets {
        for signature in &signatures {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|_| AuthFailure::Invalid)?;
            mac.update(t.as_bytes());
            mac.update(b".");
            mac.update(body);
            if mac.verify_slice(signature).is_ok() {
                return Ok(Verified {
                    delivery_id: None,
                    signed_at: Some(signed_at),
                });
            }
        }
    }
    Err(AuthFailure::Invalid)
}

fn token(
    header: &HeaderName,
    digests: &[[u8; 32]],
    headers: &HeaderMap,
) -> Result<Verified, AuthFailure> {
    let value = headers.get(header).ok_or(AuthFailure::Missing)?.as_bytes();
    let bare = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "));
    let candidates = [Some(digest(value)), bare.map(digest)];
    // Every candidate against every secret, without an early exit.
    let mut matched = subtle::Choice::from(0);
    for candidate in candidates.iter().flatten() {
        for d in digests {
            matched |= candidate.ct_eq(d);
        }
    }
    if bool::from(matched) {
        Ok(Verified::default())
    } else {
        Err(AuthFailure::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's test vector (also in every official library).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn the_standard_webhooks_test_vector_signs_as_specified() {
        let hook = standardwebhooks::Webhook::new(SECRET).unwrap();
        assert_eq!(hook.sign(MSG_ID, TIMESTAMP, PAYLOAD).unwrap(), SIGNATURE);
    }

    fn headers(pairs: &[(&str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn svix_and_webhook_headers_rotation_staleness_and_tampering() {
        let now = Utc::now().timestamp();
        let hook = standardwebhooks::Webhook::new(SECRET).unwrap();
        let sig = hook.sign(MSG_ID, now, PAYLOAD).unwrap();
        let other = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_string();
        let auth = Authenticator::new(
            "standard_webhooks",
            &[other.clone(), SECRET.into()],
            None,
            300,
        )
        .unwrap();
        for prefix in ["svix", "webhook"] {
            let h = headers(&[
                (&format!("{prefix}-id"), MSG_ID.into()),
                (&format!("{prefix}-timestamp"), now.to_string()),
                // A rotation: an old signature first, the valid one second.
                (&format!("{prefix}-signature"), format!("v1,AAAA {sig}")),
            ]);
            let v = auth.verify(&h, PAYLOAD, Utc::now()).unwrap();
            assert_eq!(v.delivery_id.as_deref(), Some(MSG_ID));
            assert_eq!(
                auth.verify(&h, br#"{"test": 2432232315}"#, Utc::now())
                    .unwrap_err(),
                AuthFailure::Invalid
            );
        }
        let only_other = Authenticator::new("standard_webhooks", &[other], None, 300).unwrap();
        let h = headers(&[
            ("webhook-id", MSG_ID.into()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", sig.clone()),
        ]);
        assert_eq!(
            only_other.verify(&h, PAYLOAD, Utc::now()).unwrap_err(),
            AuthFailure::Invalid
        );
        // The vector's own timestamp is years old: stale, whatever the signature.
        let h = headers(&[
            ("webhook-id", MSG_ID.into()),
            ("webhook-timestamp", TIMESTAMP.to_string()),
            ("webhook-signature", SIGNATURE.into()),
        ]);
        assert_eq!(
            auth.verify(&h, PAYLOAD, Utc::now()).unwrap_err(),
            AuthFailure::Stale
        );
        assert_eq!(
            auth.verify(&HeaderMap::new(), PAYLOAD, Utc::now())
                .unwrap_err(),
            AuthFailure::Missing
        );
    }

    fn workos_header(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t}, v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn workos_signatures_in_milliseconds_with_a_tolerance() {
        let auth = Authenticator::new("workos", &["sk_workos_secret".into()], None, 180).unwrap();
        let now = Utc::now();
        let body = br#"{"id":"event_01","event":"user.created"}"#;
        let good = workos_header("sk_workos_secret", now.timestamp_millis(), body);
        assert!(auth
            .verify(&headers(&[("workos-signature", good.clone())]), body, now)
            .is_ok());
        assert_eq!(
            auth.verify(&headers(&[("workos-signature", good)]), b"{}", now)
                .unwrap_err(),
            AuthFailure::Invalid
        );
        let old = workos_header("sk_workos_secret", now.timestamp_millis() - 181_000, body);
        assert_eq!(
            auth.verify(&headers(&[("workos-signature", old)]), body, now)
                .unwrap_err(),
            AuthFailure::Stale
        );
        let wrong = workos_header("another", now.timestamp_millis(), body);
        assert_eq!(
            auth.verify(&headers(&[("workos-signature", wrong)]), body, now)
                .unwrap_err(),
            AuthFailure::Invalid
        );
        assert_eq!(
            auth.verify(&headers(&[("workos-signature", "v1=zz".into())]), body, now)
                .unwrap_err(),
            AuthFailure::Malformed
        );
    }

    #[test]
    fn tokens_as_is_or_bearer_in_the_configured_header() {
        let auth = Authenticator::new("token", &["s3cret".into(), "n3w".into()], None, 0).unwrap();
        let now = Utc::now();
        for ok in ["s3cret", "Bearer s3cret", "n3w"] {
            assert!(
                auth.verify(&headers(&[("authorization", ok.into())]), b"", now)
                    .is_ok(),
                "{ok}"
            );
        }
        for bad in ["s3cre", "Bearer s3cretx", "Basic s3cret", ""] {
            assert_eq!(
                auth.verify(&headers(&[("authorization", bad.into())]), b"", now)
                    .unwrap_err(),
                AuthFailure::Invalid,
                "{bad}"
            );
        }
        let custom = Authenticator::new("token", &["x".into()], Some("x-okta-secret"), 0).unwrap();
        assert_eq!(
            custom
                .verify(&headers(&[("authorization", "x".into())]), b"", now)
                .unwrap_err(),
            AuthFailure::Missing
        );
        assert!(Authenticator::new("token", &[], None, 0).is_err());
        assert!(Authenticator::new("standard_webhooks", &["whsec_!!".into()], None, 0).is_err());
    }
}
