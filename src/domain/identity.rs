//! Identity depth, pure: group → role mapping, attribute sync, custom UPNs, and whether a
//! new identity may be linked to an existing user.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use regex::Regex;
use uuid::Uuid;

use super::ids;
use crate::config::{ConfigError, IdentityConfig, RoleRuleConfig};
use crate::events::LoginEvent;

/// A role grant: the role and its organization (`Uuid::nil()` = global).
pub type Grant = (String, Uuid);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Grant at first login only.
    Import,
    /// Grant and revoke on every login, so the set's roles match the IdP.
    Force,
    /// Grant, never revoke.
    Additive,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ClaimSource {
    Groups,
    ConnectionGroups,
    Attribute(String),
}

#[derive(Clone, Debug)]
enum Matcher {
    Equals(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Equals(v) => value == v,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Global,
    /// The user's own (provisioned) organization.
    Personal,
    Organization(Uuid),
}

#[derive(Clone, Debug)]
struct RoleRule {
    claim: ClaimSource,
    matcher: Matcher,
    role: String,
    scope: Scope,
}

impl RoleRule {
    fn grant(&self, user_id: Uuid) -> Grant {
        let org = match self.scope {
            Scope::Global => Uuid::nil(),
            Scope::Personal => ids::derived(user_id, "organization"),
            Scope::Organization(id) => id,
        };
        (self.role.clone(), org)
    }
}

#[derive(Clone, Debug)]
struct RoleSet {
    mode: SyncMode,
    /// Empty: every provider.
    providers: HashSet<String>,
    rules: Vec<RoleRule>,
}

/// The claims role rules look at, as they stand after the login was applied, and which of
/// them the login itself asserted.
#[derive(Clone, Copy, Debug)]
pub struct Claims<'a> {
    pub provider: &'a str,
    pub groups: &'a [String],
    pub connection_groups: &'a [String],
    pub attributes: &'a BTreeMap<String, String>,
    pub asserted: Asserted,
}

/// Which claim sources the login carried. `force` revokes only on what the IdP asserted:
/// a login that says nothing about groups is no evidence they were removed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Asserted {
    pub groups: bool,
    pub connection_groups: bool,
    pub attributes: bool,
}

impl Asserted {
    pub fn of(event: &LoginEvent) -> Self {
        Self {
            groups: event.groups.is_some(),
            connection_groups: event.connection.is_some(),
            attributes: event.attributes.is_some(),
        }
    }

    fn covers(&self, claim: &ClaimSource) -> bool {
        match claim {
            ClaimSource::Groups => self.groups,
            ClaimSource::ConnectionGroups => self.connection_groups,
            ClaimSource::Attribute(_) => self.attributes,
        }
    }
}

/// The compiled `[identity]` configuration.
#[derive(Clone, Debug)]
pub struct IdentityPolicy {
    pub link_verified_email: bool,
    untrusted_link_providers: HashSet<String>,
    pub attributes_authoritative: bool,
    role_sets: Vec<RoleSet>,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        // The default configuration always compiles.
        Self {
            link_verified_email: true,
            untrusted_link_providers: HashSet::new(),
            attributes_authoritative: false,
            role_sets: Vec::new(),
        }
    }
}

fn compile_rule(rule: &RoleRuleConfig, name: &str) -> Result<RoleRule, ConfigError> {
    let err = |problem: String| ConfigError::InvalidRule {
        rule: name.to_string(),
        problem,
    };
    let claim = match rule.claim.as_str() {
        "groups" => ClaimSource::Groups,
        "connection.groups" => ClaimSource::ConnectionGroups,
        other => match other.strip_prefix("attribute:") {
            Some(key) if !key.trim().is_empty() => ClaimSource::Attribute(key.trim().to_string()),
            _ => {
                return Err(err(format!(
                    "unknown claim `{other}` (expected `groups`, `connection.groups` or `attribute:<key>`)"
                )))
            }
        },
    };
    if rule.value.is_empty() {
        return Err(err("`value` must not be empty".into()));
    }
    let matcher = match rule.match_kind.as_str() {
        "equals" => Matcher::Equals(rule.value.clone()),
        "prefix" => Matcher::Prefix(rule.value.clone()),
        // Anchored: a rule for `admins` must not also match `not-admins-anymore`.
        "regex" => Matcher::Regex(
            Regex::new(&format!("^(?:{})$", rule.value))
                .map_err(|e| err(format!("bad regex `{}`: {e}", rule.value)))?,
        ),
        other => {
            return Err(err(format!(
                "unknown match `{other}` (expected `equals`, `prefix` or `regex`)"
            )))
        }
    };
    if rule.role.trim().is_empty() || rule.role.len() > 255 {
        return Err(err("`role` must be 1 to 255 bytes".into()));
    }
    let scope = match rule.organization.as_deref() {
        None => Scope::Global,
        Some("personal") => Scope::Personal,
        Some(id) => Scope::Organization(Uuid::parse_str(id).map_err(|e| {
            err(format!(
                "`organization` must be `personal` or an organization id: {e}"
            ))
        })?),
    };
    Ok(RoleRule {
        claim,
        matcher,
        role: rule.role.trim().to_string(),
        scope,
    })
}

