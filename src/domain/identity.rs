//! Identity depth, pure: link trust per connection, whether a new identity may be linked
//! to an existing user, group → role mapping with provenance, attribute sync, custom UPNs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use regex::Regex;
use uuid::Uuid;

use super::ids;
use crate::config::{ConfigError, IdentityConfig, RoleRuleConfig};
use crate::events::login::{is_linkable_email, ConnectionKind};
use crate::events::LoginEvent;

/// A role grant: the role and its organization (`Uuid::nil()` = global).
pub type Grant = (String, Uuid);

/// A user's roles, each with who holds it: `role_set:<set>:<provider>:<subject>` (a rule
/// set, through that identity's claims) or `""` (by hand, or before provenance was
/// recorded). A role is held while any grantor holds it; a `force` set revokes only its own
/// grant through the same identity.
pub type Roles = BTreeMap<Grant, BTreeSet<String>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Grant at the identity's first login only.
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

#[derive(Clone, Debug)]
struct RoleSet {
    mode: SyncMode,
    /// `role_set:<name>`: the provenance of its grants (plus `:<provider>:<subject>`).
    granted_by: String,
    /// Empty: every provider.
    providers: HashSet<String>,
    /// Empty: every connection. `(provider, connection id)`.
    connections: ConnectionMap<()>,
    allow_global: bool,
    rules: Vec<RoleRule>,
}

/// The connection a login or an identity signs in through, as far as trust is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionRef<'a> {
    pub id: Option<&'a str>,
    pub kind: Option<ConnectionKind>,
}

impl<'a> ConnectionRef<'a> {
    pub fn of_event(event: &'a LoginEvent) -> Option<Self> {
        event.connection.as_ref().map(|c| ConnectionRef {
            id: c.connection_id.as_deref(),
            kind: c.kind,
        })
    }

    /// A stored identity's connection; `None` when it never reported one.
    pub fn stored(id: Option<&'a str>, kind: Option<ConnectionKind>) -> Option<Self> {
        (id.is_some() || kind.is_some()).then_some(ConnectionRef { id, kind })
    }
}

/// The claims role rules look at, as they stand after the login was applied, and which of
/// them the identity has ever asserted (a `force` set revokes only on an asserted claim:
/// "no groups given" is no evidence the groups were removed).
#[derive(Clone, Copy, Debug)]
pub struct Claims<'a> {
    pub provider: &'a str,
    pub subject: &'a str,
    pub connection: Option<ConnectionRef<'a>>,
    pub groups: &'a [String],
    pub connection_groups: &'a [String],
    pub attributes: &'a BTreeMap<String, String>,
    pub asserted: Asserted,
}

/// Which claim sources are asserted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Asserted {
    pub groups: bool,
    pub connection_groups: bool,
    pub attributes: bool,
}

impl Asserted {
    fn covers(&self, claim: &ClaimSource) -> bool {
        match claim {
            ClaimSource::Groups => self.groups,
            ClaimSource::ConnectionGroups => self.connection_groups,
            ClaimSource::Attribute(_) => self.attributes,
        }
    }
}

/// provider → connection id → value: looked up on every login with role rules, without
/// building a key.
type ConnectionMap<T> = HashMap<String, HashMap<String, T>>;

fn lookup<'m, T>(map: &'m ConnectionMap<T>, provider: &str, id: &str) -> Option<&'m T> {
    map.get(provider)?.get(id)
}

/// `[[identity.connections]]`, compiled.
#[derive(Clone, Debug, Default)]
struct ConnectionPolicy {
    kind: Option<ConnectionKind>,
    link: Option<bool>,
    organization: Option<Uuid>,
}

