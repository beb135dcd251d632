//! Identity resolution: which ChurnZero account and contact an event is
//! for. An event's own ids come first (read here from its traits and
//! properties); what it lacks comes from the identity map, which identify,
//! group and alias calls teach. The rules of that map live here: what each
//! call teaches, which side of an alias teaches the other, and whose held
//! events a change releases. The storage of the map (its tables and their
//! SQL) is the outbox backend's.

use crate::churnzero::mapping::{
    MappingConfig, context_traits, event_type, id_value, lookup, object,
};
use crate::segment::CallType;
use serde_json::{Map, Value};

/// The trait and property keys that carry ids, before the mapping file's
/// own (`account_id_keys`, `contact_id_keys`).
pub(crate) const ACCOUNT_ID_KEYS: [&str; 3] = [
    "accountExternalId",
    "accountExternalID",
    "account_external_id",
];
pub(crate) const CONTACT_ID_KEYS: [&str; 3] = [
    "contactExternalId",
    "contactExternalID",
    "contact_external_id",
];

/// The ChurnZero ids an event resolves to; ChurnZero needs both on every
/// action.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ids {
    pub account: String,
    pub contact: String,
}

/// Ids the event itself carries; whatever is missing comes from the identity
/// map. See the module documentation for the keys and their order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialIds {
    pub account: Option<String>,
    pub contact: Option<String>,
}

impl PartialIds {
    /// Fills the gaps from another source (typically the identity map), the
    /// event's own ids winning.
    pub fn or(self, fallback: PartialIds) -> PartialIds {
        PartialIds {
            account: self.account.or(fallback.account),
            contact: self.contact.or(fallback.contact),
        }
    }

    /// `Some` only when both ids are known, i.e. the event can be delivered.
    pub fn complete(self) -> Option<Ids> {
        match (self.account, self.contact) {
            (Some(account), Some(contact)) => Some(Ids { account, contact }),
            _ => None,
        }
    }
}

/// Ids the identity map holds for one user: (account, contact).
pub type KnownIds = (Option<String>, Option<String>);

/// What an identify, group or alias call teaches the identity map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityUpdate {
    pub user_id: String,
    pub account: Option<String>,
    pub contact: Option<String>,
    /// For alias: the earlier id that is the same person as `user_id`.
    pub previous_id: Option<String>,
}

/// Resolves the ids an event needs: its own, else the identity map's.
pub fn resolve(own: PartialIds, known: Option<&KnownIds>) -> Option<Ids> {
    let account = own.account.or_else(|| known.and_then(|k| k.0.clone()))?;
    let contact = own.contact.or_else(|| known.and_then(|k| k.1.clone()))?;
    Some(Ids { account, contact })
}

fn find_id(
    sources: &[Option<&Map<String, Value>>],
    builtin: &[&str],
    configured: &[String],
) -> Option<String> {
    sources.iter().flatten().find_map(|obj| {
        builtin
            .iter()
            .copied()
            .chain(configured.iter().map(String::as_str))
            .find_map(|key| lookup(obj, key).and_then(id_value))
    })
}

/// Reads the ids an event carries so that events naming their account and
/// contact need no identity lookup and are never held.
pub fn ids_from_event(cfg: &MappingConfig, event: &Value) -> PartialIds {
    let traits = object(event, "traits");
    let properties = object(event, "properties");
    let sources = match event_type(event) {
        "identify" | "group" => [traits, context_traits(event), properties],
        _ => [properties, context_traits(event), traits],
    };
    let mut account = find_id(&sources, &ACCOUNT_ID_KEYS, &cfg.account_id_keys);
    let contact = find_id(&sources, &CONTACT_ID_KEYS, &cfg.contact_id_keys);
    if event_type(event) == "group" {
        if let Some(group_id) = event.get("groupId").and_then(id_value) {
            account = Some(group_id);
        }
    } else if account.is_none() {
        account = event
            .get("context")
            .and_then(|c| c.get("groupId"))
            .and_then(id_value);
    }
    PartialIds { account, contact }
}

