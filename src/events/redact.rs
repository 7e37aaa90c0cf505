//! Secrets never leave the edge: the parts of provider payloads and headers that carry
//! credentials are removed before a message is produced (`authsync ingest`) and, for what
//! reaches the login topic another way, before the worker stores or dead-letters it.
//!
//! Removed wherever they appear in a JSON document, by key (case, `_` and `-` ignored):
//! Auth0 Actions' `secrets` and `request.body`; Firebase's `credential` (OAuth id, access
//! and refresh tokens), `passwordHash` and `passwordSalt`; Clerk's `email.created` /
//! `sms.created` bodies and one-time codes; any password, token, client secret,
//! `authorization` or `cookie` entry (e.g. request headers copied into a log event).

use serde_json::Value;

/// Keys removed at any depth, normalized (lower case, without `_` and `-`).
const SECRET_KEYS: &[&str] = &[
    "secrets",
    "secret",
    "clientsecret",
    "credentials",
    "password",
    "passwordhash",
    "passwordsalt",
    "accesstoken",
    "refreshtoken",
    "idtoken",
    "oauthaccesstoken",
    "oauthidtoken",
    "oauthrefreshtoken",
    "oauthtokensecret",
    "sessiontoken",
    "token",
    "authorization",
    "proxyauthorization",
    "cookie",
    "cookies",
    "setcookie",
    "apikey",
    "xapikey",
    "otp",
    "otpcode",
    "code",
    // Request and email bodies: Auth0 `request.body` holds form posts (passwords);
    // Clerk `email.created` holds the message with its sign-in link.
    "body",
    "bodyplain",
];

fn normalized(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&normalized(key).as_str())
}

/// Headers never forwarded or stored: credentials of the webhook request itself.
pub fn is_secret_header(name: &str) -> bool {
    let name = normalized(name);
    SECRET_KEYS.contains(&name.as_str())
        || ["secret", "token", "password", "apikey", "cookie"]
            .iter()
            .any(|w| name.contains(w))
            && !name.contains("signature")
            && name != "authsyncsource"
}

/// Removes secret entries from `value` in place; returns how many it removed.
pub fn strip_json(value: &mut Value) -> usize {
    match value {
        Value::Object(map) => {
            let before = map.len();
            map.retain(|k, _| !is_secret_key(k));
            let mut removed = before - map.len();
            // Firebase's `credential` holds the OAuth tokens; only how the user signed in
            // (read by the adapter) stays.
            for (k, v) in map.iter_mut() {
                if normalized(k) == "credential" {
                    match v {
                        Value::Object(c) => {
                            let n = c.len();
                            c.retain(|k, _| {
                                matches!(normalized(k).as_str(), "providerid" | "signinmethod")
                            });
                            removed += n - c.len();
                        }
                        Value::Null => {}
                        other => {
                            *other = Value::Null;
                            removed += 1;
                        }
                    }
                }
            }
            for v in map.values_mut() {
                removed += strip_json(v);
            }
            removed
        }
        Value::Array(items) => items.iter_mut().map(strip_json).sum(),
        _ => 0,
    }
}

/// The bytes of a JSON document (or of JSON lines, as Auth0 log streams send) with its
/// secrets removed; `None` when there was nothing to remove or it is not JSON (the bytes
/// are then kept as they are, so a signed message stays byte-identical).
pub fn strip_bytes(bytes: &[u8]) -> Option<Vec<u8>> {
    if let Ok(mut value) = serde_json::from_slice::<Value>(bytes) {
        return (strip_json(&mut value) > 0).then(|| serde_json::to_vec(&value).ok())?;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let mut removed = 0;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut value: Value = serde_json::from_str(line).ok()?;
        removed += strip_json(&mut value);
        lines.push(serde_json::to_string(&value).ok()?);
    }
    (removed > 0).then(|| lines.join("\n").into_bytes())
}

/// Header pairs without the secret ones.
pub fn strip_headers(headers: &mut Vec<(String, Vec<u8>)>) -> usize {
    let before = headers.len();
    headers.retain(|(k, _)| !is_secret_header(k));
    before - headers.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn auth0_action_secrets_and_request_body_are_removed() {
        let mut event = json!({"user": {"user_id": "auth0|1", "email": "a@example.com"},
            "secrets": {"API_KEY": "sk_live_1"},
            "request": {"ip": "192.0.2.1", "body": {"password": "hunter2"}},
            "transaction": {"id": "t"}});
        assert_eq!(strip_json(&mut event), 2);
        assert!(event.get("secrets").is_none());
        assert!(event["request"].get("body").is_none());
        assert_eq!(event["request"]["ip"], "192.0.2.1");
        assert_eq!(event["user"]["email"], "a@example.com");
    }

    #[test]
    fn firebase_credentials_and_password_hashes_are_removed() {
        let text = include_str!("../../tests/fixtures/firebase/before-sign-in.json");
        let mut value: Value = serde_json::from_str(text).unwrap();
        value["credential"] = json!({"idToken": "eyJ…", "accessToken": "ya29…",
            "refreshToken": "1//0g", "secret": "s", "signInMethod": "google.com"});
        value["data"]["passwordHash"] = json!("aGFzaA==");
        value["data"]["passwordSalt"] = json!("c2FsdA==");
        let bytes = strip_bytes(&serde_json::to_vec(&value).unwrap()).unwrap();
        let out = String::from_utf8(bytes).unwrap();
        for secret in ["eyJ", "ya29", "1//0g", "aGFzaA", "c2FsdA", "\"s\""] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(out.contains("google.com"), "how the user signed in stays");
        assert!(out.contains("Hb7sLq1ZwX3kR9mT2vN5pC8yD4fG"));
    }

    #[test]
    fn clean_documents_are_left_byte_identical_and_json_lines_are_stripped_per_line() {
        let clean = br#"{ "id" : "x",  "user": {"email": "a@example.com"} }"#;
        assert_eq!(strip_bytes(clean), None);
        assert_eq!(strip_bytes(b"not json"), None);
        let lines = b"{\"log_id\":\"1\",\"details\":{\"headers\":{\"Authorization\":\"Bearer x\"}}}\n{\"log_id\":\"2\"}\n";
        let out = String::from_utf8(strip_bytes(lines).unwrap()).unwrap();
        assert!(!out.contains("Bearer"));
        assert_eq!(out.lines().count(), 2);
    }

    #[test]
    fn secret_headers_are_named_and_signatures_are_not() {
        for h in [
            "Authorization",
            "cookie",
            "X-Api-Key",
            "x-auth-token",
            "Proxy-Authorization",
            "x-webhook-secret",
        ] {
            assert!(is_secret_header(h), "{h}");
        }
        for h in [
            "svix-signature",
            "webhook-signature",
            "authsync-source",
            "authsync-source-signature",
            "authsync-provider",
            "svix-id",
            "content-type",
        ] {
            assert!(!is_secret_header(h), "{h}");
        }
    }
}
