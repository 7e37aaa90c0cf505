//! Pure decisions: no I/O here. The store loads state, the domain decides, the store writes.

pub mod identity;
pub mod ids;
pub mod merge;

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
    pub lifecycle_state: String,
    pub version: i64,
    pub profile_event_at: DateTime<Utc>,
    pub last_login_at: DateTime<Utc>,
    pub login_count: i64,
    pub created_at: DateTime<Utc>,
    pub modified_at: DateTime<Utc>,
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
    /// The event is older than the newest applied profile: only login bookkeeping changed.
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

fn set_if_changed<T: PartialEq + Clone>(stored: &mut T, incoming: Option<&T>) -> bool {
    match incoming {
        Some(v) if v != stored => {
            *stored = v.clone();
            true
        }
        _ => false,
    }
}

fn set_opt_if_changed(stored: &mut Option<String>, incoming: &Option<String>) -> bool {
    match incoming {
        Some(v) if stored.as_deref() != Some(v.as_str()) => {
            *stored = Some(v.clone());
            true
        }
        _ => false,
    }
}

/// Applies a login to a known user and its identity's groups, in place.
///
/// Rules: an event older than the last applied profile never overwrites it (only the
/// login bookkeeping moves); fields the event does not carry keep their stored value;
/// the version is bumped once per event that changed anything; changes that end up in a
/// token (email, its verification, groups) require a token refresh.
pub fn apply_login(
    user: &mut UserRecord,
    identity_groups: &mut Vec<String>,
    event: &LoginEvent,
    now: DateTime<Utc>,
) -> LoginOutcome {
    let mut outcome = LoginOutcome::default();
    if event.kind.counts_as_login() {
        user.login_count += 1;
        if event.occurred_at > user.last_login_at {
            user.last_login_at = event.occurred_at;
        }
    }
    if event.occurred_at < user.profile_event_at {
        outcome.stale = true;
        return outcome;
    }
    user.profile_event_at = event.occurred_at;

    let mut changed = false;
    let mut reasons = Vec::new();
    if let Some(email) = &event.email {
        if user.email.as_deref() != Some(email.as_str()) {
            user.email = Some(email.clone());
            // A new address is only as verified as the event says.
            user.email_verified = event.email_verified.unwrap_or(false);
            outcome.new_email = true;
            changed = true;
            reasons.push(RefreshReason::EmailChanged);
        }
    }
    if !outcome.new_email && set_if_changed(&mut user.email_verified, event.email_verified.as_ref())
    {
        changed = true;
        reasons.push(RefreshReason::EmailVerifiedChanged);
    }
    changed |= set_opt_if_changed(&mut user.auth_display_name, &event.display_name);
    changed |= set_opt_if_changed(&mut user.auth_picture_url, &event.photo_url);
    changed |= set_opt_if_changed(&mut user.given_name, &event.given_name);
    changed |= set_opt_if_changed(&mut user.family_name, &event.family_name);
    changed |= set_opt_if_changed(&mut user.locale, &event.locale);
    changed |= set_if_changed(
        &mut user.workflow_variants,
        event.workflow_variants.as_ref(),
    );
    if set_if_changed(identity_groups, event.groups.as_ref()) {
        outcome.groups_changed = true;
        changed = true;
        reasons.push(RefreshReason::GroupsChanged);
    }
    if changed {
        user.version += 1;
        user.modified_at = now;
    }
    reasons.sort();
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
    pub groups: Vec<String>,
    pub connection_id: Option<String>,
    pub connection_groups: Vec<String>,
    pub audience: Option<String>,
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
    let user = UserRecord {
        id: user_id,
        email: event.email.clone(),
        email_verified: event.email.is_some() && event.email_verified.unwrap_or(false),
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
        groups: event.groups.clone().unwrap_or_default(),
        connection_id: event
            .connection
            .as_ref()
            .and_then(|c| c.connection_id.clone()),
        connection_groups: event
            .connection
            .as_ref()
            .map(|c| c.groups.clone())
            .unwrap_or_default(),
        audience: event.audience.clone(),
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

    fn signed_up(hour: u32) -> (UserRecord, Vec<String>) {
        let plan = plan_signup(&login(hour), &ProvisioningConfig::default(), at(hour));
        (plan.user, plan.groups)
    }

    #[test]
    fn unchanged_login_only_moves_bookkeeping() {
        let (mut user, mut groups) = signed_up(1);
        let before = user.clone();
        let outcome = apply_login(&mut user, &mut groups, &login(2), at(2));
        assert!(!outcome.changed && !outcome.token_refresh_required());
        assert_eq!(user.version, before.version);
        assert_eq!(user.last_login_at, at(2));
        assert_eq!(user.login_count, 2);
    }

    #[test]
    fn profile_change_bumps_version_without_refresh() {
        let (mut user, mut groups) = signed_up(1);
        let mut ev = login(2);
        ev.display_name = Some("Ada".into());
        let outcome = apply_login(&mut user, &mut groups, &ev, at(2));
        assert!(outcome.changed);
        assert!(!outcome.token_refresh_required());
        assert_eq!(user.version, 2);
        assert_eq!(user.auth_display_name.as_deref(), Some("Ada"));
        // The user-editable display name is set at sign-up only.
        assert_eq!(user.display_name.as_deref(), Some("A"));
    }

    #[test]
    fn stale_event_never_overwrites_newer_data() {
        let (mut user, mut groups) = signed_up(5);
        let mut ev = login(3);
        ev.display_name = Some("Old".into());
        ev.email_verified = Some(true);
        let outcome = apply_login(&mut user, &mut groups, &ev, at(6));
        assert!(outcome.stale && !outcome.changed);
        assert_eq!(user.auth_display_name.as_deref(), Some("A"));
        assert!(!user.email_verified);
        assert_eq!(user.last_login_at, at(5));
    }

    #[test]
    fn token_claims_changes_require_refresh_with_reasons() {
        let (mut user, mut groups) = signed_up(1);
        let mut ev = login(2);
        ev.email_verified = Some(true);
        ev.groups = Some(vec!["g1".into(), "g2".into()]);
        let outcome = apply_login(&mut user, &mut groups, &ev, at(2));
        assert_eq!(
            outcome.refresh_reasons,
            vec![
                RefreshReason::EmailVerifiedChanged,
                RefreshReason::GroupsChanged
            ]
        );
        assert_eq!(
            outcome.token_refresh_reason(),
            Some(RefreshReason::EmailVerifiedChanged)
        );

        let mut ev = login(3);
        ev.email = Some("b@x.io".into());
        ev.email_verified = None;
        ev.groups = None;
        let outcome = apply_login(&mut user, &mut groups, &ev, at(3));
        assert!(outcome.new_email);
        assert!(
            !user.email_verified,
            "a new address is unverified unless said"
        );
        assert_eq!(outcome.refresh_reasons, vec![RefreshReason::EmailChanged]);
        assert_eq!(groups, vec!["g1".to_string(), "g2".to_string()]);
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
