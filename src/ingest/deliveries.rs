//! A verified request becomes the messages to produce: one normalized `auth.login`
//! CloudEvent per login, keyed `provider:subject`, through the worker's own adapters (one
//! decoding, not two). No I/O here.

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::auth::Verified;
use crate::events::providers::{self, Provider, RawMessage, NATIVE_TYPE_PREFIX, PROVIDER_HEADER};
use crate::events::{redact, DecodeError, LoginEvent};

/// What an endpoint receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Native(Provider),
    /// CloudEvents over HTTP (structured, binary or batch), naming these providers (`None`:
    /// any).
    CloudEvents(Option<Vec<String>>),
}

/// One message to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub key: String,
    pub value: Vec<u8>,
    /// The provider it speaks for (metrics).
    pub provider: String,
    /// Whether it is a login (else an authenticated delivery no adapter could read, sent
    /// on for the worker to dead-letter with its precise reason).
    pub login: bool,
}

/// The outcome of turning a request into messages.
#[derive(Debug, Default)]
pub struct Split {
    pub messages: Vec<Outgoing>,
    /// Provider events that are not logins (acknowledged, not produced).
    pub dropped: usize,
    /// Event ids already in `messages`: a log stream may repeat a record within a request.
    seen: std::collections::HashSet<String>,
}

/// A request the endpoint refuses as a whole (nothing is produced).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The framing is wrong (a CloudEvents batch that is not an array, …): 400.
    BadRequest(String),
    /// An event names a provider this endpoint may not speak for: 403.
    Forbidden(String),
}

/// Request headers an adapter may read (ids, CloudEvents attributes); nothing else of the
/// request travels on.
fn adapter_headers(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            matches!(
                n,
                "svix-id"
                    | "webhook-id"
                    | "lambda-request-id"
                    | "x-amzn-requestid"
                    | "x-amz-request-id"
            )
        })
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub fn split(
    endpoint: &str,
    kind: &Kind,
    headers: &HeaderMap,
    body: &[u8],
    verified: &Verified,
    now: DateTime<Utc>,
    max_bytes: usize,
) -> Result<Split, Refusal> {
    match kind {
        Kind::Native(provider) => Ok(native(
            endpoint, *provider, headers, body, verified, now, max_bytes,
        )),
        Kind::CloudEvents(allowed) => cloudevents(
            endpoint,
            allowed.as_deref(),
            headers,
            body,
            verified,
            now,
            max_bytes,
        ),
    }
}

fn native(
    endpoint: &str,
    provider: Provider,
    headers: &HeaderMap,
    body: &[u8],
    verified: &Verified,
    now: DateTime<Utc>,
    max_bytes: usize,
) -> Split {
    let mut request_headers = adapter_headers(headers);
    request_headers.push((PROVIDER_HEADER.into(), provider.name().as_bytes().to_vec()));
    let timestamp = Some(verified.signed_at.unwrap_or(now));
    // Auth0 log streams default to JSON lines: each line is a delivery of its own. Each
    // document is parsed here once (to count its events and to wrap it); the adapter reads
    // the bytes.
    let documents: Vec<(&[u8], Option<Value>)> = match serde_json::from_slice::<Value>(body) {
        Ok(v) => vec![(body, Some(v))],
        Err(_) => body
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| (l, serde_json::from_slice(l).ok()))
            .collect(),
    };
    let mut out = Split::default();
    for (document, parsed) in documents {
        let count = parsed.as_ref().map_or(1, events_in);
        // A forwarder's Standard Webhooks id names the delivery for providers whose payload
        // has no id of its own: it rides as the envelope id (rule 2 of the adapters).
        let wrapped;
        let value: &[u8] = match (&verified.delivery_id, parsed) {
            (Some(id), Some(data @ Value::Object(_))) if provider != Provider::Clerk => {
                let time = verified.signed_at.unwrap_or(now);
                wrapped = wrap(provider.name(), provider.name(), id, time, data);
                &wrapped
            }
            _ => document,
        };
        let message = RawMessage {
            value: Some(value),
            headers: &request_headers,
            timestamp,
        };
        let decoded = providers::decode_login_message(message, max_bytes);
        push(&mut out, endpoint, provider.name(), decoded, count, || {
            undecodable(endpoint, provider.name(), document, verified, now)
        });
    }
    out
}

/// `authsync.native.<provider>` around a payload, lending it an id and a time; `source`
/// names who sent it (`authsync-ingest/<source>`).
fn wrap(provider: &str, source: &str, id: &str, time: DateTime<Utc>, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("authsync-ingest/{source}"),
        "type": format!("{NATIVE_TYPE_PREFIX}{provider}"),
        "time": time.to_rfc3339(),
        "data": data,
    }))
    .unwrap_or_default()
}