/// The compiled `[identity]` configuration.
#[derive(Clone, Debug)]
pub struct IdentityPolicy {
    pub link_verified_email: bool,
    untrusted_link_providers: HashSet<String>,
    pub attributes_authoritative: bool,
    role_sets: Vec<RoleSet>,
    connections: ConnectionMap<ConnectionPolicy>,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        // The default configuration always compiles.
        Self {
            link_verified_email: true,
            untrusted_link_providers: HashSet::new(),
            attributes_authoritative: false,
            role_sets: Vec::new(),
            connections: HashMap::new(),
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

fn provider_key(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

fn parse_connection_key(value: &str, set: &str) -> Result<(String, String), ConfigError> {
    match value.split_once(':') {
        Some((p, c)) if !p.trim().is_empty() && !c.trim().is_empty() => {
            Ok((provider_key(p), c.trim().to_string()))
        }
        _ => Err(ConfigError::InvalidRule {
            rule: set.to_string(),
            problem: format!("connection `{value}` must be `provider:connection`"),
        }),
    }
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
        let mut names = HashSet::new();
        for (set_index, set) in config.role_sets.iter().enumerate() {
            let set_name = if set.name.trim().is_empty() {
                format!("#{}", set_index + 1)
            } else {
                set.name.trim().to_string()
            };
            // The name is the grants' provenance: two sets must not share it.
            if !names.insert(set_name.clone()) {
                return Err(ConfigError::InvalidRule {
                    rule: set_name,
                    problem: "two role sets have this name; names record who granted a role".into(),
                });
            }
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
            let mut connections: ConnectionMap<()> = HashMap::new();
            for c in &set.connections {
                let (provider, id) = parse_connection_key(c, &set_name)?;
                connections.entry(provider).or_default().insert(id, ());
            }
            role_sets.push(RoleSet {
                mode,
                granted_by: format!("role_set:{set_name}"),
                providers: set.providers.iter().map(|p| provider_key(p)).collect(),
                connections,
                allow_global: set.allow_global,
                rules,
            });
        }
        let mut connections: ConnectionMap<ConnectionPolicy> = HashMap::new();
        for c in &config.connections {
            let name = format!("{}:{}", c.provider, c.connection);
            let key = (provider_key(&c.provider), c.connection.trim().to_string());
            if key.0.is_empty() || key.1.is_empty() {
                return Err(ConfigError::InvalidConnection {
                    connection: name,
                    problem: "`provider` and `connection` must not be empty".into(),
                });
            }
            let kind = match c.kind.as_deref() {
                None => None,
                Some(k) => Some(ConnectionKind::parse(k).ok_or_else(|| {
                    ConfigError::InvalidConnection {
                        connection: name.clone(),
                        problem: format!(
                            "unknown kind `{k}` (expected database, social, enterprise or passwordless)"
                        ),
                    }
                })?),
            };
            let organization = match c.organization.as_deref() {
                None => None,
                Some(id) => {
                    Some(
                        Uuid::parse_str(id).map_err(|e| ConfigError::InvalidConnection {
                            connection: name.clone(),
                            problem: format!("`organization` must be an organization id: {e}"),
                        })?,
                    )
                }
            };
            connections.entry(key.0).or_default().insert(
                key.1,
                ConnectionPolicy {
                    kind,
                    link: c.link,
                    organization,
                },
            );
        }
        Ok(Self {
            link_verified_email: config.link_verified_email,
            untrusted_link_providers: config
                .untrusted_link_providers
                .iter()
                .map(|p| provider_key(p))
                .collect(),
            attributes_authoritative,
            role_sets,
            connections,
        })
    }

    pub fn has_role_rules(&self) -> bool {
        self.role_sets.iter().any(|s| !s.rules.is_empty())
    }

    fn connection_policy(
        &self,
        provider: &str,
        connection: Option<ConnectionRef<'_>>,
    ) -> Option<&ConnectionPolicy> {
        lookup(&self.connections, provider, connection?.id?)
    }

    /// The connection's kind: as configured, else as reported. `None` with a connection
    /// present means unknown, which every decision treats as enterprise.
    fn effective_kind(
        &self,
        provider: &str,
        connection: Option<ConnectionRef<'_>>,
    ) -> Option<ConnectionKind> {
        self.connection_policy(provider, connection)
            .and_then(|c| c.kind)
            .or(connection.and_then(|c| c.kind))
    }

    /// Is this a customer's connection (its claims are the customer's IdP's word)?
    pub fn is_customer_connection(
        &self,
        provider: &str,
        connection: Option<ConnectionRef<'_>>,
    ) -> bool {
        connection.is_some()
            && !matches!(
                self.effective_kind(provider, connection),
                Some(
                    ConnectionKind::Database
                        | ConnectionKind::Social
                        | ConnectionKind::Passwordless
                )
            )
    }

    /// May an address this (provider, connection) asserts verified link accounts?
    /// The provider's own sign-in (no connection), database, social and passwordless
    /// connections: yes, unless the provider is listed untrusted. Enterprise and unknown
    /// connections: only when `[[identity.connections]]` says `link = true`.
    pub fn link_trust(
        &self,
        provider: &str,
        connection: Option<ConnectionRef<'_>>,
    ) -> Result<(), LinkSkip> {
        if self.untrusted_link_providers.contains(provider) {
            return Err(LinkSkip::ProviderNotTrusted);
        }
        if let Some(link) = self
            .connection_policy(provider, connection)
            .and_then(|c| c.link)
        {
            return if link {
                Ok(())
            } else {
                Err(LinkSkip::ConnectionNotTrusted)
            };
        }
        if self.is_customer_connection(provider, connection) {
            Err(LinkSkip::ConnectionNotTrusted)
        } else {
            Ok(())
        }
    }

    /// The user's roles after a login: `current` with every set's grants added and, for
    /// `force` sets, the roles *that set granted through this identity* whose rule no longer
    /// matches an asserted claim removed (so two identities of one user never take turns
    /// granting and revoking the same role). Roles granted by hand, by a merge or by another set are never touched.
    /// `claims` are the identity's stored claims (each the newest its IdP asserted), so an
    /// event older than some of them still applies what they say, revocations included.
    pub fn reconcile_roles(
        &self,
        user_id: Uuid,
        current: &Roles,
        claims: Claims<'_>,
        first_login: bool,
    ) -> Roles {
        let mut revoke: Vec<(Grant, &str)> = Vec::new();
        let mut grant: Vec<(Grant, &str)> = Vec::new();
        let customer = self.is_customer_connection(claims.provider, claims.connection);
        let customer_org = self
            .connection_policy(claims.provider, claims.connection)
            .and_then(|c| c.organization);
        let connection_id = claims.connection.and_then(|c| c.id);
        let provenance: Vec<String> = self
            .role_sets
            .iter()
            .map(|set| format!("{}:{}:{}", set.granted_by, claims.provider, claims.subject))
            .collect();
        for (set, by) in self.role_sets.iter().zip(&provenance) {
            if set.mode == SyncMode::Import && !first_login {
                continue;
            }
            if !set.providers.is_empty() && !set.providers.contains(claims.provider) {
                continue;
            }
            if !set.connections.is_empty()
                && connection_id
                    .is_none_or(|id| lookup(&set.connections, claims.provider, id).is_none())
            {
                continue;
            }
            // What this set grants through this identity now; a `force` set then takes
            // back every grant of its own that is not wanted any more, unless a rule that
            // could grant that role reads a claim the identity never asserted.
            let mut wanted: Vec<Grant> = Vec::new();
            let mut unasserted: HashSet<&str> = HashSet::new();
            for rule in &set.rules {
                if !claims.asserted.covers(&rule.claim) {
                    unasserted.insert(rule.role.as_str());
                }
                let matched = match &rule.claim {
                    ClaimSource::Groups => claims.groups.iter().any(|v| rule.matcher.matches(v)),
                    ClaimSource::ConnectionGroups => claims
                        .connection_groups
                        .iter()
                        .any(|v| rule.matcher.matches(v)),
                    ClaimSource::Attribute(key) => claims
                        .attributes
                        .get(key)
                        .is_some_and(|v| rule.matcher.matches(v)),
                };
                if !matched {
                    continue;
                }
                let org = match rule.scope {
                    Scope::Global => Uuid::nil(),
                    Scope::Personal => ids::derived(user_id, "organization"),
                    Scope::Organization(id) => id,
                };
                // A customer's IdP speaks only for its own organization.
                let org = if customer && !set.allow_global {
                    match (rule.scope, customer_org) {
                        (Scope::Organization(id), Some(c)) if id == c => id,
                        (Scope::Global | Scope::Personal, Some(c)) => c,
                        _ => continue,
                    }
                } else {
                    org
                };
                wanted.push((rule.role.clone(), org));
            }
            if set.mode == SyncMode::Force {
                for (g, grantors) in current {
                    if grantors.contains(by)
                        && !wanted.contains(g)
                        && !unasserted.contains(g.0.as_str())
                    {
                        revoke.push((g.clone(), by.as_str()));
                    }
                }
            }
            grant.extend(wanted.into_iter().map(|g| (g, by.as_str())));
        }
        let mut roles = current.clone();
        for (g, by) in &revoke {
            if let Some(grantors) = roles.get_mut(g) {
                grantors.remove(*by);
                if grantors.is_empty() {
                    roles.remove(g);
                }
            }
        }
        for (g, by) in grant {
            roles.entry(g).or_default().insert(by.to_string());
        }
        roles
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

/// An identity that currently asserts a login's address, and its (active) user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    pub user_id: Uuid,
    pub provider: String,
    pub connection_id: Option<String>,
    pub connection_kind: Option<ConnectionKind>,
    /// The identity says the address is verified.
    pub email_verified: bool,
    /// Providers of all the user's identities.
    pub user_providers: Vec<String>,
}

/// Why an unknown identity was not linked to an existing user with its email.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSkip {
    /// `identity.link_verified_email = false`.
    Disabled,
    /// The provider is in `identity.untrusted_link_providers`.
    ProviderNotTrusted,
    /// The login came through an enterprise (or unknown) connection not allow-listed in
    /// `[[identity.connections]]`: the customer's IdP, not the provider, vouches for it.
    ConnectionNotTrusted,
    /// The login's email is not verified by its provider.
    EmailUnverified,
    /// The address has a non-ASCII local part: no agreed case folding, so no link.
    AddressNotLinkable,
    /// No trusted identity currently asserts the address verified for the users that
    /// hold it (a pre-registered or enterprise-asserted account must not capture a later
    /// verified login).
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
            LinkSkip::ConnectionNotTrusted => "connection_not_trusted",
            LinkSkip::EmailUnverified => "email_unverified",
            LinkSkip::AddressNotLinkable => "address_not_linkable",
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
/// `targets`: the identities of active users that currently assert the login's address
/// (verified or not). A user is a link target only through an identity that is trusted
/// for linking *and* asserts the address verified now.
pub fn decide_link(
    policy: &IdentityPolicy,
    event: &LoginEvent,
    targets: &[LinkTarget],
) -> LinkDecision {
    let Some(email) = event.email.as_deref() else {
        return LinkDecision::NoCandidate;
    };
    if targets.is_empty() {
        return LinkDecision::NoCandidate;
    }
    if !policy.link_verified_email {
        return LinkDecision::Skip(LinkSkip::Disabled);
    }
    if let Err(skip) = policy.link_trust(&event.provider, ConnectionRef::of_event(event)) {
        return LinkDecision::Skip(skip);
    }
    if event.email_verified != Some(true) {
        return LinkDecision::Skip(LinkSkip::EmailUnverified);
    }
    if !is_linkable_email(email) {
        return LinkDecision::Skip(LinkSkip::AddressNotLinkable);
    }
    let mut users: Vec<&LinkTarget> = targets
        .iter()
        .filter(|t| {
            t.email_verified
                && policy
                    .link_trust(
                        &t.provider,
                        ConnectionRef::stored(t.connection_id.as_deref(), t.connection_kind),
                    )
                    .is_ok()
        })
        .collect();
    users.sort_by_key(|t| t.user_id);
    users.dedup_by_key(|t| t.user_id);
    match users.as_slice() {
        [] => LinkDecision::Skip(LinkSkip::TargetEmailUnverified),
        [one] if one.user_providers.contains(&event.provider) => {
            LinkDecision::Skip(LinkSkip::ProviderAlreadyLinked)
        }
        [one] => LinkDecision::Link(one.user_id),
        _ => LinkDecision::Skip(LinkSkip::MultipleCandidates),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConnectionConfig, RoleSetConfig};
    use crate::events::login::Connection;
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

    fn set(name: &str, mode: &str, rules: Vec<RoleRuleConfig>) -> RoleSetConfig {
        RoleSetConfig {
            name: name.into(),
            mode: mode.into(),
            providers: Vec::new(),
            connections: Vec::new(),
            allow_global: false,
            rules,
        }
    }

    fn policy(sets: Vec<(&str, Vec<RoleRuleConfig>)>) -> IdentityPolicy {
        IdentityPolicy::compile(&IdentityConfig {
            role_sets: sets
                .into_iter()
                .map(|(mode, rules)| set(mode, mode, rules))
                .collect(),
            ..IdentityConfig::default()
        })
        .unwrap()
    }

    fn roles(names: &[(&str, Option<&str>)]) -> Roles {
        names
            .iter()
            .map(|(r, by)| {
                (
                    (r.to_string(), Uuid::nil()),
                    [by.unwrap_or_default().to_string()].into(),
                )
            })
            .collect()
    }

    const ALL: Asserted = Asserted {
        groups: true,
        connection_groups: true,
        attributes: true,
    };

    fn claims<'a>(groups: &'a [String], attrs: &'a BTreeMap<String, String>) -> Claims<'a> {
        Claims {
            provider: "p",
            subject: "s",
            connection: None,
            groups,
            connection_groups: &[],
            attributes: attrs,
            asserted: ALL,
        }
    }

    #[test]
    fn force_revokes_only_what_its_own_set_granted() {
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
        let own = Some("role_set:force:p:s");
        let after = p.reconcile_roles(
            user,
            &roles(&[("admin", own), ("hand-granted", None)]),
            claims(&groups, &attrs),
            false,
        );
        assert_eq!(
            after,
            roles(&[("engineer", own), ("hand-granted", None)]),
            "its own grant revoked, a hand grant kept"
        );
        // The same role granted by hand or by a merge is never revoked by the set.
        for by in [None, Some("merge:x"), Some("role_set:other")] {
            let kept = p.reconcile_roles(
                user,
                &roles(&[("admin", by)]),
                claims(&groups, &attrs),
                false,
            );
            assert!(
                kept.contains_key(&("admin".to_string(), Uuid::nil())),
                "{by:?}"
            );
        }
        // A login that never asserted groups revokes nothing.
        let silent = Claims {
            asserted: Asserted::default(),
            ..claims(&[], &attrs)
        };
        assert_eq!(
            p.reconcile_roles(user, &roles(&[("admin", own)]), silent, false),
            roles(&[("admin", own)])
        );
    }

    #[test]
    fn sets_scope_by_provider_case_insensitively_and_by_connection() {
        let mut config = IdentityConfig::default();
        let mut okta = set(
            "okta",
            "force",
            vec![rule("groups", "equals", "admins", "admin")],
        );
        okta.providers = vec!["Okta".into()];
        let mut conn = set(
            "corp",
            "additive",
            vec![rule("groups", "equals", "staff", "staff")],
        );
        conn.connections = vec!["auth0:con_corp".into()];
        conn.allow_global = true;
        config.role_sets = vec![okta, conn];
        let p = IdentityPolicy::compile(&config).unwrap();
        let attrs = BTreeMap::new();
        let user = Uuid::new_v4();
        let own = Some("role_set:okta:okta:s");
        let other = Claims {
            provider: "github",
            ..claims(&[], &attrs)
        };
        assert_eq!(
            p.reconcile_roles(user, &roles(&[("admin", own)]), other, false),
            roles(&[("admin", own)]),
            "another provider's login does not touch the okta set"
        );
        let okta_login = Claims {
            provider: "okta",
            ..claims(&[], &attrs)
        };
        assert_eq!(
            p.reconcile_roles(user, &roles(&[("admin", own)]), okta_login, false),
            Roles::new()
        );
        let staff = vec!["staff".to_string()];
        let elsewhere = Claims {
            provider: "auth0",
            connection: Some(ConnectionRef {
                id: Some("con_other"),
                kind: Some(ConnectionKind::Enterprise),
            }),
            ..claims(&staff, &attrs)
        };
        assert!(p
            .reconcile_roles(user, &Roles::new(), elsewhere, false)
            .is_empty());
        let through = Claims {
            connection: Some(ConnectionRef {
                id: Some("con_corp"),
                kind: Some(ConnectionKind::Enterprise),
            }),
            ..elsewhere
        };
        assert_eq!(
            p.reconcile_roles(user, &Roles::new(), through, false),
            roles(&[("staff", Some("role_set:corp:auth0:s"))])
        );
    }

    #[test]
    fn a_customer_connection_grants_only_inside_its_organization() {
        let org = Uuid::new_v4();
        let config = IdentityConfig {
            role_sets: vec![set(
                "idp",
                "force",
                vec![rule("connection.groups", "equals", "Admins", "admin")],
            )],
            connections: vec![ConnectionConfig {
                provider: "auth0".into(),
                connection: "con_acme".into(),
                organization: Some(org.to_string()),
                ..ConnectionConfig::default()
            }],
            ..IdentityConfig::default()
        };
        let p = IdentityPolicy::compile(&config).unwrap();
        let attrs = BTreeMap::new();
        let admins = vec!["Admins".to_string()];
        let user = Uuid::new_v4();
        let through = |id: &'static str| Claims {
            provider: "auth0",
            subject: "s",
            connection: Some(ConnectionRef {
                id: Some(id),
                kind: Some(ConnectionKind::Enterprise),
            }),
            groups: &[],
            connection_groups: &admins,
            attributes: &attrs,
            asserted: ALL,
        };
        let acme = p.reconcile_roles(user, &Roles::new(), through("con_acme"), false);
        let expected: Roles = [(
            ("admin".to_string(), org),
            ["role_set:idp:auth0:s".to_string()].into(),
        )]
        .into();
        assert_eq!(
            acme, expected,
            "scoped to the connection's organization, never global"
        );
        assert!(
            p.reconcile_roles(user, &Roles::new(), through("con_unknown"), false)
                .is_empty(),
            "a connection with no organization grants nothing"
        );
        // The operator's own (database) login with the same group is not a customer's claim.
        let own = Claims {
            connection: Some(ConnectionRef {
                id: Some("con_db"),
                kind: Some(ConnectionKind::Database),
            }),
            ..through("con_db")
        };
        let global: Roles = [(
            ("admin".to_string(), Uuid::nil()),
            ["role_set:idp:auth0:s".to_string()].into(),
        )]
        .into();
        assert_eq!(p.reconcile_roles(user, &Roles::new(), own, false), global);
    }

    #[test]
    fn a_connection_that_turns_out_to_be_a_customers_loses_its_global_grants() {
        // Granted globally while the connection's kind was unknown to the operator ...
        let p = policy(vec![(
            "force",
            vec![rule("connection.groups", "equals", "Admins", "admin")],
        )]);
        let attrs = BTreeMap::new();
        let admins = vec!["Admins".to_string()];
        let user = Uuid::new_v4();
        let login = |kind| Claims {
            provider: "p",
            subject: "s",
            connection: Some(ConnectionRef {
                id: Some("con_x"),
                kind: Some(kind),
            }),
            groups: &[],
            connection_groups: &admins,
            attributes: &attrs,
            asserted: ALL,
        };
        let granted =
            p.reconcile_roles(user, &Roles::new(), login(ConnectionKind::Database), false);
        assert_eq!(granted, roles(&[("admin", Some("role_set:force:p:s"))]));
        // ... then reported as enterprise: the same claim no longer grants it, so it goes.
        let after = p.reconcile_roles(user, &granted, login(ConnectionKind::Enterprise), false);
        assert!(after.is_empty(), "{after:?}");
        let e = IdentityPolicy::compile(&IdentityConfig {
            connections: vec![ConnectionConfig {
                provider: "auth0".into(),
                connection: "con_x".into(),
                organization: Some("not-a-uuid".into()),
                ..ConnectionConfig::default()
            }],
            ..IdentityConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("identity connection `auth0:con_x`") && e.contains("organization"),
            "{e}"
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
        let first = p.reconcile_roles(user, &Roles::new(), claims(&groups, &attrs), true);
        assert_eq!(
            first,
            roles(&[
                ("crm", Some("role_set:additive:p:s")),
                ("staff", Some("role_set:import:p:s"))
            ])
        );
        let later = p.reconcile_roles(user, &Roles::new(), claims(&groups, &attrs), false);
        assert_eq!(later, roles(&[("crm", Some("role_set:additive:p:s"))]));
        attrs.insert("dept".to_string(), "salesforce".to_string());
        let kept = p.reconcile_roles(user, &first, claims(&[], &attrs), false);
        assert_eq!(kept, first, "additive and import never revoke");
    }

    #[test]
    fn personal_scope_is_the_users_own_organization() {
        let mut r = rule("groups", "equals", "g", "owner");
        r.organization = Some("personal".into());
        let p = policy(vec![("additive", vec![r])]);
        let user = Uuid::new_v4();
        let attrs = BTreeMap::new();
        let g = vec!["g".to_string()];
        let after = p.reconcile_roles(user, &Roles::new(), claims(&g, &attrs), false);
        let expected: Roles = [(
            ("owner".to_string(), ids::derived(user, "organization")),
            ["role_set:additive:p:s".to_string()].into(),
        )]
        .into();
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
        let e = bad(vec![set(
            "idp",
            "force",
            vec![rule("groups", "regex", "(", "r")],
        )]);
        assert!(e.contains("idp/#1") && e.contains("bad regex"), "{e}");
        let e = bad(vec![set("idp", "sometimes", vec![])]);
        assert!(e.contains("idp") && e.contains("unknown mode"), "{e}");
        let mut named = rule("roles", "equals", "x", "r");
        named.name = Some("admins".into());
        let e = bad(vec![set("idp", "force", vec![named])]);
        assert!(
            e.contains("idp/admins") && e.contains("unknown claim"),
            "{e}"
        );
        let e = bad(vec![set(
            "idp",
            "force",
            vec![rule("groups", "like", "x", "r")],
        )]);
        assert!(e.contains("unknown match"), "{e}");
        let e = bad(vec![
            set("idp", "force", vec![]),
            set("idp", "additive", vec![]),
        ]);
        assert!(e.contains("two role sets"), "{e}");
        let mut scoped = set("idp", "force", vec![]);
        scoped.connections = vec!["no-colon".into()];
        let e = bad(vec![scoped]);
        assert!(e.contains("provider:connection"), "{e}");
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

    fn target(verified: bool, provider: &str) -> LinkTarget {
        LinkTarget {
            user_id: Uuid::new_v4(),
            provider: provider.into(),
            connection_id: None,
            connection_kind: None,
            email_verified: verified,
            user_providers: vec![provider.into()],
        }
    }

    fn skip(p: &IdentityPolicy, ev: &LoginEvent, ts: &[LinkTarget]) -> LinkSkip {
        match decide_link(p, ev, ts) {
            LinkDecision::Skip(s) => s,
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    #[test]
    fn links_only_one_trusted_verified_target_on_a_verified_email() {
        let p = IdentityPolicy::default();
        let ev = login(Some("a@x.io"), Some(true), "google");
        let t = target(true, "github");
        assert_eq!(
            decide_link(&p, &ev, std::slice::from_ref(&t)),
            LinkDecision::Link(t.user_id)
        );
        assert_eq!(decide_link(&p, &ev, &[]), LinkDecision::NoCandidate);
        for unverified in [Some(false), None] {
            assert_eq!(
                skip(
                    &p,
                    &login(Some("a@x.io"), unverified, "google"),
                    std::slice::from_ref(&t)
                ),
                LinkSkip::EmailUnverified
            );
        }
        assert_eq!(
            skip(&p, &ev, &[target(false, "github")]),
            LinkSkip::TargetEmailUnverified
        );
        assert_eq!(
            skip(&p, &ev, &[t.clone(), target(true, "apple")]),
            LinkSkip::MultipleCandidates
        );
        // Two identities of one user asserting the address are one candidate.
        let mut same_user = target(true, "apple");
        same_user.user_id = t.user_id;
        assert_eq!(
            decide_link(&p, &ev, &[t.clone(), same_user]),
            LinkDecision::Link(t.user_id)
        );
        assert_eq!(
            skip(&p, &ev, &[target(true, "google")]),
            LinkSkip::ProviderAlreadyLinked
        );
        let untrusted = IdentityPolicy::compile(&IdentityConfig {
            untrusted_link_providers: vec!["Google".into()],
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(
            skip(&untrusted, &ev, std::slice::from_ref(&t)),
            LinkSkip::ProviderNotTrusted
        );
        let off = IdentityPolicy::compile(&IdentityConfig {
            link_verified_email: false,
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(skip(&off, &ev, &[t]), LinkSkip::Disabled);
    }

    fn through(ev: &mut LoginEvent, id: &str, kind: Option<ConnectionKind>) {
        ev.connection = Some(Connection {
            connection_id: Some(id.into()),
            kind,
            groups: None,
        });
    }

    #[test]
    fn an_enterprise_connection_never_links_unless_allow_listed() {
        let victim = target(true, "google");
        for kind in [Some(ConnectionKind::Enterprise), None] {
            let mut attacker = login(Some("victim@gmail.com"), Some(true), "auth0");
            through(&mut attacker, "con_adfs", kind);
            assert_eq!(
                skip(
                    &IdentityPolicy::default(),
                    &attacker,
                    std::slice::from_ref(&victim)
                ),
                LinkSkip::ConnectionNotTrusted,
                "{kind:?}"
            );
        }
        let mut social = login(Some("victim@gmail.com"), Some(true), "auth0");
        through(&mut social, "con_google", Some(ConnectionKind::Social));
        assert_eq!(
            decide_link(
                &IdentityPolicy::default(),
                &social,
                std::slice::from_ref(&victim)
            ),
            LinkDecision::Link(victim.user_id)
        );
        // Allow-listed by the operator: it may link.
        let listed = IdentityPolicy::compile(&IdentityConfig {
            connections: vec![ConnectionConfig {
                provider: "auth0".into(),
                connection: "con_adfs".into(),
                link: Some(true),
                ..ConnectionConfig::default()
            }],
            ..IdentityConfig::default()
        })
        .unwrap();
        let mut corp = login(Some("victim@gmail.com"), Some(true), "auth0");
        through(&mut corp, "con_adfs", Some(ConnectionKind::Enterprise));
        assert_eq!(
            decide_link(&listed, &corp, std::slice::from_ref(&victim)),
            LinkDecision::Link(victim.user_id)
        );
    }

    #[test]
    fn a_target_counts_only_through_a_trusted_identity() {
        // The only holder signed up through an enterprise connection: not a link target.
        let mut enterprise = target(true, "auth0");
        enterprise.connection_id = Some("con_saml".into());
        enterprise.connection_kind = Some(ConnectionKind::Enterprise);
        let ev = login(Some("a@x.io"), Some(true), "google");
        let p = IdentityPolicy::default();
        assert_eq!(
            skip(&p, &ev, std::slice::from_ref(&enterprise)),
            LinkSkip::TargetEmailUnverified
        );
        let untrusted = IdentityPolicy::compile(&IdentityConfig {
            untrusted_link_providers: vec!["github".into()],
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(
            skip(&untrusted, &ev, &[target(true, "github")]),
            LinkSkip::TargetEmailUnverified
        );
    }

    #[test]
    fn a_non_ascii_local_part_never_links() {
        let ev = login(Some("\u{212a}im@example.com"), Some(true), "google");
        assert_eq!(
            skip(&IdentityPolicy::default(), &ev, &[target(true, "github")]),
            LinkSkip::AddressNotLinkable
        );
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