/// identify: the ids its traits carry (contact defaults to the userId);
/// group: the user belongs to the group's account; alias: previousId is the
/// same person as userId.
pub fn identity_update(
    mapping: &MappingConfig,
    call: CallType,
    key: &str,
    event: &Value,
) -> Option<IdentityUpdate> {
    let own = ids_from_event(mapping, event);
    match call {
        CallType::Identify => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: own.account,
            contact: own.contact.or_else(|| {
                event
                    .get("userId")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }),
            previous_id: None,
        }),
        CallType::Group => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: event
                .get("groupId")
                .and_then(Value::as_str)
                .map(str::to_string),
            contact: None,
            previous_id: None,
        }),
        CallType::Alias => Some(IdentityUpdate {
            user_id: key.to_string(),
            account: None,
            contact: None,
            previous_id: event
                .get("previousId")
                .and_then(Value::as_str)
                .map(str::to_string),
        }),
        _ => None,
    }
}

impl IdentityUpdate {
    /// Whether this update carries ids for the map (an alias alone does not:
    /// it links two users and teaches neither anything new by itself).
    pub fn teaches_ids(&self) -> bool {
        self.account.is_some() || self.contact.is_some()
    }
}

/// An alias links `previous_id` and `user_id` as one person: whichever side
/// the map knows teaches the other, the user's own ids first. Returns
/// `(from, to)`: the user whose ids are copied and the user who learns them
/// (filling only what it lacks).
pub fn alias_teacher<'a>(
    user_id: &'a str,
    previous_id: &'a str,
    user_known: bool,
) -> (&'a str, &'a str) {
    if user_known {
        (user_id, previous_id)
    } else {
        (previous_id, user_id)
    }
}

/// The users whose held events an update releases: the user itself, the
/// earlier ids aliased to it that learned its ids just now, and the alias's
/// previous id. Release only makes them due again; delivery resolves them
/// again and holds them once more if ids are still missing.
pub fn released_by(update: &IdentityUpdate, aliased_learned: Vec<String>) -> Vec<String> {
    let mut keys = vec![update.user_id.clone()];
    keys.extend(aliased_learned);
    if let Some(prev) = &update.previous_id {
        keys.push(prev.clone());
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(account: Option<&str>, contact: Option<&str>, prev: Option<&str>) -> IdentityUpdate {
        IdentityUpdate {
            user_id: "u".into(),
            account: account.map(str::to_string),
            contact: contact.map(str::to_string),
            previous_id: prev.map(str::to_string),
        }
    }

    #[test]
    fn the_events_own_ids_win_and_the_map_fills_the_gaps() {
        let own = PartialIds {
            account: Some("a-own".into()),
            contact: None,
        };
        let known: KnownIds = (Some("a-map".into()), Some("c-map".into()));
        assert_eq!(
            resolve(own.clone(), Some(&known)),
            Some(Ids {
                account: "a-own".into(),
                contact: "c-map".into()
            })
        );
        assert_eq!(resolve(own, None), None);
    }

    #[test]
    fn the_known_side_of_an_alias_teaches_the_other() {
        assert_eq!(alias_teacher("new", "old", true), ("new", "old"));
        assert_eq!(alias_teacher("new", "old", false), ("old", "new"));
    }

    #[test]
    fn an_update_releases_its_user_the_learned_aliases_and_the_previous_id() {
        assert_eq!(
            released_by(&update(Some("a"), None, None), vec!["old1".into()]),
            ["u", "old1"]
        );
        assert_eq!(
            released_by(&update(None, None, Some("p")), vec![]),
            ["u", "p"]
        );
        assert!(update(None, Some("c"), None).teaches_ids());
        assert!(!update(None, None, Some("p")).teaches_ids());
    }
}
