//! A small path-tracking reader over a parsed JSON tree.
//!
//! The loader never deserializes into structs: it walks the
//! [`serde_json::Value`] tree by hand with [`Obj`], which remembers every key
//! that was read so that [`Obj::finish`] can report each key nobody asked
//! for as unsupported. Every conversion records its error in a [`Ctx`] with
//! the Envoy field path and carries on, so one run reports every problem.
//!
//! Scalars follow the protobuf JSON mapping as Envoy accepts it: integers may
//! be numbers or decimal strings, durations are strings such as `"5s"` or
//! `"0.25s"` (or `{seconds, nanos}` maps), booleans are booleans, enums are
//! their names.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value};

use super::ConfigError;

/// Collects errors (and the cluster references to check at the end) while
/// the tree is walked.
#[derive(Debug, Default)]
pub(crate) struct Ctx {
    /// Every error found so far, in discovery order.
    pub(crate) errors: Vec<ConfigError>,
    /// `(path, cluster name)` of every cluster a route or TCP proxy names.
    pub(crate) cluster_refs: Vec<(String, String)>,
    /// `(path, secret name)` of every static secret an SDS config names.
    pub(crate) secret_refs: Vec<(String, String)>,
    /// The `pipe.path` of the last endpoint read with a Unix socket address.
    pub(crate) pipe_endpoint: Option<String>,
}

impl Ctx {
    /// Records `path: message`.
    pub(crate) fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Records that the field at `path` is outside the supported subset.
    pub(crate) fn unsupported(&mut self, path: &str, reason: Option<&str>) {
        self.errors.push(ConfigError::unsupported(path, reason));
    }

    /// Records a missing required field.
    pub(crate) fn missing(&mut self, path: &str) {
        self.error(path, "missing required field");
    }

    /// Remembers that `path` names cluster `name`, checked once all clusters
    /// are known.
    pub(crate) fn cluster_ref(&mut self, path: String, name: String) {
        self.cluster_refs.push((path, name));
    }
}

/// The path of field `key` inside the message at `path`. Keys that contain
/// dots (map keys such as extension names) are written as `["key"]`.
pub(crate) fn join(path: &str, key: &str) -> String {
    if key.contains('.') || key.is_empty() {
        format!("{path}[{key:?}]")
    } else if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The path of element `i` of the list at `path`.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// "a string", "a list", ... for type errors.
pub(crate) fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn type_error(cx: &mut Ctx, path: &str, expected: &str, v: &Value) {
    cx.error(path, format!("expected {expected}, found {}", describe(v)));
}

/// A string value.
pub(crate) fn as_str(cx: &mut Ctx, path: &str, v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        _ => {
            type_error(cx, path, "a string", v);
            None
        }
    }
}

/// A boolean value.
pub(crate) fn as_bool(cx: &mut Ctx, path: &str, v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => {
            type_error(cx, path, "a boolean", v);
            None
        }
    }
}

/// An integer in `min..=max`, given as a number or a decimal string.
pub(crate) fn as_int(cx: &mut Ctx, path: &str, v: &Value, min: i128, max: i128) -> Option<i128> {
    let n = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => s.parse::<i128>().ok(),
        _ => {
            type_error(cx, path, "an integer", v);
            return None;
        }
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Some(n),
        Some(n) => {
            cx.error(
                path,
                format!("expected an integer from {min} to {max}, found {n}"),
            );
            None
        }
        None => {
            cx.error(path, format!("expected an integer, found {v}"));
            None
        }
    }
}

/// A `uint32` value.
pub(crate) fn as_u32(cx: &mut Ctx, path: &str, v: &Value) -> Option<u32> {
    as_int(cx, path, v, 0, u32::MAX.into()).and_then(|n| u32::try_from(n).ok())
}

/// A `uint64` value.
pub(crate) fn as_u64(cx: &mut Ctx, path: &str, v: &Value) -> Option<u64> {
    as_int(cx, path, v, 0, u64::MAX.into()).and_then(|n| u64::try_from(n).ok())
}

/// An `int64` value.
pub(crate) fn as_i64(cx: &mut Ctx, path: &str, v: &Value) -> Option<i64> {
    as_int(cx, path, v, i64::MIN.into(), i64::MAX.into()).and_then(|n| i64::try_from(n).ok())
}

/// The largest duration protobuf allows (10 000 years).
const MAX_DURATION_SECS: u64 = 315_576_000_000;

/// Parses a protobuf JSON duration string: `"5s"`, `"0.25s"`,
/// `"1.000000001s"`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {s:?}: expected seconds with an \"s\" suffix, like \"5s\" or \"0.25s\"")
    };
    if s.starts_with('-') {
        return Err(format!("invalid duration {s:?}: must not be negative"));
    }
    let body = s.strip_suffix('s').ok_or_else(bad)?;
    let (secs, frac) = match body.split_once('.') {
        Some((secs, frac)) => (secs, Some(frac)),
        None => (body, None),
    };
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let nanos = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u32 = f.parse().map_err(|_| bad())?;
            n * 10u32.pow(9 - f.len() as u32)
        }
        Some(_) => return Err(bad()),
    };
    if secs > MAX_DURATION_SECS {
        return Err(format!("invalid duration {s:?}: too large"));
    }
    Ok(Duration::new(secs, nanos))
}

