//! Compatibility between two JSON Schemas: does one (the *reader*) accept every event the other
//! (the *writer*) accepts? `backward` asks it with the new schema as the reader and earlier
//! versions as writers, `forward` the other way round. The rules, and what is not checked, are
//! written down in docs/SCHEMAS.md; each breaking change found becomes one readable reason.
//!
//! The check is structural and conservative: it compares the keywords that matter in practice
//! (types, required, properties and the content model, enums and const, numeric and length
//! bounds, patterns, items), and refuses any change to a keyword it cannot reason about
//! (combinators, `$ref`, conditionals…) rather than guess.

use serde_json::{Map, Value};

/// Keywords whose changes are not analysed: any difference between reader and writer is
/// reported as a breaking change.
const OPAQUE: &[&str] = &[
    "$ref",
    "$dynamicRef",
    "$defs",
    "definitions",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "prefixItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
];

/// Lower bounds: the reader's must not be above the writer's.
const LOWER: &[&str] = &["minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"];
/// Upper bounds: the reader's must not be below the writer's.
const UPPER: &[&str] = &["maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"];

/// How the two schemas are named in reasons, e.g. "the new schema" and "version 2".
#[derive(Clone, Copy)]
pub struct Names<'a> {
    /// The schema that must accept.
    pub reader: &'a str,
    /// The schema whose events must be accepted.
    pub writer: &'a str,
}

/// Every reason why `reader` refuses some event that `writer` accepts. `strict`: read open
/// content models strictly (a property the reader defines and the writer does not, while the
/// writer allows unlisted properties, is a break).
pub fn reader_refusals(reader: &Value, writer: &Value, strict: bool, names: Names<'_>) -> Vec<String> {
    let mut c = Check { strict, names, out: Vec::new() };
    c.schema(reader, writer, "");
    c.out
}

struct Check<'a> {
    strict: bool,
    names: Names<'a>,
    out: Vec<String>,
}

fn place(path: &str) -> &str {
    if path.is_empty() { "(the event data)" } else { path }
}

fn child(path: &str, name: &str) -> String {
    format!("{path}/{}", name.replace('~', "~0").replace('/', "~1"))
}

fn show(v: &Value) -> String {
    v.to_string()
}

