//! How one stored Segment event becomes ChurnZero actions.
//!
//! Everything here is a pure function of the event, its resolved ids and the
//! mapping file, so the payload of an event is byte-for-byte the same on every
//! delivery attempt and ChurnZero's own duplicate filter can absorb the resends
//! that at-least-once delivery produces. The `appKey` is added by the HTTP
//! client at send time, so it is never part of anything stored.
//!
//! ## Calls
//!
//! Every action carries `action`, `accountExternalId` and `contactExternalId`
//! (from the resolved ids), in that order, before the keys below.
//!
//! | Segment call | ChurnZero actions |
//! |---|---|
//! | `track` | one `trackEvent`: `eventName` = `event`, then `eventDate`, `description`, `quantity`, `cf_<Name>` custom event fields, `allowDupes` (rules below) |
//! | `page` | with `page_events = true`: one `trackEvent` named `Viewed <name> Page`, built like `track` from the page's `properties`; off by default |
//! | `screen` | with `screen_events = true`: one `trackEvent` named `Viewed <name> Screen`, as for `page`; off by default |
//! | `identify` | an account `setAttribute` (`entity: "account"`) with the traits the mapping file routes to the account, if any, then a contact `setAttribute` (`entity: "contact"`) with the other traits, if any; audience traits are left out (they go to the sync lane, see [`audience_updates`]); nothing when no attribute remains |
//! | `group` | one account `setAttribute` with `accountExternalId` = `groupId` and the group's traits; nothing when no attribute remains |
//! | `alias` | nothing (the identity map handles it) |
//!
//! ## Fields
//!
//! | Segment field | ChurnZero key | rule |
//! |---|---|---|
//! | `event` (track) | `eventName` | unchanged |
//! | `name` (page/screen) | `eventName` | `Viewed <name> Page` / `Viewed <name> Screen`; `properties.name` when `name` is absent; `Viewed Page` / `Viewed Screen` when both are |
//! | `timestamp` | `eventDate` | converted to UTC and printed with exactly three fraction digits, `2026-11-28T19:36:24.123Z` (extra digits are truncated, never rounded); a value without an offset is read as UTC; ingest has already replaced a value that is not a date (see the README's timestamp rule), so `eventDate` is always a date; falls back to `receivedAt`, then `originalTimestamp` |
//! | `properties.description` | `description` | strings as they are, numbers and booleans as their text, cut to 255 characters (Unicode scalar values, never bytes); omitted for objects, arrays and null |
//! | `properties.quantity` | `quantity` | a JSON number as it is; a string holding a finite decimal number (`"3"`, `" 2.5 "`) becomes that number; anything else is omitted and the event is still sent |
//! | properties chosen in the mapping file | `cf_<Name>` | `<Name>` is the property name or its `field` rename; values follow the attribute value rules below |
//! | mapping file `allow_dupes = true` | `allowDupes: true` | on every `trackEvent` (track, page, screen); absent otherwise |
//! | identify `traits.firstName`, `lastName`, `email` | `attr_FirstName`, `attr_LastName`, `attr_Email` | standard contact fields; any trait whose name matches a standard field of its entity ignoring case and `_` is sent under the standard spelling (`first_name` -> `attr_FirstName`, `licenseCount` on the account -> `attr_LicenseCount`) |
//! | identify `traits.name` | `attr_FirstName`, `attr_LastName` | split at the first whitespace, filling only the names the event does not set itself; `name` itself is not sent (contacts have no name field) unless the mapping file has a rule for it |
//! | group `traits.name` | `attr_Name` | standard account field |
//! | group `traits.address.street`, `.city`, `.state`, `.postalCode`, `.country` | `attr_BillingAddressLine1`, `attr_BillingAddressCity`, `attr_BillingAddressState`, `attr_BillingAddressZip`, `attr_BillingAddressCountry` | other address keys follow the nesting rule |
//! | other traits | `attr_<trait>` | strings, numbers and booleans keep their JSON type (ISO 8601 dates stay strings); null is skipped |
//! | arrays | `attr_<trait>` | an array of scalars becomes the multi-select string `"a, b"` (nulls dropped, `[]` gives `""`); an array holding an object or array is skipped |
//! | nested objects | `attr_<parent>_<child>` | flattened at any depth with `_` (identify `address.city` -> `attr_address_city`, `company.name` -> `attr_company_name`, `company.id` -> `attr_company_id`); route or rename them with the mapping file, e.g. `company_name = { field = "Name", entity = "account" }` |
//! | `traits.id` | — | not sent: it repeats `userId` / `groupId`, which the ids already carry (a mapping rule for `id` sends it) |
//! | id keys | — | `accountExternalId`, `contactExternalId`, their spellings `accountExternalID`, `contactExternalID`, `account_external_id`, `contact_external_id`, and the mapping file's `[ids]` keys are never attributes |
//!
//! ## Ids carried by the event ([`ids_from_event`])
//!
//! The account id and the contact id are looked for separately, in this
//! order: the call's own object (`traits` for identify and group, `properties`
//! for the others), then `context.traits`, then the remaining one of
//! `traits` / `properties`. In each object the keys are `accountExternalId`,
//! `accountExternalID`, `account_external_id` (and the `contact` versions),
//! then the mapping file's `[ids]` keys, which may be dotted paths such as
//! `company.id`. Strings that are not blank and numbers count. For `group` the
//! account id is always `groupId`. Any other call that names no account
//! this way takes `context.groupId` (Segment's common field for the account
//! of any call), ahead of the identity map.
//!
//! ## Mapping file
//!
//! ```toml
//! allow_dupes = false          # send allowDupes: true on trackEvent actions
//! page_events = false          # page calls become `Viewed <name> Page` events
//! screen_events = false        # screen calls become `Viewed <name> Screen` events
//! audience_traits = ["order_completed_last_30days"]   # identify traits that go to the sync lane
//! event_custom_fields = ["plan", "seats"]             # properties sent as cf_<name>
//! quantity_property = "quantity"                      # property read for `quantity`
//! description_property = "description"                # property read for `description`
//!
//! [ids]                        # extra keys (dotted paths allowed) that carry ids
//! account_keys = ["company.id"]
//! contact_keys = ["email"]
//!
//! [traits]                     # identify traits: rename, route, skip
//! plan = { field = "PlanName", entity = "account" }
//! company_name = { field = "Name", entity = "account" }
//! internal_score = { skip = true }
//!
//! [group_traits]               # group traits (always the account): rename, skip
//! employees = { field = "EmployeeCount" }
//!
//! [properties]                 # properties sent as cf_<field>
//! revenue = { field = "Revenue" }
//! ```
//!
//! Rule keys name the flattened trait or property (`company_name`; the quoted
//! dotted form `"company.name"` means the same). A rule on an object applies to
//! everything inside it that has no rule of its own: `skip` and `entity` are
//! inherited, and `field` replaces the object's name in the prefix
//! (`address = { field = "Home" }` sends `attr_Home_city`). A `field` is used
//! exactly as written. A property in both `event_custom_fields` and
//! `[properties]` takes its name from `[properties]`. Audience updates are
//! always contact attributes, so routing a trait named in `audience_traits` to
//! the account is rejected. Unknown keys and wrong types are rejected with the
//! line and column of the problem.
//!
//! With `allow_dupes = true` ChurnZero keeps events it would otherwise treat
//! as repeats, which also means an event resent after a crash is counted
//! twice: turn it on only when distinct events really share a millisecond,
//! account, contact and description.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use crate::identity::{ACCOUNT_ID_KEYS, CONTACT_ID_KEYS};
pub use crate::identity::{Ids, PartialIds, ids_from_event};

/// ChurnZero limits `description` to this many characters.
pub const DESCRIPTION_MAX_CHARS: usize = 255;

const STANDARD_ACCOUNT_FIELDS: [&str; 15] = [
    "Name",
    "NextRenewalDate",
    "TotalContractAmount",
    "IsActive",
    "BillingAddressLine1",
    "BillingAddressLine2",
    "BillingAddressCity",
    "BillingAddressState",
    "BillingAddressZip",
    "BillingAddressCountry",
    "StartDate",
    "EndDate",
    "LicenseCount",
    "OwnerUserAccount",
    "ParentAccountExternalId",
];
const STANDARD_CONTACT_FIELDS: [&str; 3] = ["FirstName", "LastName", "Email"];

/// Segment's reserved `address` trait, keyed by its normalised flattened
/// name, mapped onto ChurnZero's billing address fields.
const ACCOUNT_ADDRESS_FIELDS: [(&str, &str); 6] = [
    ("addressstreet", "BillingAddressLine1"),
    ("addresscity", "BillingAddressCity"),
    ("addressstate", "BillingAddressState"),
    ("addresspostalcode", "BillingAddressZip"),
    ("addresszip", "BillingAddressZip"),
    ("addresscountry", "BillingAddressCountry"),
];