/// A duration: a string like `"5s"` or a `{seconds, nanos}` map.
pub(crate) fn as_duration(cx: &mut Ctx, path: &str, v: &Value) -> Option<Duration> {
    match v {
        Value::String(s) => match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                cx.error(path, e);
                None
            }
        },
        Value::Object(_) => {
            let mut o = Obj::new(cx, path.to_string(), v)?;
            let secs = o
                .take("seconds")
                .and_then(|v| as_int(cx, &join(path, "seconds"), v, 0, MAX_DURATION_SECS.into()));
            let nanos = o
                .take("nanos")
                .and_then(|v| as_int(cx, &join(path, "nanos"), v, 0, 999_999_999));
            o.finish(cx);
            let secs = u64::try_from(secs.unwrap_or(0)).ok()?;
            let nanos = u32::try_from(nanos.unwrap_or(0)).ok()?;
            Some(Duration::new(secs, nanos))
        }
        _ => {
            type_error(cx, path, "a duration string like \"5s\"", v);
            None
        }
    }
}

/// Whether `v` is a list with no elements.
pub(crate) fn is_empty_list(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.is_empty())
}

/// The elements of a list, each with its indexed path.
pub(crate) fn as_list<'a>(cx: &mut Ctx, path: &str, v: &'a Value) -> Vec<(String, &'a Value)> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (index(path, i), item))
            .collect(),
        _ => {
            type_error(cx, path, "a list", v);
            Vec::new()
        }
    }
}

/// An enum given by name. `known` maps accepted names to values; `refused`
/// lists valid Envoy names mesh does not support yet, with the reason.
pub(crate) fn as_enum<T: Copy>(
    cx: &mut Ctx,
    path: &str,
    v: &Value,
    known: &[(&str, T)],
    refused: &[(&str, &str)],
) -> Option<T> {
    let name = as_str(cx, path, v)?;
    if let Some((_, t)) = known.iter().find(|(n, _)| *n == name) {
        return Some(*t);
    }
    if let Some((_, reason)) = refused.iter().find(|(n, _)| *n == name) {
        cx.unsupported(path, Some(&format!("{name}: {reason}")));
        return None;
    }
    let names: Vec<&str> = known
        .iter()
        .map(|(n, _)| *n)
        .chain(refused.iter().map(|(n, _)| *n))
        .collect();
    cx.error(
        path,
        format!("expected one of {}, found {name:?}", names.join(", ")),
    );
    None
}

/// Exactly one of `keys` is present (an error naming them otherwise, at
/// `o`'s path, when `required` or more than one is given).
pub(crate) fn one_of<'k>(
    cx: &mut Ctx,
    o: &Obj<'_>,
    keys: &[&'k str],
    required: bool,
) -> Option<&'k str> {
    let given: Vec<&str> = keys.iter().copied().filter(|k| o.has(k)).collect();
    match given.as_slice() {
        [one] => Some(one),
        [] => {
            if required {
                cx.error(o.path(), format!("one of {} is required", keys.join(", ")));
            }
            None
        }
        _ => {
            cx.error(
                o.path(),
                format!("only one of {} may be set", given.join(", ")),
            );
            None
        }
    }
}