fn push(
    out: &mut Split,
    endpoint: &str,
    provider: &str,
    decoded: Result<Vec<LoginEvent>, DecodeError>,
    events_in_document: usize,
    kept: impl FnOnce() -> Outgoing,
) {
    match decoded {
        Ok(events) => {
            out.dropped += events_in_document.saturating_sub(events.len());
            for event in &events {
                if out.seen.insert(event.event_id.clone()) {
                    out.messages.push(login_message(event));
                }
            }
        }
        Err(e) => {
            tracing::warn!(endpoint, provider, error_class = e.class.as_str(), reason = %e.reason,
                "authenticated delivery no adapter can read: sent on to be dead-lettered");
            out.messages.push(kept());
        }
    }
}

/// How many provider events a document holds: an Okta hook's `data.events`, an Auth0 log
/// batch's entries, else one (for the count of events dropped as not logins).
fn events_in(document: &Value) -> usize {
    match document {
        Value::Array(items) => items.len(),
        v => v
            .pointer("/data/events")
            .and_then(Value::as_array)
            .map_or(1, Vec::len),
    }
}

fn login_message(event: &LoginEvent) -> Outgoing {
    Outgoing {
        key: event.partition_key(),
        value: serde_json::to_vec(&event.to_cloudevent()).unwrap_or_default(),
        provider: event.provider.clone(),
        login: true,
    }
}

/// An authenticated delivery the adapter refused: kept (secrets removed) so the worker
/// dead-letters it with the precise reason and an operator can redrive it after a fix.
fn undecodable(
    endpoint: &str,
    provider: &str,
    document: &[u8],
    verified: &Verified,
    now: DateTime<Utc>,
) -> Outgoing {
    let data = match serde_json::from_slice::<Value>(document) {
        Ok(mut v) => {
            redact::strip_json(&mut v);
            v
        }
        Err(_) => Value::String(String::from_utf8_lossy(document).into_owned()),
    };
    let id = verified
        .delivery_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Outgoing {
        key: format!("{provider}:undecodable:{id}"),
        value: wrap(provider, endpoint, &id, now, data),
        provider: provider.to_string(),
        login: false,
    }
}

/// The CloudEvents HTTP binding: `application/cloudevents-batch+json` (an array),
/// `application/cloudevents+json` (structured), or binary mode (`ce-*` headers, the body
/// is `data`).
fn cloudevents(
    endpoint: &str,
    allowed: Option<&[String]>,
    headers: &HeaderMap,
    body: &[u8],
    verified: &Verified,
    now: DateTime<Utc>,
    max_bytes: usize,
) -> Result<Split, Refusal> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let events: Vec<Value> = if content_type.starts_with("application/cloudevents-batch+json") {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(items)) => items,
            _ => {
                return Err(Refusal::BadRequest(
                    "a CloudEvents batch must be a JSON array".into(),
                ))
            }
        }
    } else if let Some(spec) = headers.get("ce-specversion") {
        let attr = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let data: Value = serde_json::from_slice(body)
            .map_err(|_| Refusal::BadRequest("binary-mode CloudEvent data must be JSON".into()))?;
        let mut event = serde_json::Map::new();
        event.insert(
            "specversion".into(),
            json!(spec.to_str().unwrap_or_default()),
        );
        for name in ["id", "source", "type", "time", "subject"] {
            if let Some(v) = attr(&format!("ce-{name}")) {
                event.insert(name.into(), json!(v));
            }
        }
        event.insert("datacontenttype".into(), json!("application/json"));
        event.insert("data".into(), data);
        vec![Value::Object(event)]
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v @ Value::Object(_)) => vec![v],
            _ => {
                return Err(Refusal::BadRequest(
                    "expected a structured CloudEvent (a JSON object), a batch, or binary mode"
                        .into(),
                ))
            }
        }
    };
    let mut out = Split::default();
    let request_headers = adapter_headers(headers);
    for event in events {
        let bytes = serde_json::to_vec(&event).unwrap_or_default();
        let message = RawMessage {
            value: Some(&bytes),
            headers: &request_headers,
            timestamp: Some(verified.signed_at.unwrap_or(now)),
        };
        let decoded = providers::decode_login_message(message, max_bytes);
        if let (Ok(logins), Some(allowed)) = (&decoded, allowed) {
            if let Some(e) = logins
                .iter()
                .find(|e| !allowed.iter().any(|a| a == &e.provider))
            {
                return Err(Refusal::Forbidden(format!(
                    "endpoint `{endpoint}` may not speak for provider `{}`",
                    e.provider
                )));
            }
        }
        let provider = event
            .get("type")
            .and_then(Value::as_str)
            .and_then(|t| t.strip_prefix(NATIVE_TYPE_PREFIX))
            .unwrap_or("cloudevents")
            .to_string();
        // A broken CloudEvent goes on as it came (secrets removed), so the worker names
        // the same error.
        push(&mut out, endpoint, &provider, decoded, 1, || Outgoing {
            key: format!(
                "{provider}:undecodable:{}",
                event.get("id").and_then(Value::as_str).unwrap_or("-")
            ),
            value: redact::strip_bytes(&bytes).unwrap_or_else(|| bytes.clone()),
            provider: provider.clone(),
            login: false,
        });
    }
    Ok(out)
}