/// Which ChurnZero record an attribute is written to: identify traits may be
/// routed to the account by the mapping file, so the target is data, not code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    Account,
    Contact,
}

impl Entity {
    /// The value of the `entity` key ChurnZero expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Account => "account",
            Entity::Contact => "contact",
        }
    }
}

/// Why a mapping file was refused; the message points at the offending line
/// so an operator can fix the file without guessing.
#[derive(thiserror::Error, Debug)]
pub enum MappingError {
    #[error("cannot read mapping file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", describe_invalid(.path.as_deref(), *.line, *.column, .message))]
    Invalid {
        /// Set when the text came from a file.
        path: Option<PathBuf>,
        /// 1-based; `None` when the parser could not tell.
        line: Option<usize>,
        /// 1-based, in characters.
        column: Option<usize>,
        message: String,
    },
}

fn describe_invalid(
    path: Option<&Path>,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
) -> String {
    let mut out = String::from("mapping file");
    if let Some(path) = path {
        let _ = write!(out, " {}", path.display());
    }
    match (line, column) {
        (Some(line), Some(column)) => {
            let _ = write!(out, " line {line}, column {column}");
        }
        (Some(line), None) => {
            let _ = write!(out, " line {line}");
        }
        _ => {}
    }
    let _ = write!(out, ": {message}");
    out
}