impl IdentityPolicy {
    /// Compiles and checks the configuration; an error names the offending rule.
    pub fn compile(config: &IdentityConfig) -> Result<Self, ConfigError> {
        let attributes_authoritative = match config.attributes.as_str() {
            "merge" => false,
            "authoritative" => true,
            other => {
                return Err(ConfigError::Invalid {
                    field: "identity.attributes",
                    problem: format!("must be `merge` or `authoritative` (got `{other}`)"),
                })
            }
        };
        let mut role_sets = Vec::with_capacity(config.role_sets.len());
        for (set_index, set) in config.role_sets.iter().enumerate() {
            let set_name = if set.name.trim().is_empty() {
                format!("#{}", set_index + 1)
            } else {
                set.name.clone()
            };
            let mode = match set.mode.as_str() {
                "import" => SyncMode::Import,
                "force" => SyncMode::Force,
                "additive" => SyncMode::Additive,
                other => {
                    return Err(ConfigError::InvalidRule {
                        rule: set_name,
                        problem: format!(
                            "unknown mode `{other}` (expected `import`, `force` or `additive`)"
                        ),
                    })
                }
            };
            let mut rules = Vec::with_capacity(set.rules.len());
            for (i, rule) in set.rules.iter().enumerate() {
                let name = format!(
                    "{set_name}/{}",
                    rule.name.clone().unwrap_or_else(|| format!("#{}", i + 1))
                );
                rules.push(compile_rule(rule, &name)?);
            }
            role_sets.push(RoleSet {
                mode,
                providers: set.providers.iter().cloned().collect(),
                rules,
            });
        }
        Ok(Self {
            link_verified_email: config.link_verified_email,
            untrusted_link_providers: config.untrusted_link_providers.iter().cloned().collect(),
            attributes_authoritative,
            role_sets,
        })
    }

    pub fn has_role_rules(&self) -> bool {
        self.role_sets.iter().any(|s| !s.rules.is_empty())
    }

    /// The user's roles after a login: `current` with every set's grants added and, for
    /// `force` sets, the roles the set can grant but whose rule no longer matches a claim the
    /// login asserted removed. Roles no rule can grant (granted by hand or by a merge) are
    /// never touched.
    pub fn reconcile_roles(
        &self,
        user_id: Uuid,
        current: &BTreeSet<Grant>,
        claims: Claims<'_>,
        first_login: bool,
    ) -> BTreeSet<Grant> {
        let mut revoke = BTreeSet::new();
        let mut grant = BTreeSet::new();
        for set in &self.role_sets {
            if set.mode == SyncMode::Import && !first_login {
                continue;
            }
            if !set.providers.is_empty() && !set.providers.contains(claims.provider) {
                continue;
            }
            for rule in &set.rules {
                let matched = match &rule.claim {
                    ClaimSource::Groups => claims.groups.iter().any(|g| rule.matcher.matches(g)),
                    ClaimSource::ConnectionGroups => claims
                        .connection_groups
                        .iter()
                        .any(|g| rule.matcher.matches(g)),
                    ClaimSource::Attribute(key) => claims
                        .attributes
                        .get(key)
                        .is_some_and(|v| rule.matcher.matches(v)),
                };
                if matched {
                    grant.insert(rule.grant(user_id));
                } else if set.mode == SyncMode::Force && claims.asserted.covers(&rule.claim) {
                    revoke.insert(rule.grant(user_id));
                }
            }
        }
        // A grant by any rule beats a revocation by another.
        let mut roles: BTreeSet<Grant> = current
            .iter()
            .filter(|g| !revoke.contains(*g) || grant.contains(*g))
            .cloned()
            .collect();
        roles.extend(grant);
        roles
    }

    pub fn provider_trusted_for_linking(&self, provider: &str) -> bool {
        !self.untrusted_link_providers.contains(provider)
    }
}