/// The types a schema allows, or None for any.
fn types(s: &Map<String, Value>) -> Option<Vec<&str>> {
    match s.get("type")? {
        Value::String(t) => Some(vec![t.as_str()]),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

/// The values a schema allows by `enum` or `const`, or None.
fn values(s: &Map<String, Value>) -> Option<Vec<&Value>> {
    if let Some(c) = s.get("const") {
        return Some(vec![c]);
    }
    s.get("enum").and_then(Value::as_array).map(|a| a.iter().collect())
}

fn is_closed(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Bool(false)))
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl Check<'_> {
    fn push(&mut self, path: &str, what: String) {
        self.out.push(format!("{}: {what}", place(path)));
    }

    fn schema(&mut self, reader: &Value, writer: &Value, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        let rs = match reader {
            Value::Bool(true) => return,
            Value::Bool(false) => {
                if writer != &Value::Bool(false) {
                    self.push(path, format!("{r} refuses every value here, {w} does not"));
                }
                return;
            }
            Value::Object(m) => m,
            _ => return,
        };
        let ws: &Map<String, Value> = match writer {
            Value::Bool(false) => return,
            Value::Object(m) => m,
            _ => &EMPTY,
        };
        if rs.is_empty() {
            return;
        }
        for kw in OPAQUE {
            if rs.get(*kw) != ws.get(*kw) {
                self.push(path, format!("`{kw}` differs between {r} and {w}; changes to it are not checked, so they count as breaking"));
            }
        }
        self.types(rs, ws, path);
        self.values(rs, ws, path);
        self.bounds(rs, ws, path);
        self.object(rs, ws, path);
        self.items(rs, ws, path);
    }

    fn types(&mut self, rs: &Map<String, Value>, ws: &Map<String, Value>, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        let Some(rt) = types(rs) else { return };
        match types(ws) {
            None => self.push(path, format!("{r} allows only {}; {w} allows any type", rt.join(" or "))),
            Some(wt) => {
                let accepted = |t: &str| rt.contains(&t) || (t == "integer" && rt.contains(&"number"));
                let refused: Vec<&str> = wt.into_iter().filter(|t| !accepted(t)).collect();
                if !refused.is_empty() {
                    self.push(path, format!("{w} allows {}, which {r} refuses (it allows {})", refused.join(" and "), rt.join(" or ")));
                }
            }
        }
    }

    fn values(&mut self, rs: &Map<String, Value>, ws: &Map<String, Value>, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        let Some(rv) = values(rs) else { return };
        match values(ws) {
            None => self
                .push(path, format!("{r} allows only {}; {w} has no such list", rv.iter().map(|v| show(v)).collect::<Vec<_>>().join(", "))),
            Some(wv) => {
                let refused: Vec<String> = wv.iter().filter(|v| !rv.contains(v)).map(|v| show(v)).collect();
                if !refused.is_empty() {
                    self.push(path, format!("{w} allows the value {}, which {r} refuses", refused.join(", ")));
                }
            }
        }
    }

    fn bounds(&mut self, rs: &Map<String, Value>, ws: &Map<String, Value>, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        for (keys, lower) in [(LOWER, true), (UPPER, false)] {
            for kw in keys {
                let Some(rb) = rs.get(*kw).and_then(Value::as_f64) else { continue };
                match ws.get(*kw).and_then(Value::as_f64) {
                    None => self.push(path, format!("{r} has {kw} {}; {w} has none", show(&rs[*kw]))),
                    Some(wb) if (lower && rb > wb) || (!lower && rb < wb) => {
                        self.push(path, format!("{r} has {kw} {}; {w} has {}", show(&rs[*kw]), show(&ws[*kw])))
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(rm) = rs.get("multipleOf").and_then(Value::as_f64) {
            let ok =
                ws.get("multipleOf").and_then(Value::as_f64).is_some_and(|wm| rm != 0.0 && ((wm / rm) - (wm / rm).round()).abs() < 1e-9);
            if !ok {
                self.push(path, format!("{r} has multipleOf {}; {w} does not imply it", show(&rs["multipleOf"])));
            }
        }
        if rs.get("uniqueItems") == Some(&Value::Bool(true)) && ws.get("uniqueItems") != Some(&Value::Bool(true)) {
            self.push(path, format!("{r} requires unique items; {w} does not"));
        }
        if let Some(rp) = rs.get("pattern")
            && ws.get("pattern") != Some(rp)
        {
            self.push(path, format!("{r} has pattern {}; {w} has {}", show(rp), ws.get("pattern").map_or("none".to_owned(), show)));
        }
    }

    fn object(&mut self, rs: &Map<String, Value>, ws: &Map<String, Value>, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        let list = |s: &Map<String, Value>| -> Vec<String> {
            s.get("required")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let (rreq, wreq) = (list(rs), list(ws));
        for f in rreq.iter().filter(|f| !wreq.contains(f)) {
            self.push(&child(path, f), format!("required by {r}, not by {w}"));
        }
        let no_props = Map::new();
        let rp = rs.get("properties").and_then(Value::as_object).unwrap_or(&no_props);
        let wp = ws.get("properties").and_then(Value::as_object).unwrap_or(&no_props);
        let (radd, wadd) = (rs.get("additionalProperties"), ws.get("additionalProperties"));
        for (name, wsch) in wp {
            let at = child(path, name);
            match (rp.get(name), radd) {
                (Some(rsch), _) => self.schema(rsch, wsch, &at),
                (None, Some(Value::Bool(false))) => {
                    self.push(&at, format!("{w} allows this property; {r} refuses it (its content model is closed)"));
                }
                (None, Some(extra @ Value::Object(_))) => self.schema(extra, wsch, &at),
                (None, _) => {}
            }
        }
        for (name, rsch) in rp {
            if wp.contains_key(name) {
                continue;
            }
            let at = child(path, name);
            match wadd {
                Some(Value::Bool(false)) => {}
                Some(extra @ Value::Object(_)) => self.schema(rsch, extra, &at),
                _ if self.strict => self.push(
                    &at,
                    format!("defined by {r} but not by {w}, whose open content model lets events carry it with any value (strict reading)"),
                ),
                _ => {}
            }
        }
        match (radd, wadd) {
            (Some(Value::Bool(false)), wa) if !is_closed(wa) => {
                self.push(path, format!("{r} refuses properties it does not list (additionalProperties: false); {w} allows them"))
            }
            (Some(ra @ Value::Object(_)), Some(wa @ Value::Object(_))) => self.schema(ra, wa, &child(path, "*")),
            (Some(ra @ Value::Object(_)), wa) if !is_closed(wa) => self.schema(ra, &Value::Bool(true), &child(path, "*")),
            _ => {}
        }
    }

    fn items(&mut self, rs: &Map<String, Value>, ws: &Map<String, Value>, path: &str) {
        let (r, w) = (self.names.reader, self.names.writer);
        let Some(ri) = rs.get("items") else { return };
        let wi = ws.get("items");
        if ri.is_array() || wi.is_some_and(Value::is_array) {
            if Some(ri) != wi {
                self.push(path, format!("`items` as a list (tuple) differs between {r} and {w}; changes to it are not checked"));
            }
            return;
        }
        self.schema(ri, wi.unwrap_or(&Value::Bool(true)), &child(path, "*"));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NAMES: Names<'static> = Names { reader: "the new schema", writer: "version 1" };

    fn refusals(reader: Value, writer: Value) -> Vec<String> {
        reader_refusals(&reader, &writer, false, NAMES)
    }

    fn order() -> Value {
        json!({
            "type": "object",
            "required": ["orderId", "amount", "currency"],
            "properties": {
                "orderId": {"type": "string", "minLength": 1},
                "amount": {"type": "number", "minimum": 0},
                "currency": {"enum": ["EUR", "USD"]},
                "note": {"type": "string", "maxLength": 100}
            }
        })
    }

    /// `v` with `value` set at `pointer` (the parent must exist).
    fn with(mut v: Value, pointer: &str, value: Value) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        v.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(key.to_owned(), value);
        v
    }

    #[test]
    fn the_same_schema_accepts_everything_it_accepted() {
        assert!(refusals(order(), order()).is_empty());
    }

    #[test]
    fn an_added_optional_property_is_compatible_unless_read_strictly() {
        let new = with(order(), "/properties/coupon", json!({"type": "string"}));
        assert!(refusals(new.clone(), order()).is_empty());
        let strict = reader_refusals(&new, &order(), true, NAMES);
        assert_eq!(strict.len(), 1);
        assert!(strict[0].starts_with("/coupon: defined by the new schema"), "{strict:?}");
        // Under a closed writer, no earlier event carried it: compatible even strictly.
        let closed = with(order(), "/additionalProperties", json!(false));
        let new_closed = with(closed.clone(), "/properties/coupon", json!({"type": "string"}));
        assert!(reader_refusals(&with(new_closed, "/additionalProperties", json!(true)), &closed, true, NAMES).is_empty());
    }

    #[test]
    fn a_new_required_field_breaks_and_is_named() {
        let new = with(order(), "/required", json!(["orderId", "amount", "currency", "note"]));
        assert_eq!(refusals(new, order()), vec!["/note: required by the new schema, not by version 1"]);
    }

    #[test]
    fn a_removed_property_breaks_only_under_a_closed_content_model() {
        let mut open = order();
        open["properties"].as_object_mut().unwrap().remove("note");
        assert!(refusals(open.clone(), order()).is_empty());
        let closed = with(open, "/additionalProperties", json!(false));
        let r = refusals(closed, order());
        assert!(r.iter().any(|m| m.starts_with("/note: version 1 allows this property")), "{r:?}");
        assert!(r.iter().any(|m| m.contains("additionalProperties: false")), "{r:?}");
    }

    #[test]
    fn types_narrowed_break_and_widened_do_not() {
        let narrowed = with(order(), "/properties/amount/type", json!("integer"));
        assert_eq!(
            refusals(narrowed.clone(), order()),
            vec!["/amount: version 1 allows number, which the new schema refuses (it allows integer)"]
        );
        assert!(refusals(order(), narrowed).is_empty(), "integer data is a number");
        let widened = with(order(), "/properties/orderId/type", json!(["string", "integer"]));
        assert!(refusals(widened, order()).is_empty());
    }

    #[test]
    fn enum_values_removed_break_and_added_do_not() {
        let fewer = with(order(), "/properties/currency/enum", json!(["EUR"]));
        assert_eq!(refusals(fewer.clone(), order()), vec!["/currency: version 1 allows the value \"USD\", which the new schema refuses"]);
        assert!(refusals(order(), fewer).is_empty());
    }

    #[test]
    fn bounds_tightened_break_and_loosened_do_not() {
        let tighter = with(order(), "/properties/amount/minimum", json!(1));
        assert_eq!(refusals(tighter.clone(), order()), vec!["/amount: the new schema has minimum 1; version 1 has 0"]);
        assert!(refusals(order(), tighter).is_empty());
        let shorter = with(order(), "/properties/note/maxLength", json!(50));
        assert_eq!(refusals(shorter.clone(), order()).len(), 1);
        assert!(refusals(order(), shorter).is_empty());
        let new_bound = with(order(), "/properties/orderId/maxLength", json!(10));
        assert_eq!(refusals(new_bound, order()), vec!["/orderId: the new schema has maxLength 10; version 1 has none"]);
    }

    #[test]
    fn nested_objects_and_items_are_checked_with_their_place() {
        let v1 = json!({"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}}});
        let v2 = with(v1.clone(), "/properties/lines/items/properties/sku/type", json!("integer"));
        assert_eq!(refusals(v2, v1), vec!["/lines/*/sku: version 1 allows string, which the new schema refuses (it allows integer)"]);
    }

    #[test]
    fn changes_to_combinators_are_refused_not_guessed() {
        let v1 = json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
        let v2 = json!({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]});
        let r = refusals(v2, v1.clone());
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("`anyOf` differs"));
        assert!(refusals(v1.clone(), v1).is_empty());
    }

    #[test]
    fn boolean_schemas() {
        assert!(refusals(json!(true), order()).is_empty());
        assert_eq!(refusals(json!(false), order()).len(), 1);
        assert!(refusals(order(), json!(false)).is_empty());
        assert!(!refusals(order(), json!(true)).is_empty(), "an unconstrained writer is narrowed");
    }
}