impl MappingError {
    fn at(text: &str, offset: Option<usize>, message: impl Into<String>) -> Self {
        let (line, column) = match offset {
            Some(offset) => {
                let (line, column) = line_column(text, offset);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        MappingError::Invalid {
            path: None,
            line,
            column,
            message: message.into(),
        }
    }

    fn with_path(self, file: &Path) -> Self {
        match self {
            MappingError::Invalid {
                line,
                column,
                message,
                ..
            } => MappingError::Invalid {
                path: Some(file.to_path_buf()),
                line,
                column,
                message,
            },
            other => other,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A rename / route / skip rule for one trait or property (or an object and
/// everything inside it).
#[derive(Debug, Clone, Default)]
struct FieldRule {
    field: Option<String>,
    entity: Option<Entity>,
    skip: bool,
}

/// Parsed `--mapping` TOML file. `Default` is what runs without a file:
/// standard field names, no custom event fields, page and screen off,
/// ChurnZero's duplicate filter left on.
#[derive(Debug, Clone, Default)]
pub struct MappingConfig {
    allow_dupes: bool,
    page_events: bool,
    screen_events: bool,
    audience_traits: HashSet<String>,
    /// `None` means the Segment default, `quantity`.
    quantity_property: Option<String>,
    /// `None` means the Segment default, `description`.
    description_property: Option<String>,
    pub(crate) account_id_keys: Vec<String>,
    pub(crate) contact_id_keys: Vec<String>,
    traits: HashMap<String, FieldRule>,
    group_traits: HashMap<String, FieldRule>,
    custom_fields: HashMap<String, FieldRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    allow_dupes: bool,
    page_events: bool,
    screen_events: bool,
    audience_traits: Vec<Spanned<String>>,
    event_custom_fields: Vec<Spanned<String>>,
    quantity_property: Option<Spanned<String>>,
    description_property: Option<Spanned<String>>,
    ids: RawIds,
    traits: BTreeMap<String, RawTraitRule>,
    group_traits: BTreeMap<String, RawGroupTraitRule>,
    properties: BTreeMap<String, RawPropertyRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawIds {
    account_keys: Vec<Spanned<String>>,
    contact_keys: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraitRule {
    field: Option<Spanned<String>>,
    entity: Option<Spanned<Entity>>,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroupTraitRule {
    field: Option<Spanned<String>>,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPropertyRule {
    field: Option<Spanned<String>>,
}

/// Rule keys may use the dotted path of a nested value; flattened names join
/// with `_`, so both spellings land on the same key.
fn rule_key(key: &str) -> String {
    key.replace('.', "_")
}

fn checked_name(text: &str, what: &str, value: &Spanned<String>) -> Result<String, MappingError> {
    let name = value.get_ref();
    let problem = if name.trim().is_empty() {
        Some(format!("{what} must not be empty"))
    } else if name.chars().any(char::is_whitespace) {
        Some(format!("{what} `{name}` must not contain whitespace"))
    } else {
        None
    };
    match problem {
        Some(message) => Err(MappingError::at(text, Some(value.span().start), message)),
        None => Ok(name.clone()),
    }
}

fn checked_field(text: &str, value: &Spanned<String>) -> Result<String, MappingError> {
    let name = checked_name(text, "field", value)?;
    for prefix in ["attr_", "cf_"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Err(MappingError::at(
                text,
                Some(value.span().start),
                format!(
                    "field `{name}`: give the ChurnZero field name without the `{prefix}` prefix (`{rest}`)"
                ),
            ));
        }
    }
    Ok(name)
}

impl MappingConfig {
    /// Parses a mapping file's text. Unknown keys and wrong types are errors
    /// (a typo must not silently change what reaches ChurnZero), reported with
    /// their line and column.
    pub fn from_toml_str(text: &str) -> Result<Self, MappingError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // Some parser messages span lines; an error is logged as one line.
            let message = e.message().trim_end().replace('\n', "; ");
            let message = match message.strip_prefix("unknown field") {
                Some(rest) => format!("unknown key{rest}"),
                None => message,
            };
            MappingError::at(text, e.span().map(|s| s.start), message)
        })?;

        let mut cfg = MappingConfig {
            allow_dupes: raw.allow_dupes,
            page_events: raw.page_events,
            screen_events: raw.screen_events,
            ..MappingConfig::default()
        };
        for name in &raw.audience_traits {
            cfg.audience_traits
                .insert(checked_name(text, "audience trait", name)?);
        }
        if let Some(p) = &raw.quantity_property {
            cfg.quantity_property = Some(checked_name(text, "quantity_property", p)?);
        }
        if let Some(p) = &raw.description_property {
            cfg.description_property = Some(checked_name(text, "description_property", p)?);
        }
        for key in &raw.ids.account_keys {
            cfg.account_id_keys
                .push(checked_name(text, "account id key", key)?);
        }
        for key in &raw.ids.contact_keys {
            cfg.contact_id_keys
                .push(checked_name(text, "contact id key", key)?);
        }
        for (name, rule) in &raw.traits {
            if let Some(entity) = &rule.entity {
                if *entity.get_ref() == Entity::Account && cfg.audience_traits.contains(name) {
                    return Err(MappingError::at(
                        text,
                        Some(entity.span().start),
                        format!(
                            "trait `{name}` is an audience trait; audience updates are contact attributes and cannot be routed to the account"
                        ),
                    ));
                }
            }
            let field = rule
                .field
                .as_ref()
                .map(|f| checked_field(text, f))
                .transpose()?;
            cfg.traits.insert(
                rule_key(name),
                FieldRule {
                    field,
                    entity: rule.entity.as_ref().map(|e| *e.get_ref()),
                    skip: rule.skip,
                },
            );
        }
        for (name, rule) in &raw.group_traits {
            let field = rule
                .field
                .as_ref()
                .map(|f| checked_field(text, f))
                .transpose()?;
            cfg.group_traits.insert(
                rule_key(name),
                FieldRule {
                    field,
                    entity: None,
                    skip: rule.skip,
                },
            );
        }
        for name in &raw.event_custom_fields {
            let name = checked_name(text, "event custom field", name)?;
            cfg.custom_fields
                .insert(rule_key(&name), FieldRule::default());
        }
        for (name, rule) in &raw.properties {
            let field = rule
                .field
                .as_ref()
                .map(|f| checked_field(text, f))
                .transpose()?;
            cfg.custom_fields.insert(
                rule_key(name),
                FieldRule {
                    field,
                    entity: None,
                    skip: false,
                },
            );
        }
        Ok(cfg)
    }

    /// Reads and parses the `--mapping` file; errors name the file so a
    /// startup failure is actionable.
    pub fn load(path: &Path) -> Result<Self, MappingError> {
        let text = std::fs::read_to_string(path).map_err(|source| MappingError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| e.with_path(path))
    }

    /// Lets the sync lane and the real-time path agree on which traits are
    /// audience membership flags without re-reading the file.
    pub fn is_audience_trait(&self, name: &str) -> bool {
        self.audience_traits.contains(name)
    }

    fn quantity_property(&self) -> &str {
        self.quantity_property.as_deref().unwrap_or("quantity")
    }

    fn description_property(&self) -> &str {
        self.description_property
            .as_deref()
            .unwrap_or("description")
    }

    /// Flattened names of the traits that carry ids and so are never sent as
    /// attributes.
    fn is_id_key(&self, flat_name: &str) -> bool {
        ACCOUNT_ID_KEYS.contains(&flat_name)
            || CONTACT_ID_KEYS.contains(&flat_name)
            || self
                .account_id_keys
                .iter()
                .chain(&self.contact_id_keys)
                .any(|k| rule_key(k) == flat_name)
    }
}

/// The members of an event's `context` that mapping and identity resolution
/// read: `context.traits` (ids and, for identify, nothing else),
/// `context.groupId` (the account) and `context.personas` (Engage
/// audiences). Keep it in step with every `get("context")` in this crate's
/// delivery path; `a_payload_read_for_mapping_maps_as_the_whole_payload`
/// fails when a read is added without its key.
const CONTEXT_KEYS_READ: [&str; 3] = ["traits", "groupId", "personas"];

/// Reads a stored payload for [`map_event`] and identity resolution, keeping
/// of `context` only what they read ([`CONTEXT_KEYS_READ`]). A browser or
/// mobile library's context (library, page, user agent, device, OS, screen,
/// campaign, ...) is most of a payload's keys, and building a `Value` costs
/// a hashed insert per key: parsing was two fifths of the forwarder's CPU
/// per delivered event, and a delivery reads every payload once. The rest of
/// the event is read in full and in order, so every mapping is the same as
/// from the whole payload. A `context` that is not an object reads as
/// `null` (nothing was ever found in one).
pub fn parse_for_mapping(payload: &str) -> serde_json::Result<Value> {
    use serde::de::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(payload);
    let value = match (&mut de).deserialize_any(EventVisitor) {
        Ok(v) => v,
        // Not an object at all: read it as it is, so that the caller sees
        // the same value (and the same reason to refuse it) as before.
        Err(e) if e.is_data() => return serde_json::from_str(payload),
        Err(e) => return Err(e),
    };
    de.end()?;
    Ok(value)
}

/// Top level of an event: every member read in full except `context`.
struct EventVisitor;

impl<'de> serde::de::Visitor<'de> for EventVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == "context" {
                map.next_value_seed(ContextSeed)?
            } else {
                map.next_value::<Value>()?
            };
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// `context`: the members in [`CONTEXT_KEYS_READ`], in their order; every
/// other member is skipped without being built.
struct ContextSeed;

impl<'de> serde::de::DeserializeSeed<'de> for ContextSeed {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ContextSeed {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if CONTEXT_KEYS_READ.contains(&key.as_ref()) {
                out.insert(key.into_owned(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

pub(crate) fn event_type(event: &Value) -> &str {
    event.get("type").and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn object<'a>(event: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    event.get(key).and_then(Value::as_object)
}

pub(crate) fn context_traits(event: &Value) -> Option<&Map<String, Value>> {
    event
        .get("context")
        .and_then(|c| c.get("traits"))
        .and_then(Value::as_object)
}

/// Looks a key up literally, then as a dotted path into nested objects.
pub(crate) fn lookup<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(key) {
        return Some(v);
    }
    if !key.contains('.') {
        return None;
    }
    let mut parts = key.split('.');
    let mut current = obj.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

pub(crate) fn id_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Normalises a timestamp to the one form sent as `eventDate`:
/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC. Exposed so other code that needs the
/// same instant in the same form (logs, the mock) does not re-derive it.
/// Returns `None` when the text is not a date.
pub fn normalize_timestamp(text: &str) -> Option<String> {
    let text = text.trim();
    let utc = if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        dt.with_timezone(&Utc)
    } else {
        ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())?
            .and_utc()
    };
    Some(utc.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

fn event_date(event: &Value) -> Option<Value> {
    ["timestamp", "receivedAt", "originalTimestamp"]
        .iter()
        .find_map(|k| event.get(*k).and_then(Value::as_str))
        .map(|s| Value::String(normalize_timestamp(s).unwrap_or_else(|| s.to_string())))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The value ChurnZero gets for a leaf: scalars keep their JSON type, arrays
/// of scalars become a multi-select string, anything else is not sendable.
fn attribute_value(v: &Value) -> Option<Value> {
    match v {
        Value::Null | Value::Object(_) => None,
        Value::Bool(_) | Value::Number(_) | Value::String(_) => Some(v.clone()),
        Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::Null => {}
                    Value::Array(_) | Value::Object(_) => return None,
                    scalar => parts.extend(scalar_text(scalar)),
                }
            }
            Some(Value::String(parts.join(", ")))
        }
    }
}

fn quantity_value(v: &Value) -> Option<Value> {
    match v {
        Value::Number(_) => Some(v.clone()),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                Some(Value::from(i))
            } else if let Ok(u) = s.parse::<u64>() {
                Some(Value::from(u))
            } else {
                // `f64::from_str` also accepts "inf" and "NaN"; from_f64
                // refuses them, as JSON has no such numbers.
                let f = s.parse::<f64>().ok()?;
                serde_json::Number::from_f64(f).map(Value::Number)
            }
        }
        _ => None,
    }
}

fn description_value(v: &Value) -> Option<Value> {
    let text = scalar_text(v)?;
    let cut = match text.char_indices().nth(DESCRIPTION_MAX_CHARS) {
        Some((byte, _)) => text[..byte].to_string(),
        None => text,
    };
    Some(Value::String(cut))
}

/// Calls `f(path, leaf)` for every non-object value under `obj`, in the
/// object's own order, so output order follows input order.
fn walk_leaves<'a>(
    obj: &'a Map<String, Value>,
    path: &mut Vec<&'a str>,
    f: &mut dyn FnMut(&[&'a str], &'a Value),
) {
    for (key, value) in obj {
        path.push(key);
        match value {
            Value::Object(inner) => walk_leaves(inner, path, f),
            leaf => f(path, leaf),
        }
        path.pop();
    }
}

/// The most specific rule for a flattened path: its own, else its nearest
/// enclosing object's. Returns the rule and how many path segments it covers.
fn find_rule<'r>(
    rules: &'r HashMap<String, FieldRule>,
    path: &[&str],
) -> Option<(&'r FieldRule, usize)> {
    if rules.is_empty() {
        return None;
    }
    (1..=path.len())
        .rev()
        .find_map(|cut| rules.get(&path[..cut].join("_")).map(|r| (r, cut)))
}

/// Where one leaf goes and under which name.
struct Target {
    name: String,
    entity: Option<Entity>,
    /// The name came from a `field` rule and is used exactly as written.
    explicit: bool,
}

/// Applies a rule (if any) to a flattened path; `None` means skip.
fn target(rules: &HashMap<String, FieldRule>, path: &[&str]) -> Option<Target> {
    let flat = path.join("_");
    match find_rule(rules, path) {
        None => Some(Target {
            name: flat,
            entity: None,
            explicit: false,
        }),
        Some((rule, _)) if rule.skip => None,
        Some((rule, cut)) => {
            let name = match &rule.field {
                Some(field) if cut == path.len() => field.clone(),
                Some(field) => format!("{field}_{}", path[cut..].join("_")),
                None => flat,
            };
            Some(Target {
                name,
                entity: rule.entity,
                explicit: rule.field.is_some(),
            })
        }
    }
}

fn normalized(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Gives a default-named attribute the standard spelling of its entity's
/// field when it matches one, so `first_name` and `firstName` both reach
/// ChurnZero's `FirstName` instead of creating a custom attribute.
fn standard_name(entity: Entity, name: String) -> String {
    let key = normalized(&name);
    let fields: &[&str] = match entity {
        Entity::Account => {
            if let Some((_, field)) = ACCOUNT_ADDRESS_FIELDS.iter().find(|(k, _)| *k == key) {
                return (*field).to_string();
            }
            &STANDARD_ACCOUNT_FIELDS
        }
        Entity::Contact => &STANDARD_CONTACT_FIELDS,
    };
    match fields.iter().find(|f| f.to_lowercase() == key) {
        Some(field) => (*field).to_string(),
        None => name,
    }
}

fn attr_key(entity: Entity, target: Target) -> String {
    let name = if target.explicit {
        target.name
    } else {
        standard_name(entity, target.name)
    };
    format!("attr_{name}")
}

fn base_action(action: &str, account: &str, contact: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("action".into(), Value::from(action));
    m.insert("accountExternalId".into(), Value::from(account));
    m.insert("contactExternalId".into(), Value::from(contact));
    m
}

fn set_attribute_action(
    entity: Entity,
    account: &str,
    contact: &str,
    attrs: Map<String, Value>,
) -> Map<String, Value> {
    let mut m = base_action("setAttribute", account, contact);
    m.insert("entity".into(), Value::from(entity.as_str()));
    m.extend(attrs);
    m
}

/// Traits of this identify that belong to the sync lane.
fn audience_names(cfg: &MappingConfig, event: &Value) -> HashSet<String> {
    let mut names = HashSet::new();
    if event_type(event) != "identify" {
        return names;
    }
    let personas = event.get("context").and_then(|c| c.get("personas"));
    if let Some(personas) = personas {
        let is_audience =
            personas.get("computation_class").and_then(Value::as_str) == Some("audience");
        if let (true, Some(key)) = (
            is_audience,
            personas.get("computation_key").and_then(Value::as_str),
        ) {
            names.insert(key.to_string());
        }
    }
    if let Some(traits) = object(event, "traits") {
        names.extend(traits.keys().filter(|k| cfg.is_audience_trait(k)).cloned());
    }
    names
}

fn track_action(
    cfg: &MappingConfig,
    event: &Value,
    ids: &Ids,
    event_name: String,
) -> Map<String, Value> {
    let mut m = base_action("trackEvent", &ids.account, &ids.contact);
    m.insert("eventName".into(), Value::String(event_name));
    if let Some(date) = event_date(event) {
        m.insert("eventDate".into(), date);
    }
    if let Some(props) = object(event, "properties") {
        if let Some(d) = lookup(props, cfg.description_property()).and_then(description_value) {
            m.insert("description".into(), d);
        }
        if let Some(q) = lookup(props, cfg.quantity_property()).and_then(quantity_value) {
            m.insert("quantity".into(), q);
        }
        if !cfg.custom_fields.is_empty() {
            walk_leaves(props, &mut Vec::new(), &mut |path, leaf| {
                if find_rule(&cfg.custom_fields, path).is_none() {
                    return;
                }
                let (Some(t), Some(v)) = (target(&cfg.custom_fields, path), attribute_value(leaf))
                else {
                    return;
                };
                if !t.name.is_empty() {
                    m.insert(format!("cf_{}", t.name), v);
                }
            });
        }
    }
    if cfg.allow_dupes {
        m.insert("allowDupes".into(), Value::Bool(true));
    }
    m
}

fn view_name(event: &Value) -> Option<String> {
    let non_empty = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    non_empty(event.get("name"))
        .or_else(|| non_empty(object(event, "properties").and_then(|p| p.get("name"))))
}

fn identify_actions(cfg: &MappingConfig, event: &Value, ids: &Ids) -> Vec<Map<String, Value>> {
    let Some(traits) = object(event, "traits") else {
        return Vec::new();
    };
    let audience = audience_names(cfg, event);
    let special = |name: &str| (name == "id" || name == "name") && !cfg.traits.contains_key(name);
    let mut contact = Map::new();
    let mut account = Map::new();
    walk_leaves(traits, &mut Vec::new(), &mut |path, leaf| {
        let top = path[0];
        let flat = path.join("_");
        if audience.contains(top) || cfg.is_id_key(&flat) || (path.len() == 1 && special(top)) {
            return;
        }
        let (Some(t), Some(v)) = (target(&cfg.traits, path), attribute_value(leaf)) else {
            return;
        };
        if t.name.is_empty() {
            return;
        }
        let entity = t.entity.unwrap_or(Entity::Contact);
        let key = attr_key(entity, t);
        match entity {
            Entity::Contact => contact.insert(key, v),
            Entity::Account => account.insert(key, v),
        };
    });
    if special("name") && !audience.contains("name") {
        if let Some(name) = traits.get("name").and_then(Value::as_str) {
            let name = name.trim();
            let (first, last) = match name.split_once(char::is_whitespace) {
                Some((first, last)) => (first, last.trim()),
                None => (name, ""),
            };
            for (key, part) in [("attr_FirstName", first), ("attr_LastName", last)] {
                if !part.is_empty() && !contact.contains_key(key) {
                    contact.insert(key.to_string(), Value::from(part));
                }
            }
        }
    }
    let mut out = Vec::new();
    if !account.is_empty() {
        out.push(set_attribute_action(
            Entity::Account,
            &ids.account,
            &ids.contact,
            account,
        ));
    }
    if !contact.is_empty() {
        out.push(set_attribute_action(
            Entity::Contact,
            &ids.account,
            &ids.contact,
            contact,
        ));
    }
    out
}

fn group_actions(cfg: &MappingConfig, event: &Value, ids: &Ids) -> Vec<Map<String, Value>> {
    let Some(traits) = object(event, "traits") else {
        return Vec::new();
    };
    let mut attrs = Map::new();
    walk_leaves(traits, &mut Vec::new(), &mut |path, leaf| {
        let flat = path.join("_");
        if cfg.is_id_key(&flat)
            || (path.len() == 1 && path[0] == "id" && !cfg.group_traits.contains_key("id"))
        {
            return;
        }
        let (Some(t), Some(v)) = (target(&cfg.group_traits, path), attribute_value(leaf)) else {
            return;
        };
        if !t.name.is_empty() {
            attrs.insert(attr_key(Entity::Account, t), v);
        }
    });
    if attrs.is_empty() {
        return Vec::new();
    }
    let account = event
        .get("groupId")
        .and_then(id_value)
        .unwrap_or_else(|| ids.account.clone());
    vec![set_attribute_action(
        Entity::Account,
        &account,
        &ids.contact,
        attrs,
    )]
}

/// The ChurnZero actions for one event, in the order they must be sent. Pure
/// and deterministic so every delivery attempt sends the same bytes. The
/// `appKey` is left to the HTTP client so it is never stored.
pub fn map_event(cfg: &MappingConfig, event: &Value, ids: &Ids) -> Vec<Map<String, Value>> {
    match event_type(event) {
        "track" => match event.get("event").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => {
                vec![track_action(cfg, event, ids, name.to_string())]
            }
            _ => Vec::new(),
        },
        "page" if cfg.page_events => {
            let name = match view_name(event) {
                Some(n) => format!("Viewed {n} Page"),
                None => "Viewed Page".to_string(),
            };
            vec![track_action(cfg, event, ids, name)]
        }
        "screen" if cfg.screen_events => {
            let name = match view_name(event) {
                Some(n) => format!("Viewed {n} Screen"),
                None => "Viewed Screen".to_string(),
            };
            vec![track_action(cfg, event, ids, name)]
        }
        "identify" => identify_actions(cfg, event, ids),
        "group" => group_actions(cfg, event, ids),
        _ => Vec::new(),
    }
}

/// Engage audience membership changes carried by an identify, split out so
/// the sync lane can coalesce them per contact and skip unchanged values
/// instead of sending every recomputation in real time.
///
/// Each pair is (`attr_<Field>` key exactly as it appears in a contact
/// `setAttribute` action, value); [`audience_action`] builds that action.
/// Renames and skips from the mapping file's `[traits]` apply; the entity is
/// always the contact.
pub fn audience_updates(cfg: &MappingConfig, event: &Value) -> Vec<(String, Value)> {
    let audience = audience_names(cfg, event);
    let Some(traits) = object(event, "traits") else {
        return Vec::new();
    };
    traits
        .iter()
        .filter(|(name, _)| audience.contains(name.as_str()))
        .filter_map(|(name, value)| {
            let t = target(&cfg.traits, &[name.as_str()])?;
            let v = attribute_value(value)?;
            Some((attr_key(Entity::Contact, t), v))
        })
        .collect()
}

/// The contact `setAttribute` for a set of audience updates (as returned by
/// [`audience_updates`], possibly merged across events), so the sync lane
/// sends exactly the shape the real-time path would.
pub fn audience_action(ids: &Ids, updates: &[(String, Value)]) -> Map<String, Value> {
    let attrs = updates
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    set_attribute_action(Entity::Contact, &ids.account, &ids.contact, attrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids() -> Ids {
        Ids {
            account: "acc-1".into(),
            contact: "con-1".into(),
        }
    }

    fn cfg(text: &str) -> MappingConfig {
        MappingConfig::from_toml_str(text).expect("valid mapping file")
    }

    /// Compares the serialised bytes, so key order (and with it payload
    /// stability) is part of every golden test.
    fn assert_actions(cfg: &MappingConfig, event: Value, expected: Value) {
        let actions = Value::Array(
            map_event(cfg, &event, &ids())
                .into_iter()
                .map(Value::Object)
                .collect(),
        );
        assert_eq!(
            serde_json::to_string_pretty(&actions).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        );
    }

    fn err(text: &str) -> String {
        MappingConfig::from_toml_str(text)
            .expect_err("mapping file should be refused")
            .to_string()
    }

    // ---- track ----

    #[test]
    fn track_basic() {
        assert_actions(
            &MappingConfig::default(),
            json!({
                "type": "track", "userId": "u1", "messageId": "m1",
                "event": "Report Exported",
                "timestamp": "2026-11-28T21:36:24.123456+02:00",
                "properties": {"quantity": 3, "description": "Q3 revenue", "format": "pdf"}
            }),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Report Exported",
                "eventDate": "2026-11-28T19:36:24.123Z",
                "description": "Q3 revenue",
                "quantity": 3
            }]),
        );
    }

    #[test]
    fn track_without_properties() {
        assert_actions(
            &MappingConfig::default(),
            json!({"type": "track", "userId": "u1", "event": "Logged In",
                   "timestamp": "2026-01-02T03:04:05Z"}),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Logged In",
                "eventDate": "2026-01-02T03:04:05.000Z"
            }]),
        );
    }

    #[test]
    fn event_date_forms() {
        assert_eq!(
            normalize_timestamp("2026-11-28T19:36:24Z").as_deref(),
            Some("2026-11-28T19:36:24.000Z")
        );
        // Truncated, never rounded: rounding .9999 up would change the second.
        assert_eq!(
            normalize_timestamp("2026-11-28T19:36:24.9999999Z").as_deref(),
            Some("2026-11-28T19:36:24.999Z")
        );
        assert_eq!(
            normalize_timestamp("2026-11-28T19:36:24.5-05:30").as_deref(),
            Some("2026-11-29T01:06:24.500Z")
        );
        assert_eq!(
            normalize_timestamp("2026-11-28T19:36:24.12").as_deref(),
            Some("2026-11-28T19:36:24.120Z")
        );
        assert_eq!(
            normalize_timestamp("2026-11-28 19:36:24").as_deref(),
            Some("2026-11-28T19:36:24.000Z")
        );
        assert_eq!(normalize_timestamp("yesterday"), None);
    }

    #[test]
    fn event_date_is_stable_and_falls_back() {
        let cfg = MappingConfig::default();
        let event = json!({"type": "track", "userId": "u", "event": "E",
                           "timestamp": "2026-11-28T19:36:24.1234+00:00"});
        let first = map_event(&cfg, &event, &ids());
        for _ in 0..3 {
            assert_eq!(map_event(&cfg, &event, &ids()), first);
        }
        assert_eq!(first[0]["eventDate"], json!("2026-11-28T19:36:24.123Z"));

        let unparsable = json!({"type": "track", "userId": "u", "event": "E",
                                "timestamp": "not a date"});
        assert_eq!(
            map_event(&cfg, &unparsable, &ids())[0]["eventDate"],
            json!("not a date")
        );

        let received = json!({"type": "track", "userId": "u", "event": "E",
                              "receivedAt": "2026-11-28T19:36:24Z"});
        assert_eq!(
            map_event(&cfg, &received, &ids())[0]["eventDate"],
            json!("2026-11-28T19:36:24.000Z")
        );
    }

    #[test]
    fn track_long_multibyte_description_is_cut_at_255_chars() {
        // 300 two-byte characters followed by a four-byte one: a byte cut
        // would panic or split a character.
        let long: String = "é".repeat(300) + "🎉";
        let event = json!({"type": "track", "userId": "u", "event": "Note Added",
                           "timestamp": "2026-11-28T19:36:24.123Z",
                           "properties": {"description": long}});
        let actions = map_event(&MappingConfig::default(), &event, &ids());
        let d = actions[0]["description"].as_str().unwrap();
        assert_eq!(d.chars().count(), 255);
        assert_eq!(d, "é".repeat(255));

        let exact: String = "🎉".repeat(255);
        let event = json!({"type": "track", "userId": "u", "event": "E",
                           "properties": {"description": exact.clone()}});
        assert_eq!(
            map_event(&MappingConfig::default(), &event, &ids())[0]["description"],
            json!(exact)
        );
    }

    #[test]
    fn track_description_non_string() {
        let cfg = MappingConfig::default();
        let with = |d: Value| {
            let event = json!({"type": "track", "userId": "u", "event": "E",
                               "properties": {"description": d}});
            map_event(&cfg, &event, &ids())[0]
                .get("description")
                .cloned()
        };
        assert_eq!(with(json!(42)), Some(json!("42")));
        assert_eq!(with(json!(true)), Some(json!("true")));
        assert_eq!(with(json!({"a": 1})), None);
        assert_eq!(with(json!(["a"])), None);
        assert_eq!(with(Value::Null), None);
    }

    #[test]
    fn track_quantity_rules() {
        let cfg = MappingConfig::default();
        let with = |q: Value| {
            let event = json!({"type": "track", "userId": "u", "event": "E",
                               "properties": {"quantity": q}});
            let actions = map_event(&cfg, &event, &ids());
            assert_eq!(actions.len(), 1, "the event is sent either way");
            actions[0].get("quantity").cloned()
        };
        assert_eq!(with(json!(2)), Some(json!(2)));
        assert_eq!(with(json!(2.5)), Some(json!(2.5)));
        assert_eq!(with(json!(-1)), Some(json!(-1)));
        assert_eq!(with(json!("3")), Some(json!(3)));
        assert_eq!(with(json!(" 2.5 ")), Some(json!(2.5)));
        assert_eq!(with(json!("18446744073709551615")), Some(json!(u64::MAX)));
        assert_eq!(with(json!("lots")), None);
        assert_eq!(with(json!("")), None);
        assert_eq!(with(json!("NaN")), None);
        assert_eq!(with(json!("inf")), None);
        assert_eq!(with(json!("1e400")), None);
        assert_eq!(with(json!(true)), None);
        assert_eq!(with(json!([1])), None);
        assert_eq!(with(Value::Null), None);
    }

    #[test]
    fn track_custom_fields_renames_and_allow_dupes() {
        let cfg = cfg(r#"
            allow_dupes = true
            event_custom_fields = ["plan", "seats", "tags", "order", "missing", "revenue"]
            [properties]
            revenue = { field = "Revenue" }
            "cart.total" = { field = "CartTotal" }
        "#);
        assert_actions(
            &cfg,
            json!({
                "type": "track", "userId": "u", "event": "Order Completed",
                "timestamp": "2026-11-28T19:36:24.123Z",
                "properties": {
                    "plan": "pro", "seats": 12, "revenue": 99.5, "tags": ["a", "b", null, 3],
                    "order": {"id": "o-1", "express": true},
                    "cart": {"total": 10, "items": 2},
                    "ignored": "not configured",
                    "quantity": "2"
                }
            }),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Order Completed",
                "eventDate": "2026-11-28T19:36:24.123Z",
                "quantity": 2,
                "cf_plan": "pro",
                "cf_seats": 12,
                "cf_Revenue": 99.5,
                "cf_tags": "a, b, 3",
                "cf_order_id": "o-1",
                "cf_order_express": true,
                "cf_CartTotal": 10,
                "allowDupes": true
            }]),
        );
    }

    #[test]
    fn custom_field_with_alternative_quantity_and_description_properties() {
        let cfg = cfg(r#"
            quantity_property = "count"
            description_property = "details.summary"
        "#);
        assert_actions(
            &cfg,
            json!({"type": "track", "userId": "u", "event": "Files Uploaded",
                   "timestamp": "2026-11-28T19:36:24.123Z",
                   "properties": {"count": 4, "quantity": 9,
                                  "details": {"summary": "four files"}}}),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Files Uploaded",
                "eventDate": "2026-11-28T19:36:24.123Z",
                "description": "four files",
                "quantity": 4
            }]),
        );
    }

    // ---- page / screen ----

    #[test]
    fn page_and_screen_are_off_by_default() {
        let cfg = MappingConfig::default();
        for ty in ["page", "screen"] {
            let event = json!({"type": ty, "userId": "u", "name": "Home",
                               "timestamp": "2026-11-28T19:36:24.123Z"});
            assert!(map_event(&cfg, &event, &ids()).is_empty());
        }
    }

    #[test]
    fn page_on() {
        let cfg = cfg("page_events = true\nallow_dupes = true");
        assert_actions(
            &cfg,
            json!({"type": "page", "userId": "u", "name": "Pricing",
                   "timestamp": "2026-11-28T19:36:24.123Z",
                   "properties": {"url": "https://example.com/pricing", "title": "Pricing"}}),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Viewed Pricing Page",
                "eventDate": "2026-11-28T19:36:24.123Z",
                "allowDupes": true
            }]),
        );
        // Screen stays off when only pages are on.
        let screen = json!({"type": "screen", "userId": "u", "name": "Home"});
        assert!(map_event(&cfg, &screen, &ids()).is_empty());
    }

    #[test]
    fn screen_on_and_name_fallbacks() {
        let cfg = cfg("screen_events = true\npage_events = true");
        assert_actions(
            &cfg,
            json!({"type": "screen", "userId": "u", "name": "Settings",
                   "timestamp": "2026-11-28T19:36:24Z"}),
            json!([{
                "action": "trackEvent",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "eventName": "Viewed Settings Screen",
                "eventDate": "2026-11-28T19:36:24.000Z"
            }]),
        );
        let name_of = |event: Value| {
            map_event(&cfg, &event, &ids())[0]["eventName"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            name_of(json!({"type": "page", "userId": "u", "properties": {"name": "Docs"}})),
            "Viewed Docs Page"
        );
        assert_eq!(
            name_of(json!({"type": "page", "userId": "u", "name": ""})),
            "Viewed Page"
        );
        assert_eq!(
            name_of(json!({"type": "screen", "userId": "u"})),
            "Viewed Screen"
        );
    }

    // ---- identify ----

    #[test]
    fn identify_basic_with_nested_arrays_booleans() {
        assert_actions(
            &MappingConfig::default(),
            json!({
                "type": "identify", "userId": "u1", "messageId": "m1",
                "timestamp": "2026-11-28T19:36:24.123Z",
                "traits": {
                    "accountExternalId": "acc-1",
                    "contactExternalId": "con-1",
                    "id": "u1",
                    "firstName": "Ada",
                    "lastName": "Lovelace",
                    "email": "ada@example.com",
                    "age": 36,
                    "score": 4.5,
                    "isAdmin": true,
                    "beta": false,
                    "createdAt": "2026-01-01T00:00:00Z",
                    "phone": null,
                    "roles": ["admin", "billing"],
                    "lucky": [7, 13],
                    "empty": [],
                    "complex": [{"a": 1}],
                    "address": {"city": "London", "postalCode": "NW1", "geo": {"lat": 51.5}},
                    "company": {"id": "c-9", "name": "Analytical Engines", "employee_count": 12}
                }
            }),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_FirstName": "Ada",
                "attr_LastName": "Lovelace",
                "attr_Email": "ada@example.com",
                "attr_age": 36,
                "attr_score": 4.5,
                "attr_isAdmin": true,
                "attr_beta": false,
                "attr_createdAt": "2026-01-01T00:00:00Z",
                "attr_roles": "admin, billing",
                "attr_lucky": "7, 13",
                "attr_empty": "",
                "attr_address_city": "London",
                "attr_address_postalCode": "NW1",
                "attr_address_geo_lat": 51.5,
                "attr_company_id": "c-9",
                "attr_company_name": "Analytical Engines",
                "attr_company_employee_count": 12
            }]),
        );
    }

    #[test]
    fn identify_standard_spellings() {
        assert_actions(
            &MappingConfig::default(),
            json!({"type": "identify", "userId": "u",
                   "traits": {"first_name": "Grace", "LAST_NAME": "Hopper", "EMAIL": "g@example.com",
                              "account_external_id": "x", "contactExternalID": "y"}}),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_FirstName": "Grace",
                "attr_LastName": "Hopper",
                "attr_Email": "g@example.com"
            }]),
        );
    }

    #[test]
    fn identify_name_is_split_when_first_and_last_are_absent() {
        let contact = |traits: Value| {
            let event = json!({"type": "identify", "userId": "u", "traits": traits});
            map_event(&MappingConfig::default(), &event, &ids())
                .pop()
                .map(Value::Object)
        };
        assert_eq!(
            contact(json!({"name": "Ada King Lovelace"})),
            Some(
                json!({"action": "setAttribute", "accountExternalId": "acc-1",
                        "contactExternalId": "con-1", "entity": "contact",
                        "attr_FirstName": "Ada", "attr_LastName": "King Lovelace"})
            )
        );
        assert_eq!(
            contact(json!({"name": "Ada Lovelace", "firstName": "Augusta"})),
            Some(
                json!({"action": "setAttribute", "accountExternalId": "acc-1",
                        "contactExternalId": "con-1", "entity": "contact",
                        "attr_FirstName": "Augusta", "attr_LastName": "Lovelace"})
            )
        );
        assert_eq!(
            contact(json!({"name": "Cher"})),
            Some(
                json!({"action": "setAttribute", "accountExternalId": "acc-1",
                        "contactExternalId": "con-1", "entity": "contact",
                        "attr_FirstName": "Cher"})
            )
        );
        assert_eq!(contact(json!({"name": "  "})), None);

        // A rule for `name` turns the split off and sends it as configured.
        let cfg = cfg(r#"traits.name = { field = "FullName" }"#);
        let event = json!({"type": "identify", "userId": "u", "traits": {"name": "Ada Lovelace"}});
        assert_eq!(
            map_event(&cfg, &event, &ids())[0].get("attr_FullName"),
            Some(&json!("Ada Lovelace"))
        );
    }

    #[test]
    fn identify_with_nothing_to_set() {
        let cfg = MappingConfig::default();
        for traits in [
            json!(null),
            json!({}),
            json!({"accountExternalId": "a", "contactExternalId": "c", "id": "u", "gone": null}),
        ] {
            let event = json!({"type": "identify", "userId": "u", "traits": traits});
            assert!(map_event(&cfg, &event, &ids()).is_empty(), "{traits}");
        }
        let no_traits = json!({"type": "identify", "userId": "u"});
        assert!(map_event(&cfg, &no_traits, &ids()).is_empty());
    }

    #[test]
    fn identify_mapping_renames_routes_and_skips() {
        let cfg = cfg(r#"
            [traits]
            plan = { field = "PlanName", entity = "account" }
            company_name = { field = "Name", entity = "account" }
            "company.plan" = { entity = "account" }
            isActive = { entity = "account" }
            internal_score = { skip = true }
            address = { field = "Home" }
            "address.country" = { field = "Country" }
            nickname = { field = "Nick_Name", entity = "contact" }
            debug = { skip = true }
        "#);
        assert_actions(
            &cfg,
            json!({
                "type": "identify", "userId": "u",
                "traits": {
                    "email": "ada@example.com",
                    "plan": "enterprise",
                    "isActive": true,
                    "internal_score": 99,
                    "nickname": "Ada",
                    "company": {"name": "Engines Ltd", "plan": "gold", "id": 7},
                    "address": {"city": "London", "country": "UK"},
                    "debug": {"a": 1, "b": 2}
                }
            }),
            json!([
                {
                    "action": "setAttribute",
                    "accountExternalId": "acc-1",
                    "contactExternalId": "con-1",
                    "entity": "account",
                    "attr_PlanName": "enterprise",
                    "attr_IsActive": true,
                    "attr_Name": "Engines Ltd",
                    "attr_company_plan": "gold"
                },
                {
                    "action": "setAttribute",
                    "accountExternalId": "acc-1",
                    "contactExternalId": "con-1",
                    "entity": "contact",
                    "attr_Email": "ada@example.com",
                    "attr_Nick_Name": "Ada",
                    "attr_company_id": 7,
                    "attr_Home_city": "London",
                    "attr_Country": "UK"
                }
            ]),
        );
    }

    #[test]
    fn identify_whole_object_routed_to_account_uses_billing_address() {
        let cfg = cfg(r#"traits.address = { entity = "account" }"#);
        assert_actions(
            &cfg,
            json!({"type": "identify", "userId": "u",
                   "traits": {"address": {"street": "1 Main St", "city": "Springfield",
                                          "state": "IL", "postalCode": "62701",
                                          "country": "US", "unit": "4B"}}}),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "account",
                "attr_BillingAddressLine1": "1 Main St",
                "attr_BillingAddressCity": "Springfield",
                "attr_BillingAddressState": "IL",
                "attr_BillingAddressZip": "62701",
                "attr_BillingAddressCountry": "US",
                "attr_address_unit": "4B"
            }]),
        );
    }

    #[test]
    fn configured_id_keys_are_not_attributes() {
        let cfg = cfg(r#"
            [ids]
            account_keys = ["company.id"]
            contact_keys = ["email"]
        "#);
        assert_actions(
            &cfg,
            json!({"type": "identify", "userId": "u",
                   "traits": {"email": "a@example.com", "company": {"id": "c1", "name": "C"},
                              "title": "CTO"}}),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_company_name": "C",
                "attr_title": "CTO"
            }]),
        );
    }

    // ---- audiences ----

    #[test]
    fn engage_audience_is_split_out() {
        let cfg = MappingConfig::default();
        let event = json!({
            "type": "identify", "userId": "u",
            "traits": {"power_users": true, "email": "p@example.com"},
            "context": {"personas": {"computation_class": "audience",
                                      "computation_key": "power_users",
                                      "computation_id": "aud_1", "space_id": "spa_1"}}
        });
        assert_eq!(
            audience_updates(&cfg, &event),
            vec![("attr_power_users".to_string(), json!(true))]
        );
        assert_actions(
            &cfg,
            event,
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_Email": "p@example.com"
            }]),
        );

        // An exit from the audience, with nothing else: only the sync lane acts.
        let exit = json!({
            "type": "identify", "userId": "u",
            "traits": {"power_users": false},
            "context": {"personas": {"computation_class": "audience",
                                      "computation_key": "power_users"}}
        });
        assert_eq!(
            audience_updates(&cfg, &exit),
            vec![("attr_power_users".to_string(), json!(false))]
        );
        assert!(map_event(&cfg, &exit, &ids()).is_empty());
    }

    #[test]
    fn computed_traits_are_not_audiences() {
        let cfg = MappingConfig::default();
        let event = json!({
            "type": "identify", "userId": "u",
            "traits": {"logins_30d": 12},
            "context": {"personas": {"computation_class": "trait",
                                      "computation_key": "logins_30d"}}
        });
        assert!(audience_updates(&cfg, &event).is_empty());
        assert_eq!(
            map_event(&cfg, &event, &ids())[0]["attr_logins_30d"],
            json!(12)
        );
    }

    #[test]
    fn configured_audience_traits_with_rename() {
        let cfg = cfg(r#"
            audience_traits = ["order_completed_last_30days", "churn_risk"]
            [traits]
            churn_risk = { field = "ChurnRisk" }
        "#);
        assert!(cfg.is_audience_trait("churn_risk"));
        assert!(!cfg.is_audience_trait("email"));
        let event = json!({
            "type": "identify", "userId": "u",
            "traits": {"churn_risk": true, "order_completed_last_30days": false,
                       "plan": "pro", "unrelated_null": null}
        });
        let updates = audience_updates(&cfg, &event);
        assert_eq!(
            updates,
            vec![
                ("attr_ChurnRisk".to_string(), json!(true)),
                ("attr_order_completed_last_30days".to_string(), json!(false)),
            ]
        );
        assert_actions(
            &cfg,
            event,
            json!([{
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_plan": "pro"
            }]),
        );
        assert_eq!(
            Value::Object(audience_action(&ids(), &updates)),
            json!({
                "action": "setAttribute",
                "accountExternalId": "acc-1",
                "contactExternalId": "con-1",
                "entity": "contact",
                "attr_ChurnRisk": true,
                "attr_order_completed_last_30days": false
            })
        );
        // Only identify calls carry audience updates.
        let track = json!({"type": "track", "userId": "u", "event": "E",
                           "properties": {"churn_risk": true}});
        assert!(audience_updates(&cfg, &track).is_empty());
    }

    // ---- group ----

    #[test]
    fn group_maps_reserved_traits_to_account_fields() {
        assert_actions(
            &MappingConfig::default(),
            json!({
                "type": "group", "userId": "u", "groupId": "grp-42",
                "timestamp": "2026-11-28T19:36:24.123Z",
                "traits": {
                    "id": "grp-42",
                    "name": "Initech",
                    "industry": "Software",
                    "employees": 250,
                    "plan": "Enterprise",
                    "website": "https://initech.example",
                    "licenseCount": 40,
                    "next_renewal_date": "2027-01-01",
                    "isActive": true,
                    "modules": ["crm", "billing"],
                    "address": {"street": "1 Loop", "city": "Austin", "state": "TX",
                                "postalCode": "78701", "country": "US"},
                    "accountExternalId": "ignored"
                }
            }),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "grp-42",
                "contactExternalId": "con-1",
                "entity": "account",
                "attr_Name": "Initech",
                "attr_industry": "Software",
                "attr_employees": 250,
                "attr_plan": "Enterprise",
                "attr_website": "https://initech.example",
                "attr_LicenseCount": 40,
                "attr_NextRenewalDate": "2027-01-01",
                "attr_IsActive": true,
                "attr_modules": "crm, billing",
                "attr_BillingAddressLine1": "1 Loop",
                "attr_BillingAddressCity": "Austin",
                "attr_BillingAddressState": "TX",
                "attr_BillingAddressZip": "78701",
                "attr_BillingAddressCountry": "US"
            }]),
        );
    }

    #[test]
    fn group_traits_renames_and_skips() {
        let cfg = cfg(r#"
            [traits]
            plan = { field = "NotForGroups" }
            [group_traits]
            employees = { field = "EmployeeCount" }
            plan = { skip = true }
        "#);
        assert_actions(
            &cfg,
            json!({"type": "group", "userId": "u", "groupId": "g",
                   "traits": {"name": "Initech", "employees": 250, "plan": "x"}}),
            json!([{
                "action": "setAttribute",
                "accountExternalId": "g",
                "contactExternalId": "con-1",
                "entity": "account",
                "attr_Name": "Initech",
                "attr_EmployeeCount": 250
            }]),
        );
        let nothing = json!({"type": "group", "userId": "u", "groupId": "g",
                             "traits": {"id": "g", "plan": "x"}});
        assert!(map_event(&cfg, &nothing, &ids()).is_empty());
    }

    // ---- alias and others ----

    #[test]
    fn alias_and_unknown_types_send_nothing() {
        let cfg = cfg("page_events = true\nscreen_events = true\nallow_dupes = true");
        let alias = json!({"type": "alias", "userId": "new", "previousId": "old",
                           "traits": {"email": "x@example.com"}});
        assert!(map_event(&cfg, &alias, &ids()).is_empty());
        assert!(audience_updates(&cfg, &alias).is_empty());
        let odd = json!({"type": "teleport", "userId": "u"});
        assert!(map_event(&cfg, &odd, &ids()).is_empty());
    }

    // ---- ids ----

    #[test]
    fn ids_from_traits_context_traits_and_properties() {
        let cfg = MappingConfig::default();
        let identify = json!({"type": "identify", "userId": "u",
            "traits": {"accountExternalId": "a-traits", "contactExternalId": "c-traits"},
            "context": {"traits": {"accountExternalId": "a-ctx", "contactExternalId": "c-ctx"}}});
        assert_eq!(
            ids_from_event(&cfg, &identify),
            PartialIds {
                account: Some("a-traits".into()),
                contact: Some("c-traits".into())
            }
        );

        // Each id is found on its own: account from properties, contact from
        // context.traits.
        let track = json!({"type": "track", "userId": "u", "event": "E",
            "properties": {"accountExternalId": "a-props", "contactExternalId": "  "},
            "context": {"traits": {"accountExternalId": "a-ctx", "contactExternalId": "c-ctx"}}});
        assert_eq!(
            ids_from_event(&cfg, &track),
            PartialIds {
                account: Some("a-props".into()),
                contact: Some("c-ctx".into())
            }
        );

        let spelled = json!({"type": "page", "userId": "u",
            "context": {"traits": {"accountExternalID": 12345, "contact_external_id": "c"}}});
        assert_eq!(
            ids_from_event(&cfg, &spelled),
            PartialIds {
                account: Some("12345".into()),
                contact: Some("c".into())
            }
        );

        let none = json!({"type": "track", "userId": "u", "event": "E",
                          "properties": {"accountExternalId": true}});
        assert_eq!(ids_from_event(&cfg, &none), PartialIds::default());
    }

    #[test]
    fn ids_for_group_use_group_id() {
        let cfg = MappingConfig::default();
        let group = json!({"type": "group", "userId": "u", "groupId": "grp-1",
            "traits": {"accountExternalId": "other"},
            "context": {"traits": {"contactExternalId": "c-ctx"}}});
        assert_eq!(
            ids_from_event(&cfg, &group),
            PartialIds {
                account: Some("grp-1".into()),
                contact: Some("c-ctx".into())
            }
        );
    }

    /// Segment's B2B SaaS spec sends the account as `context.groupId` on
    /// every call (its examples, as written there).
    #[test]
    fn context_group_id_is_the_account_when_the_event_names_none() {
        let cfg = MappingConfig::default();
        let track = json!({"type": "track", "userId": "019mr8mf4r", "event": "Account Created",
            "properties": {"account_name": "Initech"},
            "context": {"groupId": "8as7df9a8s7df"}});
        assert_eq!(
            ids_from_event(&cfg, &track),
            PartialIds {
                account: Some("8as7df9a8s7df".into()),
                contact: None
            }
        );
        let identify = json!({"type": "identify", "userId": "019mr8mf4r",
            "traits": {"email": "john.doe@example.com"},
            "context": {"groupId": "8as7df9a8s7df"}});
        assert_eq!(
            ids_from_event(&cfg, &identify).account.as_deref(),
            Some("8as7df9a8s7df")
        );
        // The event's own account id wins; a group keeps its groupId.
        let own = json!({"type": "track", "userId": "u", "event": "E",
            "properties": {"accountExternalId": "acct-own"},
            "context": {"groupId": "8as7df9a8s7df"}});
        assert_eq!(
            ids_from_event(&cfg, &own).account.as_deref(),
            Some("acct-own")
        );
        let group = json!({"type": "group", "userId": "u", "groupId": "g-1",
            "context": {"groupId": "other"}});
        assert_eq!(ids_from_event(&cfg, &group).account.as_deref(), Some("g-1"));
        let blank = json!({"type": "page", "userId": "u", "context": {"groupId": " "}});
        assert_eq!(ids_from_event(&cfg, &blank).account, None);
    }

    #[test]
    fn ids_from_configured_keys() {
        let cfg = cfg(r#"
            [ids]
            account_keys = ["company.id", "org"]
            contact_keys = ["email"]
        "#);
        let identify = json!({"type": "identify", "userId": "u",
            "traits": {"email": "a@example.com", "company": {"id": 99}}});
        assert_eq!(
            ids_from_event(&cfg, &identify),
            PartialIds {
                account: Some("99".into()),
                contact: Some("a@example.com".into())
            }
        );
        // Built-in keys come first within one object.
        let track = json!({"type": "track", "userId": "u", "event": "E",
            "properties": {"org": "o-1", "accountExternalId": "a-1"}});
        assert_eq!(ids_from_event(&cfg, &track).account.as_deref(), Some("a-1"));
    }

    #[test]
    fn partial_ids_helpers() {
        let event_ids = PartialIds {
            account: Some("a".into()),
            contact: None,
        };
        let mapped = PartialIds {
            account: Some("other".into()),
            contact: Some("c".into()),
        };
        let merged = event_ids.clone().or(mapped);
        assert_eq!(
            merged.clone().complete(),
            Some(Ids {
                account: "a".into(),
                contact: "c".into()
            })
        );
        assert_eq!(event_ids.complete(), None);
    }

    // ---- mapping file ----

    #[test]
    fn empty_file_is_the_default() {
        let c = cfg("");
        assert!(!c.allow_dupes && !c.page_events && !c.screen_events);
        assert!(c.traits.is_empty() && c.custom_fields.is_empty());
        assert_eq!(c.quantity_property(), "quantity");
        assert_eq!(c.description_property(), "description");
    }

    #[test]
    fn example_from_docs_parses() {
        let doc = include_str!("mapping.rs");
        let start = doc.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
        let end = start + doc[start..].find("//! ```\n").unwrap();
        let text: String = doc[start..end]
            .lines()
            .map(|l| l.strip_prefix("//!").unwrap_or(l).trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let c = cfg(&text);
        assert!(c.is_audience_trait("order_completed_last_30days"));
        assert_eq!(c.account_id_keys, vec!["company.id".to_string()]);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = "allow_dupes = true\n\n[traits]\nplan = { field = \"PlanName\" }\nseats = { rout = \"account\" }\n";
        let message = err(text);
        assert!(
            message.starts_with("mapping file line 5, column 11: unknown key `rout`"),
            "{message}"
        );
        let top = err("page_events = true\npage_event = true\n");
        assert!(
            top.starts_with("mapping file line 2, column 1: unknown key `page_event`"),
            "{top}"
        );
    }

    #[test]
    fn wrong_types_name_the_line() {
        let message = err("page_events = true\nallow_dupes = \"yes\"\n");
        assert!(
            message.starts_with("mapping file line 2, column 15: "),
            "{message}"
        );
        assert!(message.contains("expected a boolean"), "{message}");

        let message = err("audience_traits = \"churn\"\n");
        assert!(
            message.starts_with("mapping file line 1, column 19: "),
            "{message}"
        );

        let message = err("[traits]\nplan = { entity = \"acount\" }\n");
        assert!(
            message.starts_with("mapping file line 2, column 19: "),
            "{message}"
        );
        assert!(message.contains("unknown variant `acount`"), "{message}");

        let message = err("[group_traits]\nplan = { entity = \"account\" }\n");
        assert!(
            message.starts_with("mapping file line 2, column 10: unknown key `entity`"),
            "{message}"
        );

        let message = err("[properties]\n\nrevenue = \"Revenue\"\n");
        assert!(
            message.starts_with("mapping file line 3, column 11: "),
            "{message}"
        );

        let message = err("allow_dupes = true\n[[traits]]\n");
        assert!(message.starts_with("mapping file line 2"), "{message}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let message = err("allow_dupes = true\npage_events = \n");
        assert!(message.starts_with("mapping file line 2"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn bad_values_name_the_line() {
        let message = err("[traits]\nplan = { field = \"\" }\n");
        assert_eq!(
            message,
            "mapping file line 2, column 18: field must not be empty"
        );
        let message = err("[properties]\nrevenue = { field = \"cf_Revenue\" }\n");
        assert_eq!(
            message,
            "mapping file line 2, column 21: field `cf_Revenue`: give the ChurnZero field name without the `cf_` prefix (`Revenue`)"
        );
        let message = err("event_custom_fields = [\"plan\",\n  \"two words\"]\n");
        assert_eq!(
            message,
            "mapping file line 2, column 3: event custom field `two words` must not contain whitespace"
        );
        let message = err(
            "audience_traits = [\"churn_risk\"]\n[traits]\nchurn_risk = { entity = \"account\" }\n",
        );
        assert!(
            message.starts_with(
                "mapping file line 3, column 25: trait `churn_risk` is an audience trait"
            ),
            "{message}"
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapping.toml");
        std::fs::write(&path, "page_events = true\nscreen_events = 1\n").unwrap();
        let message = MappingConfig::load(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "mapping file {} line 2, column 17: ",
                path.display()
            )),
            "{message}"
        );

        std::fs::write(&path, "page_events = true\n").unwrap();
        assert!(MappingConfig::load(&path).unwrap().page_events);

        let missing = dir.path().join("missing.toml");
        let message = MappingConfig::load(&missing).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("cannot read mapping file {}: ", missing.display())),
            "{message}"
        );
    }

    /// What delivery reads of a stored payload maps as the whole payload:
    /// the context members that carry ids (`traits`, `groupId`) and
    /// audiences (`personas`) are kept, however their keys are written, and
    /// what a browser or mobile library adds is not built at all.
    #[test]
    fn a_payload_read_for_mapping_maps_as_the_whole_payload() {
        let cfg = cfg("page_events = true\nscreen_events = true\naudience_traits = [\"vip\"]\n");
        let browser = json!({
            "type": "track", "event": "Report Exported", "userId": "u-1",
            "timestamp": "2026-12-07T12:00:00.000Z",
            "properties": {"quantity": 2, "description": "csv", "plan": "pro"},
            "context": {
                "library": {"name": "analytics.js", "version": "next-1.70.0"},
                "page": {"path": "/r", "url": "https://app.example.com/r", "title": "R"},
                "userAgent": "Mozilla/5.0", "locale": "en-US", "ip": "203.0.113.7",
                "campaign": {"name": "winter", "source": "mail"},
                "traits": {"accountExternalId": "a-ctx", "contactExternalId": "c-ctx"}
            },
            "integrations": {"All": true}
        });
        let mobile_group_id = json!({
            "type": "screen", "name": "Home", "userId": "u-2",
            "context": {
                "app": {"name": "Shop", "version": "1.2"}, "device": {"model": "Pixel"},
                "os": {"name": "Android"}, "screen": {"width": 1080, "height": 2400},
                "groupId": "acct-from-context", "network": {"wifi": true}
            }
        });
        let audience = json!({
            "type": "identify", "userId": "u-3",
            "traits": {"order_completed_last_30days": true, "vip": false, "email": "x@example.com"},
            "context": {"library": {"name": "analytics-node"},
                        "personas": {"computation_class": "audience",
                                     "computation_key": "order_completed_last_30days"}}
        });
        for event in [browser, mobile_group_id, audience] {
            let text = serde_json::to_string(&event).unwrap();
            let view = parse_for_mapping(&text).unwrap();
            assert_eq!(
                map_event(&cfg, &view, &ids()),
                map_event(&cfg, &event, &ids())
            );
            assert_eq!(ids_from_event(&cfg, &view), ids_from_event(&cfg, &event));
            assert_eq!(
                audience_updates(&cfg, &view),
                audience_updates(&cfg, &event)
            );
            let context = view["context"].as_object().unwrap();
            assert!(
                context
                    .keys()
                    .all(|k| CONTEXT_KEYS_READ.contains(&k.as_str())),
                "{context:?}"
            );
            assert_eq!(view["properties"], event["properties"]);
        }
        // A key written with an escape is the same key; a context that is no
        // object holds nothing; a later duplicate wins, as in a `Value`.
        let view = parse_for_mapping(
            r#"{"type":"track","event":"E","context":{"tr\u0061its":{"contactExternalId":"c"},"ip":"x"}}"#,
        )
        .unwrap();
        assert_eq!(
            view["context"],
            json!({"traits": {"contactExternalId": "c"}})
        );
        let view = parse_for_mapping(r#"{"type":"track","context":[1,{"traits":{}}],"event":"E"}"#)
            .unwrap();
        assert_eq!(
            view,
            json!({"type": "track", "context": null, "event": "E"})
        );
        let view = parse_for_mapping(
            r#"{"context":{"groupId":"a"},"event":"E","context":{"groupId":"b"}}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&view).unwrap(),
            r#"{"context":{"groupId":"b"},"event":"E"}"#
        );
        // Not an object, or not JSON: as a whole parse reads it.
        assert_eq!(parse_for_mapping("[1, 2]").unwrap(), json!([1, 2]));
        assert!(parse_for_mapping(r#"{"type": "track""#).is_err());
        assert!(parse_for_mapping(r#"{"type": "track"} x"#).is_err());
    }
}