/// Applies a login's attributes in place; `true` when anything changed. `authoritative`:
/// the login's set is the whole set (absent keys are removed).
pub fn apply_attributes(
    stored: &mut BTreeMap<String, String>,
    incoming: &[(String, String)],
    authoritative: bool,
) -> bool {
    let mut changed = false;
    if authoritative {
        let before = stored.len();
        stored.retain(|k, _| incoming.iter().any(|(ik, _)| ik == k));
        changed |= stored.len() != before;
    }
    for (key, value) in incoming {
        if stored.get(key) != Some(value) {
            stored.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    changed
}

/// The custom UPN a login sets: `(clientUpnKey, value)`, the value defaulting to the
/// login's email, else its subject.
pub fn custom_upn(event: &LoginEvent) -> Option<(String, String)> {
    let key = event.client_upn_key.as_ref()?;
    let value = event
        .custom_upn
        .clone()
        .or_else(|| event.email.clone())
        .unwrap_or_else(|| event.subject.clone());
    Some((key.clone(), value))
}

/// An existing user holding the login's email address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkCandidate {
    pub user_id: Uuid,
    /// The address is verified on the user's side.
    pub email_verified: bool,
    /// The user already has an identity of the login's provider (another subject).
    pub has_provider_identity: bool,
}

/// Why an unknown identity was not linked to an existing user with its email.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSkip {
    /// `identity.link_verified_email = false`.
    Disabled,
    /// The provider is in `identity.untrusted_link_providers`.
    ProviderNotTrusted,
    /// The login's email is not verified by its provider.
    EmailUnverified,
    /// The only users with this address never verified it (a pre-registered account
    /// must not capture a later verified login).
    TargetEmailUnverified,
    /// More than one user has the verified address: no way to pick safely.
    MultipleCandidates,
    /// The user already has an identity of this provider: a second one is not linked.
    ProviderAlreadyLinked,
}

