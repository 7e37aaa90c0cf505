//! Pure decisions: no I/O here. The store loads state, the domain decides, the store writes.

pub mod auth_sync;
pub mod identity;
pub mod ids;
pub mod merge;
pub mod trust;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::ProvisioningConfig;
use crate::events::LoginEvent;

/// A user as the auth-sync step sees it (one row of `users` plus its primary email's state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub id: Uuid,
    pub email: Option<String>,
    pub email_verified: bool,
    pub display_name: Option<String>,
    pub auth_display_name: Option<String>,
    pub auth_picture_url: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub locale: Option<String>,
    pub workflow_variants: Vec<String>,
    /// The identity (provider, subject) that owns the primary address: only its logins
    /// change it. `None`: not known yet (the next identity asserting an address takes it).
    pub email_owner: Option<(String, String)>,
    /// Per profile field, the time of the newest event that set it.
    pub clocks: Clocks,
    pub lifecycle_state: String,
    pub version: i64,
    pub profile_event_at: DateTime<Utc>,
    pub last_login_at: DateTime<Utc>,
    pub login_count: i64,
    pub created_at: DateTime<Utc>,
    pub modified_at: DateTime<Utc>,
}

/// Per field, the time of the newest applied event that carried it. Key `*` is the legacy
/// single profile clock of rows written before per-field clocks: it stands in for every
/// field without a clock of its own.
pub type Clocks = BTreeMap<String, DateTime<Utc>>;

const LEGACY_CLOCK: &str = "*";

/// May an event at `at` set `field`? Only when no event newer than it set the field. An
/// event of the same time may (the later offset wins, as a replay re-derives state).
pub fn is_fresh(clocks: &Clocks, field: &str, at: DateTime<Utc>) -> bool {
    clocks
        .get(field)
        .or_else(|| clocks.get(LEGACY_CLOCK))
        .is_none_or(|t| at >= *t)
}

/// The clocks of one identity's claims, as kept in its user's clocks (keys
/// `<provider>\u{1f}<subject>\u{1f}<claim>`; the edge refuses control characters in
/// providers and subjects, so the keys of two identities never mix).
pub fn identity_clocks(user: &Clocks, provider: &str, subject: &str) -> Clocks {
    let prefix = format!("{provider}\u{1f}{subject}\u{1f}");
    user.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, t)| (k[prefix.len()..].to_string(), *t))
        .collect()
}

/// Puts one identity's claim clocks into its user's clocks.
pub fn store_identity_clocks(user: &mut Clocks, provider: &str, subject: &str, clocks: &Clocks) {
    let prefix = format!("{provider}\u{1f}{subject}\u{1f}");
    for (claim, t) in clocks {
        user.insert(format!("{prefix}{claim}"), *t);
    }
}

/// Records that an event at `at` set `field`.
pub fn advance(clocks: &mut Clocks, field: &str, at: DateTime<Utc>) {
    let clock = clocks.entry(field.to_string()).or_insert(at);
    if at > *clock {
        *clock = at;
    }
}

/// Sets a field from an event that carries it, if no newer event set it: `Some(changed)`
/// when applied, `None` when stale (or not carried: `Some(false)`).
fn set_field<T: PartialEq + Clone>(
    stored: &mut T,
    incoming: Option<&T>,
    clocks: &mut Clocks,
    field: &str,
    at: DateTime<Utc>,
    stale: &mut bool,
) -> bool {
    let Some(value) = incoming else {
        return false;
    };
    if !is_fresh(clocks, field, at) {
        *stale = true;
        return false;
    }
    advance(clocks, field, at);
    if value != stored {
        *stored = value.clone();
        true
    } else {
        false
    }
}

/// Why the client must refresh its token: something that ends up in a token changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefreshReason {
    EmailVerifiedChanged,
    EmailChanged,
    GroupsChanged,
    RolesChanged,
    OrgMembershipChanged,
    IdentityLinked,
    UserMerged,
}

