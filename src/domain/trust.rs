//! Which producers of the login topic the worker believes: a pure decision over the
//! verified source of a message (see `events::source`) and the provider its login names.

use std::collections::{HashMap, HashSet};

use crate::config::{invalid, ConfigError, TrustConfig};
use crate::events::source::SourceCheck;
use crate::events::LoginEvent;

/// What happens to logins no trusted source signed (`trust.unsigned`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsigned {
    Refuse,
    Restricted,
    Trusted,
}

/// What one signed source may say.
#[derive(Clone, Debug)]
struct Grant {
    /// `None`: any provider.
    providers: Option<HashSet<String>>,
    email_verified: bool,
    groups: bool,
}

#[derive(Clone, Debug)]
pub struct SourcePolicy {
    unsigned: Unsigned,
    sources: HashMap<String, Grant>,
}

/// The decision for one login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Applied as it says.
    Full,
    /// Applied with the claims it may not make removed.
    Restricted { email_verified: bool, groups: bool },
    /// Dead-lettered as `untrusted_source`, with this reason.
    Refused(String),
}

impl Default for SourcePolicy {
    fn default() -> Self {
        Self {
            unsigned: Unsigned::Refuse,
            sources: HashMap::new(),
        }
    }
}

impl SourcePolicy {
    pub fn compile(config: &TrustConfig) -> Result<Self, ConfigError> {
        let unsigned = match config.unsigned.trim().to_ascii_lowercase().as_str() {
            "refuse" => Unsigned::Refuse,
            "restricted" => Unsigned::Restricted,
            "trusted" => Unsigned::Trusted,
            other => {
                return Err(invalid(
                    "trust.unsigned",
                    format!("is `{other}`; expected refuse, restricted or trusted"),
                ))
            }
        };
        let mut sources = HashMap::new();
        for (name, source) in &config.sources {
            if source.providers.is_empty() {
                return Err(invalid(
                    "trust.sources",
                    format!("source `{name}` lists no providers (use [\"*\"] for any)"),
                ));
            }
            let providers = if source.providers.iter().any(|p| p.trim() == "*") {
                None
            } else {
                Some(
                    source
                        .providers
                        .iter()
                        .map(|p| p.trim().to_ascii_lowercase())
                        .collect(),
                )
            };
            sources.insert(
                name.clone(),
                Grant {
                    providers,
                    email_verified: source.email_verified,
                    groups: source.groups,
                },
            );
        }
        Ok(Self { unsigned, sources })
    }

    /// A policy that believes every producer (tests of the steps themselves).
    pub fn trusting() -> Self {
        Self {
            unsigned: Unsigned::Trusted,
            sources: HashMap::new(),
        }
    }

    pub fn unsigned(&self) -> Unsigned {
        self.unsigned
    }

    /// What `trust.unsigned` says; the reason is only written for a refusal (this runs for
    /// every login, and most deployments trust or refuse without looking at it).
    fn for_unsigned(&self, why: impl FnOnce() -> String) -> Admission {
        match self.unsigned {
            Unsigned::Trusted => Admission::Full,
            Unsigned::Restricted => Admission::Restricted {
                email_verified: false,
                groups: false,
            },
            Unsigned::Refuse => Admission::Refused(format!(
                "{} and trust.unsigned is `refuse`: send it through `authsync ingest`, or list its source under trust.sources",
                why()
            )),
        }
    }

    /// Decides for a login of `provider` whose message's signature check said `check`.
    pub fn admit(&self, check: &SourceCheck, provider: &str) -> Admission {
        match check {
            // A forged or edited signature is never benign, whatever the unsigned policy.
            SourceCheck::Invalid(reason) => Admission::Refused(reason.clone()),
            SourceCheck::Unsigned => {
                self.for_unsigned(|| "the message carries no source signature".into())
            }
            SourceCheck::Verified(source) => match self.sources.get(source) {
                None => self
                    .for_unsigned(|| format!("signed source `{source}` is not in trust.sources")),
                Some(grant) => {
                    if grant
                        .providers
                        .as_ref()
                        .is_some_and(|p| !p.contains(provider))
                    {
                        return Admission::Refused(format!(
                            "source `{source}` may not speak for provider `{provider}` (trust.sources.{source}.providers)"
                        ));
                    }
                    if grant.email_verified && grant.groups {
                        Admission::Full
                    } else {
                        Admission::Restricted {
                            email_verified: grant.email_verified,
                            groups: grant.groups,
                        }
                    }
                }
            },
        }
    }
}