/// A JSON object being read, remembering which keys were consumed.
pub(crate) struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    read: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    /// Wraps `v`, which must be a map (an error otherwise).
    pub(crate) fn new(cx: &mut Ctx, path: String, v: &'a Value) -> Option<Self> {
        match v {
            Value::Object(map) => Some(Obj {
                path,
                map,
                read: BTreeSet::new(),
            }),
            _ => {
                type_error(cx, &path, "a map", v);
                None
            }
        }
    }

    /// The path of this object.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The path of field `key` of this object.
    pub(crate) fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Whether `key` is present with a non-null value (does not consume it).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// The value of `key` without consuming it.
    pub(crate) fn peek(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the object has no keys at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Consumes `key`; `None` when absent or null (protobuf's default).
    pub(crate) fn take(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.read.insert(k.as_str());
        if v.is_null() {
            None
        } else {
            Some(v)
        }
    }

    /// An optional string field.
    pub(crate) fn string(&mut self, cx: &mut Ctx, key: &str) -> Option<String> {
        let v = self.take(key)?;
        as_str(cx, &self.at(key), v)
    }

    /// A required, non-empty string field.
    pub(crate) fn req_string(&mut self, cx: &mut Ctx, key: &str) -> Option<String> {
        match self.string(cx, key) {
            Some(s) if s.is_empty() => {
                cx.error(&self.at(key), "must not be empty");
                None
            }
            Some(s) => Some(s),
            None => {
                if !self.has(key) {
                    cx.missing(&self.at(key));
                }
                None
            }
        }
    }

    /// An optional boolean field.
    pub(crate) fn bool(&mut self, cx: &mut Ctx, key: &str) -> Option<bool> {
        let v = self.take(key)?;
        as_bool(cx, &self.at(key), v)
    }

    /// An optional `uint32` field.
    pub(crate) fn u32(&mut self, cx: &mut Ctx, key: &str) -> Option<u32> {
        let v = self.take(key)?;
        as_u32(cx, &self.at(key), v)
    }

    /// An optional `uint64` field.
    pub(crate) fn u64(&mut self, cx: &mut Ctx, key: &str) -> Option<u64> {
        let v = self.take(key)?;
        as_u64(cx, &self.at(key), v)
    }

    /// An optional `int64` field.
    pub(crate) fn i64(&mut self, cx: &mut Ctx, key: &str) -> Option<i64> {
        let v = self.take(key)?;
        as_i64(cx, &self.at(key), v)
    }

    /// An optional duration field.
    pub(crate) fn duration(&mut self, cx: &mut Ctx, key: &str) -> Option<Duration> {
        let v = self.take(key)?;
        as_duration(cx, &self.at(key), v)
    }

    /// A timeout: `default` when absent, `None` when zero (`"0s"` disables).
    pub(crate) fn timeout(
        &mut self,
        cx: &mut Ctx,
        key: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        if !self.has(key) {
            self.take(key);
            return default;
        }
        self.duration(cx, key).filter(|d| !d.is_zero())
    }

    /// An optional message field.
    pub(crate) fn obj(&mut self, cx: &mut Ctx, key: &str) -> Option<Obj<'a>> {
        let v = self.take(key)?;
        Obj::new(cx, self.at(key), v)
    }

    /// A required message field (reported missing when absent).
    pub(crate) fn req_obj(&mut self, cx: &mut Ctx, key: &str) -> Option<Obj<'a>> {
        let o = self.obj(cx, key);
        if o.is_none() && !self.has(key) {
            cx.missing(&self.at(key));
        }
        o
    }

    /// An optional list field (empty when absent).
    pub(crate) fn list(&mut self, cx: &mut Ctx, key: &str) -> Vec<(String, &'a Value)> {
        match self.take(key) {
            Some(v) => as_list(cx, &self.at(key), v),
            None => Vec::new(),
        }
    }

    /// An optional list of strings.
    pub(crate) fn strings(&mut self, cx: &mut Ctx, key: &str) -> Vec<(String, String)> {
        self.list(cx, key)
            .into_iter()
            .filter_map(|(p, v)| as_str(cx, &p, v).map(|s| (p, s)))
            .collect()
    }

    /// An optional enum field; see [`as_enum`].
    pub(crate) fn enumeration<T: Copy>(
        &mut self,
        cx: &mut Ctx,
        key: &str,
        known: &[(&str, T)],
        refused: &[(&str, &str)],
    ) -> Option<T> {
        let v = self.take(key)?;
        as_enum(cx, &self.at(key), v, known, refused)
    }

    /// Consumes `key` and reports it as unsupported (with `reason`) when
    /// present.
    pub(crate) fn refuse(&mut self, cx: &mut Ctx, key: &str, reason: &str) {
        if self.take(key).is_some() {
            cx.unsupported(&self.at(key), Some(reason));
        }
    }

    /// A message field that mesh accepts only when empty (`{}`): every key
    /// inside is reported as unsupported. Returns whether it was present.
    pub(crate) fn empty_obj(&mut self, cx: &mut Ctx, key: &str) -> bool {
        match self.obj(cx, key) {
            Some(o) => {
                o.finish(cx);
                true
            }
            None => false,
        }
    }

    /// A list field that mesh accepts only when empty.
    pub(crate) fn empty_list(&mut self, cx: &mut Ctx, key: &str, reason: &str) {
        if !self.list(cx, key).is_empty() {
            cx.unsupported(&self.at(key), Some(reason));
        }
    }

    /// Consumes every key: `(key, path, value)` for map-valued fields keyed
    /// by name (null values skipped).
    pub(crate) fn take_all(&mut self) -> Vec<(&'a str, String, &'a Value)> {
        let mut out = Vec::new();
        for (k, v) in self.map {
            self.read.insert(k.as_str());
            if !v.is_null() {
                out.push((k.as_str(), join(&self.path, k), v));
            }
        }
        out
    }

    /// Reports every key that was not consumed as unsupported.
    pub(crate) fn finish(self, cx: &mut Ctx) {
        for key in self.map.keys() {
            if !self.read.contains(key.as_str()) {
                cx.unsupported(&join(&self.path, key), None);
            }
        }
    }
}