impl RefreshReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshReason::EmailVerifiedChanged => "email_verified_changed",
            RefreshReason::EmailChanged => "email_changed",
            RefreshReason::GroupsChanged => "groups_changed",
            RefreshReason::RolesChanged => "roles_changed",
            RefreshReason::OrgMembershipChanged => "org_membership_changed",
            RefreshReason::IdentityLinked => "identity_linked",
            RefreshReason::UserMerged => "user_merged",
        }
    }
}

/// What one login did to a known user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginOutcome {
    /// A field the event carries was already set by a newer event (that field was kept).
    pub stale: bool,
    /// Any stored profile field (or the identity's groups) changed; the version was bumped.
    pub changed: bool,
    /// The primary email changed to this address (it must be added to `user_emails`).
    pub new_email: bool,
    pub groups_changed: bool,
    /// Sorted by priority; the first is the `tokenRefreshReason`.
    pub refresh_reasons: Vec<RefreshReason>,
}

impl LoginOutcome {
    pub fn token_refresh_required(&self) -> bool {
        !self.refresh_reasons.is_empty()
    }
    pub fn token_refresh_reason(&self) -> Option<RefreshReason> {
        self.refresh_reasons.first().copied()
    }
}

/// Applies a login to a known user's profile, in place.
///
/// Rules: each field has its own clock, so an event sets only the fields it carries and
/// only where no newer event set them (a `session.created` that carries no profile never
/// makes a later-arriving `user.created` stale); fields the event does not carry keep their
/// value; the primary address changes only by the identity that owns it, and a verified
/// flag counts only together with its address; the version is bumped once per event that
/// changed anything; changes that end up in a token require a token refresh.
pub fn apply_login(
    user: &mut UserRecord,
    identity: &(String, String),
    event: &LoginEvent,
    now: DateTime<Utc>,
) -> LoginOutcome {
    let mut outcome = LoginOutcome::default();
    let at = event.occurred_at;
    if event.kind.counts_as_login() {
        user.login_count += 1;
        if at > user.last_login_at {
            user.last_login_at = at;
        }
    }
    let mut changed = false;
    let mut stale = false;
    let mut reasons = Vec::new();
    if let Some(email) = &event.email {
        let owns = user.email_owner.as_ref().is_none_or(|o| o == identity);
        if owns {
            if is_fresh(&user.clocks, "email", at) {
                advance(&mut user.clocks, "email", at);
                if user.email_owner.is_none() {
                    user.email_owner = Some(identity.clone());
                }
                if user.email.as_deref() != Some(email.as_str()) {
                    user.email = Some(email.clone());
                    // A new address is only as verified as the event says.
                    user.email_verified = event.email_verified.unwrap_or(false);
                    outcome.new_email = true;
                    changed = true;
                    reasons.push(RefreshReason::EmailChanged);
                } else if let Some(verified) = event.email_verified {
                    if verified != user.email_verified {
                        user.email_verified = verified;
                        changed = true;
                        reasons.push(RefreshReason::EmailVerifiedChanged);
                    }
                }
            } else {
                stale = true;
            }
        }
    }
    let clocks = &mut user.clocks;
    for (stored, incoming, field) in [
        (
            &mut user.auth_display_name,
            event.display_name.as_ref(),
            "displayName",
        ),
        (
            &mut user.auth_picture_url,
            event.photo_url.as_ref(),
            "photoURL",
        ),
        (&mut user.given_name, event.given_name.as_ref(), "givenName"),
        (
            &mut user.family_name,
            event.family_name.as_ref(),
            "familyName",
        ),
        (&mut user.locale, event.locale.as_ref(), "locale"),
    ] {
        let mut current = stored.take();
        let incoming = incoming.map(|v| Some(v.clone()));
        changed |= set_field(
            &mut current,
            incoming.as_ref(),
            clocks,
            field,
            at,
            &mut stale,
        );
        *stored = current;
    }
    changed |= set_field(
        &mut user.workflow_variants,
        event.workflow_variants.as_ref(),
        clocks,
        "workflowVariants",
        at,
        &mut stale,
    );
    if at > user.profile_event_at && !stale {
        user.profile_event_at = at;
    }
    if changed {
        user.version += 1;
        user.modified_at = now;
    }
    reasons.sort();
    outcome.stale = stale;
    outcome.changed = changed;
    outcome.refresh_reasons = reasons;
    outcome
}