impl LinkSkip {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkSkip::Disabled => "linking_disabled",
            LinkSkip::ProviderNotTrusted => "provider_not_trusted",
            LinkSkip::EmailUnverified => "email_unverified",
            LinkSkip::TargetEmailUnverified => "target_email_unverified",
            LinkSkip::MultipleCandidates => "multiple_candidates",
            LinkSkip::ProviderAlreadyLinked => "provider_already_linked",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkDecision {
    /// No other user has the address: an ordinary sign-up.
    NoCandidate,
    Link(Uuid),
    /// Sign up a separate user and say why it was not linked.
    Skip(LinkSkip),
}

/// Decides whether the first login of an unknown identity joins an existing user.
/// `candidates`: the active users holding the login's email (verified or not).
pub fn decide_link(
    policy: &IdentityPolicy,
    event: &LoginEvent,
    candidates: &[LinkCandidate],
) -> LinkDecision {
    if event.email.is_none() || candidates.is_empty() {
        return LinkDecision::NoCandidate;
    }
    if !policy.link_verified_email {
        return LinkDecision::Skip(LinkSkip::Disabled);
    }
    if !policy.provider_trusted_for_linking(&event.provider) {
        return LinkDecision::Skip(LinkSkip::ProviderNotTrusted);
    }
    if event.email_verified != Some(true) {
        return LinkDecision::Skip(LinkSkip::EmailUnverified);
    }
    let verified: Vec<&LinkCandidate> = candidates.iter().filter(|c| c.email_verified).collect();
    match verified.as_slice() {
        [] => LinkDecision::Skip(LinkSkip::TargetEmailUnverified),
        [one] if one.has_provider_identity => LinkDecision::Skip(LinkSkip::ProviderAlreadyLinked),
        [one] => LinkDecision::Link(one.user_id),
        _ => LinkDecision::Skip(LinkSkip::MultipleCandidates),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoleSetConfig;
    use chrono::Utc;

    fn rule(claim: &str, kind: &str, value: &str, role: &str) -> RoleRuleConfig {
        RoleRuleConfig {
            name: None,
            claim: claim.into(),
            match_kind: kind.into(),
            value: value.into(),
            role: role.into(),
            organization: None,
        }
    }

    fn policy(sets: Vec<(&str, Vec<RoleRuleConfig>)>) -> IdentityPolicy {
        IdentityPolicy::compile(&IdentityConfig {
            role_sets: sets
                .into_iter()
                .map(|(mode, rules)| RoleSetConfig {
                    name: mode.into(),
                    mode: mode.into(),
                    providers: Vec::new(),
                    rules,
                })
                .collect(),
            ..IdentityConfig::default()
        })
        .unwrap()
    }

    fn roles(names: &[&str]) -> BTreeSet<Grant> {
        names.iter().map(|r| (r.to_string(), Uuid::nil())).collect()
    }

    const ALL: Asserted = Asserted {
        groups: true,
        connection_groups: true,
        attributes: true,
    };

    fn claims<'a>(groups: &'a [String], attrs: &'a BTreeMap<String, String>) -> Claims<'a> {
        Claims {
            provider: "p",
            groups,
            connection_groups: &[],
            attributes: attrs,
            asserted: ALL,
        }
    }

    #[test]
    fn force_grants_and_revokes_only_its_own_roles() {
        let p = policy(vec![(
            "force",
            vec![
                rule("groups", "equals", "admins", "admin"),
                rule("groups", "prefix", "eng-", "engineer"),
            ],
        )]);
        let attrs = BTreeMap::new();
        let user = Uuid::new_v4();
        let groups = vec!["eng-backend".to_string()];
        let after = p.reconcile_roles(
            user,
            &roles(&["admin", "hand-granted"]),
            claims(&groups, &attrs),
            false,
        );
        assert_eq!(after, roles(&["engineer", "hand-granted"]));
        // A login that asserts no groups revokes nothing.
        let silent = Claims {
            asserted: Asserted::default(),
            ..claims(&[], &attrs)
        };
        assert_eq!(
            p.reconcile_roles(user, &roles(&["admin"]), silent, false),
            roles(&["admin"])
        );
    }

    #[test]
    fn a_set_scoped_to_providers_ignores_other_providers() {
        let mut config = IdentityConfig::default();
        config.role_sets.push(RoleSetConfig {
            name: "okta".into(),
            mode: "force".into(),
            providers: vec!["okta".into()],
            rules: vec![rule("groups", "equals", "admins", "admin")],
        });
        let p = IdentityPolicy::compile(&config).unwrap();
        let attrs = BTreeMap::new();
        let user = Uuid::new_v4();
        let other = Claims {
            provider: "github",
            ..claims(&[], &attrs)
        };
        assert_eq!(
            p.reconcile_roles(user, &roles(&["admin"]), other, false),
            roles(&["admin"])
        );
    }

    #[test]
    fn import_only_at_first_login_and_additive_never_revokes() {
        let p = policy(vec![
            ("import", vec![rule("groups", "equals", "staff", "staff")]),
            (
                "additive",
                vec![rule("attribute:dept", "regex", "sales|support", "crm")],
            ),
        ]);
        let user = Uuid::new_v4();
        let groups = vec!["staff".to_string()];
        let mut attrs = BTreeMap::new();
        attrs.insert("dept".to_string(), "sales".to_string());
        let first = p.reconcile_roles(user, &BTreeSet::new(), claims(&groups, &attrs), true);
        assert_eq!(first, roles(&["crm", "staff"]));
        let later = p.reconcile_roles(user, &BTreeSet::new(), claims(&groups, &attrs), false);
        assert_eq!(later, roles(&["crm"]));
        attrs.insert("dept".to_string(), "salesforce".to_string());
        let kept = p.reconcile_roles(user, &first, claims(&[], &attrs), false);
        assert_eq!(kept, first, "additive and import never revoke");
    }

    #[test]
    fn personal_scope_is_the_users_own_organization() {
        let mut r = rule("connection.groups", "equals", "g", "owner");
        r.organization = Some("personal".into());
        let p = policy(vec![("additive", vec![r])]);
        let user = Uuid::new_v4();
        let attrs = BTreeMap::new();
        let cg = vec!["g".to_string()];
        let after = p.reconcile_roles(
            user,
            &BTreeSet::new(),
            Claims {
                provider: "p",
                groups: &[],
                connection_groups: &cg,
                attributes: &attrs,
                asserted: ALL,
            },
            false,
        );
        let expected: BTreeSet<Grant> =
            [("owner".to_string(), ids::derived(user, "organization"))].into();
        assert_eq!(after, expected);
    }

    #[test]
    fn invalid_rules_are_named() {
        let bad = |sets: Vec<RoleSetConfig>| {
            IdentityPolicy::compile(&IdentityConfig {
                role_sets: sets,
                ..IdentityConfig::default()
            })
            .unwrap_err()
            .to_string()
        };
        let set = |mode: &str, rules| RoleSetConfig {
            name: "idp".into(),
            mode: mode.into(),
            providers: Vec::new(),
            rules,
        };
        let e = bad(vec![set("force", vec![rule("groups", "regex", "(", "r")])]);
        assert!(e.contains("idp/#1") && e.contains("bad regex"), "{e}");
        let e = bad(vec![set("sometimes", vec![])]);
        assert!(e.contains("idp") && e.contains("unknown mode"), "{e}");
        let mut named = rule("roles", "equals", "x", "r");
        named.name = Some("admins".into());
        let e = bad(vec![set("force", vec![named])]);
        assert!(
            e.contains("idp/admins") && e.contains("unknown claim"),
            "{e}"
        );
        let e = bad(vec![set("force", vec![rule("groups", "like", "x", "r")])]);
        assert!(e.contains("unknown match"), "{e}");
    }

    #[test]
    fn attributes_merge_or_replace() {
        let mut stored: BTreeMap<String, String> =
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into();
        assert!(!apply_attributes(
            &mut stored,
            &[("a".into(), "1".into())],
            false
        ));
        assert!(apply_attributes(
            &mut stored,
            &[("a".into(), "9".into())],
            false
        ));
        assert_eq!(stored.get("b").map(String::as_str), Some("2"));
        assert!(apply_attributes(
            &mut stored,
            &[("a".into(), "9".into())],
            true
        ));
        assert_eq!(stored.len(), 1);
    }

    fn login(email: Option<&str>, verified: Option<bool>, provider: &str) -> LoginEvent {
        let mut e = LoginEvent::new("e", "s", Utc::now(), provider, "sub");
        e.email = email.map(str::to_string);
        e.email_verified = verified;
        e
    }

    fn candidate(verified: bool, has_provider: bool) -> LinkCandidate {
        LinkCandidate {
            user_id: Uuid::new_v4(),
            email_verified: verified,
            has_provider_identity: has_provider,
        }
    }

    #[test]
    fn links_only_one_verified_candidate_on_a_verified_email() {
        let p = IdentityPolicy::default();
        let ev = login(Some("a@x.io"), Some(true), "google");
        let c = candidate(true, false);
        assert_eq!(
            decide_link(&p, &ev, std::slice::from_ref(&c)),
            LinkDecision::Link(c.user_id)
        );
        assert_eq!(decide_link(&p, &ev, &[]), LinkDecision::NoCandidate);
        let skip = |ev: &LoginEvent, cs: &[LinkCandidate], p: &IdentityPolicy| match decide_link(
            p, ev, cs,
        ) {
            LinkDecision::Skip(s) => s,
            other => panic!("expected a skip, got {other:?}"),
        };
        assert_eq!(
            skip(
                &login(Some("a@x.io"), Some(false), "google"),
                std::slice::from_ref(&c),
                &p
            ),
            LinkSkip::EmailUnverified
        );
        assert_eq!(
            skip(
                &login(Some("a@x.io"), None, "google"),
                std::slice::from_ref(&c),
                &p
            ),
            LinkSkip::EmailUnverified
        );
        assert_eq!(
            skip(&ev, &[candidate(false, false)], &p),
            LinkSkip::TargetEmailUnverified
        );
        assert_eq!(
            skip(&ev, &[c.clone(), candidate(true, false)], &p),
            LinkSkip::MultipleCandidates
        );
        assert_eq!(
            skip(&ev, &[candidate(true, true)], &p),
            LinkSkip::ProviderAlreadyLinked
        );
        let untrusted = IdentityPolicy::compile(&IdentityConfig {
            untrusted_link_providers: vec!["google".into()],
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(
            skip(&ev, std::slice::from_ref(&c), &untrusted),
            LinkSkip::ProviderNotTrusted
        );
        let off = IdentityPolicy::compile(&IdentityConfig {
            link_verified_email: false,
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(skip(&ev, &[c], &off), LinkSkip::Disabled);
    }

    #[test]
    fn custom_upn_defaults_to_email_then_subject() {
        let mut ev = login(Some("a@x.io"), Some(true), "p");
        assert_eq!(custom_upn(&ev), None);
        ev.client_upn_key = Some("crm".into());
        assert_eq!(custom_upn(&ev), Some(("crm".into(), "a@x.io".into())));
        ev.custom_upn = Some("ada@corp".into());
        assert_eq!(custom_upn(&ev), Some(("crm".into(), "ada@corp".into())));
        ev.email = None;
        ev.custom_upn = None;
        assert_eq!(custom_upn(&ev), Some(("crm".into(), "sub".into())));
    }
}