/// Removes the claims a restricted login may not make: without `email_verified`, the
/// address is unverified as far as authsync is concerned (it links nothing and keeps the
/// stored verification unless the address changes); without `groups`, its groups,
/// connection groups and attributes (the inputs of role rules) are dropped.
pub fn restrict(event: &mut LoginEvent, email_verified: bool, groups: bool) {
    if !email_verified {
        event.email_verified = None;
    }
    if !groups {
        event.groups = None;
        event.attributes = None;
        if let Some(c) = event.connection.as_mut() {
            c.groups = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrustedSourceConfig;

    fn policy(unsigned: &str) -> SourcePolicy {
        let mut config = TrustConfig {
            unsigned: unsigned.into(),
            ..TrustConfig::default()
        };
        config.sources.insert(
            "clerk-prod".into(),
            TrustedSourceConfig {
                providers: vec!["Clerk".into()],
                email_verified: true,
                groups: true,
            },
        );
        config.sources.insert(
            "kc-fwd".into(),
            TrustedSourceConfig {
                providers: vec!["keycloak".into()],
                email_verified: true,
                groups: false,
            },
        );
        SourcePolicy::compile(&config).unwrap()
    }

    fn verified(s: &str) -> SourceCheck {
        SourceCheck::Verified(s.into())
    }

    #[test]
    fn a_listed_source_speaks_only_for_its_providers() {
        let p = policy("refuse");
        assert_eq!(p.admit(&verified("clerk-prod"), "clerk"), Admission::Full);
        assert!(
            matches!(p.admit(&verified("clerk-prod"), "okta"), Admission::Refused(r) if r.contains("okta"))
        );
        assert_eq!(
            p.admit(&verified("kc-fwd"), "keycloak"),
            Admission::Restricted {
                email_verified: true,
                groups: false
            }
        );
    }

    #[test]
    fn unsigned_and_unlisted_follow_the_unsigned_policy_and_forgeries_are_always_refused() {
        for (mode, expected) in [
            ("refuse", None),
            (
                "restricted",
                Some(Admission::Restricted {
                    email_verified: false,
                    groups: false,
                }),
            ),
            ("trusted", Some(Admission::Full)),
        ] {
            let p = policy(mode);
            for check in [SourceCheck::Unsigned, verified("someone-else")] {
                let got = p.admit(&check, "clerk");
                match &expected {
                    None => assert!(matches!(got, Admission::Refused(_)), "{mode}"),
                    Some(e) => assert_eq!(&got, e, "{mode}"),
                }
            }
            assert!(matches!(
                p.admit(&SourceCheck::Invalid("forged".into()), "clerk"),
                Admission::Refused(_)
            ));
        }
        assert_eq!(SourcePolicy::default().unsigned(), Unsigned::Refuse);
        assert!(SourcePolicy::compile(&TrustConfig {
            unsigned: "maybe".into(),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn restriction_removes_verification_and_role_inputs() {
        let mut e = LoginEvent::new("e", "s", chrono::Utc::now(), "clerk", "u");
        e.email = Some("a@example.com".into());
        e.email_verified = Some(true);
        e.groups = Some(vec!["admins".into()]);
        e.attributes = Some(vec![("dept".into(), "it".into())]);
        e.connection = Some(crate::events::login::Connection {
            connection_id: Some("c".into()),
            kind: None,
            groups: Some(vec!["g".into()]),
        });
        restrict(&mut e, false, false);
        assert_eq!(e.email_verified, None);
        assert_eq!(e.groups, None);
        assert_eq!(e.attributes, None);
        assert_eq!(e.connection.as_ref().unwrap().groups, None);
        assert_eq!(e.email.as_deref(), Some("a@example.com"));
    }
}