/// Kinds of collection authsync provisions (and the merge later moves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectionKind {
    Organization,
    Personal,
    Favorites,
}

impl CollectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CollectionKind::Organization => "organization",
            CollectionKind::Personal => "personal",
            CollectionKind::Favorites => "favorites",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedCollection {
    pub id: Uuid,
    pub kind: CollectionKind,
    pub label: String,
    /// Ids from the root down to and including this collection.
    pub path: Vec<Uuid>,
}

/// Everything a first login creates, decided up front so the store can insert it set-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignupPlan {
    pub user: UserRecord,
    pub provider: String,
    pub subject: String,
    pub tenant_id: Uuid,
    pub organization_id: Uuid,
    pub organization_name: String,
    pub organization_display_name: String,
    pub organization_slug: String,
    pub project_id: Uuid,
    pub project_name: String,
    pub project_display_name: String,
    pub project_slug: String,
    pub collections: Vec<PlannedCollection>,
}

/// `Acme Corp!` → `acme-corp`.
pub fn slugify(text: &str) -> String {
    let mut slug = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    while slug.ends_with('-') {
        slug.pop();
    }
    if slug.is_empty() {
        "default".into()
    } else {
        slug
    }
}

/// Plans a first login: ids are derived from the identity, so every attempt (and every
/// replay into an empty database) plans the same rows.
pub fn plan_signup(
    event: &LoginEvent,
    defaults: &ProvisioningConfig,
    now: DateTime<Utc>,
) -> SignupPlan {
    let user_id = ids::user_id(&event.provider, &event.subject);
    let tenant_id = ids::derived(user_id, "tenant");
    let organization_id = ids::derived(user_id, "organization");
    let project_id = ids::derived(user_id, "project");
    let hints = &event.hints;
    let pick = |hint: &Option<String>, default: &String| hint.clone().unwrap_or(default.clone());
    let organization_name = pick(&hints.organization_name, &defaults.organization_name);
    let organization_display_name = pick(
        &hints.organization_display_name,
        &defaults.organization_display_name,
    );
    let organization_slug = hints
        .organization_slug
        .clone()
        .unwrap_or_else(|| slugify(&organization_name));
    let project_name = pick(&hints.project_name, &defaults.project_name);
    let project_display_name = pick(&hints.project_display_name, &defaults.project_display_name);
    let project_slug = hints
        .project_slug
        .clone()
        .unwrap_or_else(|| slugify(&project_name));

    let org_collection = ids::derived(user_id, "collection/organization");
    let personal = ids::derived(user_id, "collection/personal");
    let favorites = ids::derived(user_id, "collection/favorites");
    let collections = vec![
        PlannedCollection {
            id: org_collection,
            kind: CollectionKind::Organization,
            label: pick(
                &hints.organization_collection_label,
                &defaults.organization_collection_label,
            ),
            path: vec![org_collection],
        },
        PlannedCollection {
            id: personal,
            kind: CollectionKind::Personal,
            label: pick(
                &hints.personal_collection_label,
                &defaults.personal_collection_label,
            ),
            path: vec![personal],
        },
        PlannedCollection {
            id: favorites,
            kind: CollectionKind::Favorites,
            label: pick(
                &hints.favorites_collection_label,
                &defaults.favorites_collection_label,
            ),
            path: vec![personal, favorites],
        },
    ];
    let at = event.occurred_at;
    let mut clocks = Clocks::new();
    for (field, carried) in [
        ("email", event.email.is_some()),
        ("displayName", event.display_name.is_some()),
        ("photoURL", event.photo_url.is_some()),
        ("givenName", event.given_name.is_some()),
        ("familyName", event.family_name.is_some()),
        ("locale", event.locale.is_some()),
        ("workflowVariants", event.workflow_variants.is_some()),
    ] {
        if carried {
            advance(&mut clocks, field, at);
        }
    }
    let user = UserRecord {
        id: user_id,
        email: event.email.clone(),
        email_verified: event.email.is_some() && event.email_verified.unwrap_or(false),
        email_owner: event
            .email
            .is_some()
            .then(|| (event.provider.clone(), event.subject.clone())),
        clocks,
        display_name: event.display_name.clone(),
        auth_display_name: event.display_name.clone(),
        auth_picture_url: event.photo_url.clone(),
        given_name: event.given_name.clone(),
        family_name: event.family_name.clone(),
        locale: event.locale.clone(),
        workflow_variants: event.workflow_variants.clone().unwrap_or_default(),
        lifecycle_state: "active".into(),
        version: 1,
        profile_event_at: event.occurred_at,
        last_login_at: event.occurred_at,
        // A profile update of an unknown identity creates the user without a login.
        login_count: i64::from(event.kind.counts_as_login()),
        created_at: now,
        modified_at: now,
    };
    SignupPlan {
        user,
        provider: event.provider.clone(),
        subject: event.subject.clone(),
        tenant_id,
        organization_id,
        organization_name,
        organization_display_name,
        organization_slug,
        project_id,
        project_name,
        project_display_name,
        project_slug,
        collections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, hour, 0, 0).unwrap()
    }

    fn login(hour: u32) -> LoginEvent {
        let mut event = LoginEvent::new(format!("e{hour}"), "t", at(hour), "p", "s");
        event.email = Some("a@x.io".into());
        event.email_verified = Some(false);
        event.display_name = Some("A".into());
        event.groups = Some(vec!["g1".into()]);
        event
    }

    fn me() -> (String, String) {
        ("p".to_string(), "s".to_string())
    }

    fn signed_up(hour: u32) -> UserRecord {
        plan_signup(&login(hour), &ProvisioningConfig::default(), at(hour)).user
    }

    #[test]
    fn unchanged_login_only_moves_bookkeeping() {
        let mut user = signed_up(1);
        let before = user.clone();
        let outcome = apply_login(&mut user, &me(), &login(2), at(2));
        assert!(!outcome.changed && !outcome.token_refresh_required());
        assert_eq!(user.version, before.version);
        assert_eq!(user.last_login_at, at(2));
        assert_eq!(user.login_count, 2);
    }

    #[test]
    fn profile_change_bumps_version_without_refresh() {
        let mut user = signed_up(1);
        let mut ev = login(2);
        ev.display_name = Some("Ada".into());
        let outcome = apply_login(&mut user, &me(), &ev, at(2));
        assert!(outcome.changed);
        assert!(!outcome.token_refresh_required());
        assert_eq!(user.version, 2);
        assert_eq!(user.auth_display_name.as_deref(), Some("Ada"));
        // The user-editable display name is set at sign-up only.
        assert_eq!(user.display_name.as_deref(), Some("A"));
    }

    #[test]
    fn stale_event_never_overwrites_newer_data() {
        let mut user = signed_up(5);
        let mut ev = login(3);
        ev.display_name = Some("Old".into());
        ev.email_verified = Some(true);
        let outcome = apply_login(&mut user, &me(), &ev, at(6));
        assert!(outcome.stale && !outcome.changed);
        assert_eq!(user.auth_display_name.as_deref(), Some("A"));
        assert!(!user.email_verified);
        assert_eq!(user.last_login_at, at(5));
    }

    #[test]
    fn an_event_moves_only_the_fields_it_carries() {
        // A login with no profile at 09:00 (Clerk `session.created`) ...
        let mut bare = LoginEvent::new("s1", "t", at(9), "p", "s");
        bare.kind = crate::events::login::LoginKind::Login;
        let mut user = plan_signup(&bare, &ProvisioningConfig::default(), at(9)).user;
        assert!(user.clocks.is_empty(), "nothing carried, no clock set");
        // ... then the older `user.created` (08:00) with the address and names.
        let mut created = login(8);
        created.email_verified = Some(true);
        let outcome = apply_login(&mut user, &me(), &created, at(9));
        assert!(
            !outcome.stale,
            "nothing it carries was set by a newer event"
        );
        assert_eq!(user.email.as_deref(), Some("a@x.io"));
        assert!(user.email_verified);
        assert_eq!(user.auth_display_name.as_deref(), Some("A"));
        // A still older event with another name loses to it, field by field.
        let mut older = LoginEvent::new("s0", "t", at(7), "p", "s");
        older.display_name = Some("Old".into());
        older.locale = Some("fr".into());
        let outcome = apply_login(&mut user, &me(), &older, at(9));
        assert!(outcome.stale);
        assert_eq!(user.auth_display_name.as_deref(), Some("A"));
        assert_eq!(
            user.locale.as_deref(),
            Some("fr"),
            "no newer event set the locale"
        );
    }

    #[test]
    fn only_the_owning_identity_moves_the_primary_address() {
        let mut user = signed_up(1);
        assert_eq!(user.email_owner, Some(me()));
        let other = ("github".to_string(), "9".to_string());
        let mut ev = LoginEvent::new("g", "t", at(2), "github", "9");
        ev.email = Some("work@corp.io".into());
        ev.email_verified = Some(true);
        let outcome = apply_login(&mut user, &other, &ev, at(2));
        assert_eq!(user.email.as_deref(), Some("a@x.io"), "not the owner");
        assert!(!outcome.new_email && !user.email_verified);
        // A verified flag without its address verifies nothing.
        let mut flag = LoginEvent::new("f", "t", at(3), "p", "s");
        flag.email_verified = Some(true);
        apply_login(&mut user, &me(), &flag, at(3));
        assert!(!user.email_verified);
        // The owner moves it.
        let mut moved = login(4);
        moved.email = Some("new@x.io".into());
        let outcome = apply_login(&mut user, &me(), &moved, at(4));
        assert!(outcome.new_email);
        assert_eq!(user.email.as_deref(), Some("new@x.io"));
    }

    #[test]
    fn token_claims_changes_require_refresh_with_reasons() {
        let mut user = signed_up(1);
        let mut ev = login(2);
        ev.email_verified = Some(true);
        let outcome = apply_login(&mut user, &me(), &ev, at(2));
        assert_eq!(
            outcome.refresh_reasons,
            vec![RefreshReason::EmailVerifiedChanged]
        );
        assert_eq!(
            outcome.token_refresh_reason(),
            Some(RefreshReason::EmailVerifiedChanged)
        );

        let mut ev = login(3);
        ev.email = Some("b@x.io".into());
        ev.email_verified = None;
        let outcome = apply_login(&mut user, &me(), &ev, at(3));
        assert!(outcome.new_email);
        assert!(
            !user.email_verified,
            "a new address is unverified unless said"
        );
        assert_eq!(outcome.refresh_reasons, vec![RefreshReason::EmailChanged]);
    }

    #[test]
    fn signup_plan_is_deterministic_and_uses_labels() {
        let mut ev = login(1);
        ev.hints.favorites_collection_label = Some("Stars".into());
        ev.hints.organization_name = Some("Acme Corp!".into());
        let a = plan_signup(&ev, &ProvisioningConfig::default(), at(1));
        let b = plan_signup(&ev, &ProvisioningConfig::default(), at(2));
        assert_eq!(a.user.id, b.user.id);
        assert_eq!(a.collections, b.collections);
        assert_eq!(a.organization_slug, "acme-corp");
        let fav = &a.collections[2];
        assert_eq!(
            (fav.kind, fav.label.as_str()),
            (CollectionKind::Favorites, "Stars")
        );
        assert_eq!(fav.path, vec![a.collections[1].id, fav.id]);
        assert_eq!(a.collections[1].label, "Personal");
    }
}
