//! Static checks of the Helm chart in `charts/sinew`, used by `tests/tests/chart.rs`. No helm binary and no cluster
//! are needed: the checks read the chart's files.
//!
//! - [`validate`]: a JSON Schema validator for the draft-07 subset `values.schema.json` uses (`type`, `properties`,
//!   `required`, `additionalProperties`, `items`, `enum`, `minimum`, `maximum`, `minLength`, `maxLength`,
//!   `pattern`, local `$ref`), whose errors carry the JSON path of the offending value; [`unsupported_keywords`]
//!   lists schema keywords it does not implement, so the schema cannot silently rely on one.
//! - [`pattern_matches`]: the small regular-expression engine behind `pattern` (anchors, classes, groups,
//!   alternation, `? * + {n,m}`), with JSON Schema's search semantics.
//! - [`values_refs`]: every `.Values.a.b.c` (and `$.Values...`) a template refers to, also inside `include`,
//!   `default` and other expressions; [`check_blocks`]: `{{ }}` actions and `if`/`range`/`with`/`define` ... `end`
//!   blocks are balanced.
//! - [`values_keys`]: the mapping keys of `values.yaml` with their line and whether a comment documents them;
//!   [`yaml_key_paths`] gives the same from a YAML parser, so a test can check the line scanner.
//! - [`option_paths`]: which values keys the templates use (as a whole, or through their children), and which
//!   none does.
//! - [`strip_actions`]: a template with its actions removed, parseable as YAML for structural checks.
//! - [`file_config_keys`]: the keys `mesh-agent run --config` accepts, read from `mesh-agent/src/config.rs`.
//! - [`helm_bin`] / [`helm`]: an optional real `helm`, for the tests that render the chart when one is installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::util::workspace_root;

/// The chart's directory, `<workspace>/charts/sinew`.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts").join("sinew")
}

/// Reads a file of the chart (`rel` is relative to [`chart_dir`]).
pub fn read_chart_file(rel: &str) -> Result<String> {
    let p = chart_dir().join(rel);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

/// The chart's templates (`templates/*.yaml`, `*.tpl`, `*.txt`), sorted by name, with their contents.
pub fn templates() -> Result<Vec<(String, String)>> {
    let dir = chart_dir().join("templates");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if ["yaml", "tpl", "txt"]
            .iter()
            .any(|ext| name.ends_with(&format!(".{ext}")))
        {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.push((name, text));
        }
    }
    out.sort();
    Ok(out)
}

/// `values.yaml` (or any YAML document) as JSON, for [`validate`].
pub fn yaml_to_json(text: &str) -> Result<Value> {
    let y: serde_yaml::Value = serde_yaml::from_str(text).context("parsing YAML")?;
    serde_json::to_value(y).context("converting YAML to JSON")
}

// ---------------------------------------------------------------------------------------------------------------
// JSON Schema

/// One validation error: where in the instance (`$.config.proxy.inboundPort`, `$.agent.capabilities[0]`) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    /// JSON path of the offending value, from `$` (the document).
    pub path: String,
    /// The keyword that failed and why.
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Keywords [`validate`] implements, and annotations it may ignore.
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "$ref",
];
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "definitions",
];

/// Every keyword in `schema` (at any depth) that [`validate`] neither implements nor may ignore, with its schema
/// path. A schema using one would be checked less than it says, so a test requires this to be empty.
pub fn unsupported_keywords(schema: &Value) -> Vec<String> {
    fn walk(s: &Value, at: &str, out: &mut Vec<String>) {
        let Some(obj) = s.as_object() else {
            if !s.is_boolean() {
                out.push(format!("{at}: a schema must be an object or a boolean"));
            }
            return;
        };
        for (k, v) in obj {
            let here = format!("{at}/{k}");
            if !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                out.push(here.clone());
            }
            match k.as_str() {
                "properties" | "definitions" => {
                    for (name, sub) in v.as_object().into_iter().flatten() {
                        walk(sub, &format!("{here}/{name}"), out);
                    }
                }
                "items" | "additionalProperties" if v.is_object() => walk(v, &here, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, "#", &mut out);
    out
}

/// Validates `instance` against `schema` (whose local `$ref`s resolve against `schema` itself). Returns every
/// error found, each with the JSON path of the value it is about; empty means valid.
pub fn validate(schema: &Value, instance: &Value) -> Vec<SchemaError> {
    let mut errors = Vec::new();
    check(schema, schema, instance, "$", &mut errors);
    errors
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        "number" => v.is_number(),
        other => type_name(v) == other,
    }
}

fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    root.pointer(pointer)
}

fn push(errors: &mut Vec<SchemaError>, path: &str, message: String) {
    errors.push(SchemaError {
        path: path.to_string(),
        message,
    });
}

fn check(root: &Value, schema: &Value, v: &Value, path: &str, errors: &mut Vec<SchemaError>) {
    let obj = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => return push(errors, path, "no value is allowed here".into()),
        Value::Object(o) => o,
        _ => {
            return push(
                errors,
                path,
                "the schema here is neither an object nor a boolean".into(),
            );
        }
    };
    if let Some(r) = obj.get("$ref") {
        match r.as_str().and_then(|r| resolve(root, r)) {
            Some(target) => check(root, target, v, path, errors),
            None => push(errors, path, format!("$ref {r} does not resolve")),
        }
        // draft-07: $ref makes the other keywords of its object ignored.
        return;
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| has_type(v, t)) {
            let msg = format!("type: {} is not {}", type_name(v), types.join(" or "));
            // The other keywords would only repeat the mismatch.
            return push(errors, path, msg);
        }
    }
    if let Some(Value::Array(allowed)) = obj.get("enum") {
        if !allowed.contains(v) {
            let msg = format!("enum: {v} is not one of {}", Value::Array(allowed.clone()));
            push(errors, path, msg);
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = obj.get("minimum").and_then(Value::as_f64) {
            if n < min {
                push(errors, path, format!("minimum: {v} is less than {min}"));
            }
        }
        if let Some(max) = obj.get("maximum").and_then(Value::as_f64) {
            if n > max {
                push(errors, path, format!("maximum: {v} is more than {max}"));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = obj.get("minLength").and_then(Value::as_u64) {
            if len < min {
                push(
                    errors,
                    path,
                    format!("minLength: {s:?} is shorter than {min}"),
                );
            }
        }
        if let Some(max) = obj.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                push(
                    errors,
                    path,
                    format!("maxLength: {s:?} is longer than {max}"),
                );
            }
        }
        if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
            match pattern_matches(p, s) {
                Ok(true) => {}
                Ok(false) => push(errors, path, format!("pattern: {s:?} does not match {p}")),
                Err(e) => push(errors, path, format!("pattern {p}: {e}")),
            }
        }
    }
    if let Some(map) = v.as_object() {
        for name in obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !map.contains_key(name) {
                push(errors, path, format!("required: {name:?} is missing"));
            }
        }
        let props = obj.get("properties").and_then(Value::as_object);
        for (k, child) in map {
            let child_path = format!("{path}.{k}");
            if let Some(sub) = props.and_then(|p| p.get(k)) {
                check(root, sub, child, &child_path, errors);
            } else if let Some(extra) = obj.get("additionalProperties") {
                if extra == &Value::Bool(false) {
                    push(
                        errors,
                        &child_path,
                        "additionalProperties: unknown key".into(),
                    );
                } else {
                    check(root, extra, child, &child_path, errors);
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (obj.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(root, items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Regular expressions for `pattern`

#[derive(Debug)]
enum Node {
    Char(char),
    Any,
    Class {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
    Start,
    End,
    Group(Vec<Vec<Node>>),
    Repeat {
        node: Box<Node>,
        min: usize,
        max: Option<usize>,
    },
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    pattern: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bail<T>(&self, why: &str) -> Result<T> {
        bail!("{why} at {} in {:?}", self.pos, self.pattern)
    }

    fn alternation(&mut self) -> Result<Vec<Vec<Node>>> {
        let mut alts = vec![self.sequence()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            alts.push(self.sequence()?);
        }
        Ok(alts)
    }

    fn sequence(&mut self) -> Result<Vec<Node>> {
        let mut seq = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            let atom = self.quantified(atom)?;
            seq.push(atom);
        }
        Ok(seq)
    }

    fn escape(&mut self) -> Result<Vec<(char, char)>> {
        let Some(c) = self.peek() else {
            return self.bail("a trailing backslash");
        };
        self.pos += 1;
        Ok(match c {
            'd' => vec![('0', '9')],
            'w' => vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')],
            's' => vec![(' ', ' '), ('\t', '\t'), ('\n', '\n'), ('\r', '\r')],
            'n' => vec![('\n', '\n')],
            't' => vec![('\t', '\t')],
            c if c.is_ascii_alphanumeric() => return self.bail("an unsupported escape"),
            c => vec![(c, c)],
        })
    }

    fn atom(&mut self) -> Result<Node> {
        let c = self.peek().expect("atom() is called before the end");
        self.pos += 1;
        Ok(match c {
            '^' => Node::Start,
            '$' => Node::End,
            '.' => Node::Any,
            '(' => {
                if self.peek() == Some('?') {
                    // Only the non-capturing form `(?:...)`; captures mean nothing to a match test.
                    if self.chars.get(self.pos + 1) != Some(&':') {
                        return self.bail("an unsupported group");
                    }
                    self.pos += 2;
                }
                let alts = self.alternation()?;
                if self.peek() != Some(')') {
                    return self.bail("an unclosed group");
                }
                self.pos += 1;
                Node::Group(alts)
            }
            '[' => {
                let negated = self.peek() == Some('^');
                if negated {
                    self.pos += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(c) = self.peek() else {
                        return self.bail("an unclosed class");
                    };
                    self.pos += 1;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        let set = self.escape()?;
                        if set.len() != 1 || set[0].0 != set[0].1 {
                            ranges.extend(set);
                            continue;
                        }
                        set[0].0
                    } else {
                        c
                    };
                    // A range `a-z`, unless the `-` is last (`[a-]`).
                    if self.peek() == Some('-')
                        && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']')
                    {
                        self.pos += 1;
                        let hi = self.peek().expect("checked above");
                        self.pos += 1;
                        if hi < lo {
                            return self.bail("a reversed range");
                        }
                        ranges.push((lo, hi));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                Node::Class { ranges, negated }
            }
            '\\' => {
                let set = self.escape()?;
                if set.len() == 1 && set[0].0 == set[0].1 {
                    Node::Char(set[0].0)
                } else {
                    Node::Class {
                        ranges: set,
                        negated: false,
                    }
                }
            }
            '*' | '+' | '?' | '{' => return self.bail("a quantifier without an atom"),
            c => Node::Char(c),
        })
    }

    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .parse()
            .ok()
    }

    fn quantified(&mut self, atom: Node) -> Result<Node> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let save = self.pos;
                self.pos += 1;
                let Some(min) = self.number() else {
                    // Not a quantifier: a literal `{`.
                    self.pos = save;
                    return Ok(atom);
                };
                let max = if self.peek() == Some(',') {
                    self.pos += 1;
                    self.number()
                } else {
                    Some(min)
                };
                if self.peek() != Some('}') {
                    return self.bail("an unclosed {n,m}");
                }
                // `pos` is advanced past the `}` below, like the one-character quantifiers.
                (min, max)
            }
            _ => return Ok(atom),
        };
        self.pos += 1;
        if matches!(atom, Node::Start | Node::End) {
            return self.bail("a quantified anchor");
        }
        if self.peek() == Some('?') {
            return self.bail("a lazy quantifier (unsupported)");
        }
        Ok(Node::Repeat {
            node: Box::new(atom),
            min,
            max,
        })
    }
}

fn match_seq(seq: &[Node], s: &[char], i: usize, k: &dyn Fn(usize) -> bool) -> bool {
    match seq.split_first() {
        None => k(i),
        Some((n, rest)) => match_node(n, s, i, &|j| match_seq(rest, s, j, k)),
    }
}

fn match_node(n: &Node, s: &[char], i: usize, k: &dyn Fn(usize) -> bool) -> bool {
    match n {
        Node::Char(c) => s.get(i) == Some(c) && k(i + 1),
        Node::Any => s.get(i).is_some_and(|&c| c != '\n') && k(i + 1),
        Node::Class { ranges, negated } => {
            s.get(i)
                .is_some_and(|&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                && k(i + 1)
        }
        Node::Start => i == 0 && k(i),
        Node::End => i == s.len() && k(i),
        Node::Group(alts) => alts.iter().any(|seq| match_seq(seq, s, i, k)),
        Node::Repeat { node, min, max } => match_repeat(node, *min, *max, s, i, 0, k),
    }
}

fn match_repeat(
    node: &Node,
    min: usize,
    max: Option<usize>,
    s: &[char],
    i: usize,
    count: usize,
    k: &dyn Fn(usize) -> bool,
) -> bool {
    // Greedy: one more repetition first, then stop here. A repetition that consumed nothing ends the loop (it
    // would match nothing forever).
    if max.is_none_or(|m| count < m)
        && match_node(node, s, i, &|j| {
            if j == i {
                count + 1 >= min && k(j)
            } else {
                match_repeat(node, min, max, s, j, count + 1, k)
            }
        })
    {
        return true;
    }
    count >= min && k(i)
}

/// Whether `pattern` matches somewhere in `s` (JSON Schema's `pattern` is a search, not a whole-string match,
/// unless the pattern anchors itself with `^`/`$`). Supported: literals, `.`, escapes (`\d \w \s`, escaped
/// punctuation), classes with ranges and negation, groups (`(...)`, `(?:...)`), `|`, `? * + {n} {n,} {n,m}`
/// (greedy), `^`, `$`. Anything else is an error, never a silent mismatch.
pub fn pattern_matches(pattern: &str, s: &str) -> Result<bool> {
    let mut p = Parser {
        chars: pattern.chars().collect(),
        pos: 0,
        pattern,
    };
    let alts = p.alternation()?;
    if p.pos != p.chars.len() {
        return p.bail("an unbalanced )");
    }
    let re = Node::Group(alts);
    let chars: Vec<char> = s.chars().collect();
    Ok((0..=chars.len()).any(|start| match_node(&re, &chars, start, &|_| true)))
}

// ---------------------------------------------------------------------------------------------------------------
// Templates

/// One `{{ ... }}` action of a template: its text between the delimiters (trim markers removed) and its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    /// 1-based line of the opening `{{`.
    pub line: usize,
    /// The text inside, without the `-` trim markers and surrounding whitespace.
    pub body: String,
    /// A `{{/* ... */}}` comment.
    pub comment: bool,
    /// `{{-`: the whitespace before the action is trimmed.
    pub trim_left: bool,
    /// `-}}`: the whitespace after the action is trimmed.
    pub trim_right: bool,
    /// Byte range of the whole action in the template, `{{` to `}}` included.
    pub span: std::ops::Range<usize>,
}

/// The actions of a template, in order. Errors name the line of an unclosed action or comment, or of a `}}` that
/// closes nothing.
pub fn actions(text: &str) -> Result<Vec<Action>> {
    let line_of = |at: usize| text[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut rest = 0;
    loop {
        let open = text[rest..].find("{{").map(|o| rest + o);
        let stray = text[rest..].find("}}").map(|c| rest + c);
        let o = match (open, stray) {
            (_, Some(c)) if open.is_none_or(|o| c < o) => {
                bail!("line {}: `}}}}` closes no action", line_of(c))
            }
            (None, _) => break,
            (Some(o), _) => o,
        };
        let mut inner = o + 2;
        if text[inner..].starts_with('-') {
            inner += 1;
        }
        let trimmed = text[inner..].trim_start();
        let comment = trimmed.starts_with("/*");
        let close = if comment {
            let start = text.len() - trimmed.len();
            let end = text[start..]
                .find("*/")
                .map(|e| start + e + 2)
                .ok_or_else(|| anyhow!("line {}: unclosed comment", line_of(o)))?;
            let after = text[end..].trim_start();
            let after = after.strip_prefix('-').unwrap_or(after);
            if !after.starts_with("}}") {
                bail!(
                    "line {}: a comment must end its action (`*/}}}}`)",
                    line_of(o)
                );
            }
            text.len() - after.len()
        } else {
            text[inner..]
                .find("}}")
                .map(|c| inner + c)
                .ok_or_else(|| anyhow!("line {}: unclosed `{{{{`", line_of(o)))?
        };
        let raw = &text[inner..close];
        let mut body = raw.trim_end();
        let trim_right = body.len() > 1
            && body.ends_with('-')
            && body[..body.len() - 1].ends_with(char::is_whitespace);
        if trim_right {
            body = &body[..body.len() - 1];
        }
        if !comment && body.contains("{{") {
            bail!("line {}: `{{{{` inside an action", line_of(o));
        }
        out.push(Action {
            line: line_of(o),
            body: body.trim().to_string(),
            comment,
            trim_left: inner == o + 3,
            trim_right,
            span: o..close + 2,
        });
        rest = close + 2;
    }
    Ok(out)
}

/// Checks that a template's actions are well formed and its blocks balanced: every `if`, `range`, `with`,
/// `define` and `block` has its `end`, `else` appears only inside `if`/`with`/`range`, and no `end` is left over.
pub fn check_blocks(text: &str) -> Result<()> {
    let mut stack: Vec<(String, usize)> = Vec::new();
    for a in actions(text)? {
        if a.comment {
            continue;
        }
        let word = a
            .body
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or_default();
        match word {
            "if" | "range" | "with" | "define" | "block" => stack.push((word.to_string(), a.line)),
            "else" => match stack.last() {
                Some((w, _)) if ["if", "with", "range"].contains(&w.as_str()) => {}
                other => bail!(
                    "line {}: `else` outside if/with/range (inside {:?})",
                    a.line,
                    other.map(|o| &o.0)
                ),
            },
            "end" if stack.pop().is_none() => bail!("line {}: `end` closes no block", a.line),
            _ => {}
        }
    }
    if let Some((w, line)) = stack.pop() {
        bail!("line {line}: `{w}` is never closed with `end`");
    }
    Ok(())
}

/// Every `.Values` path a template refers to (`.Values.config.proxy.enabled` gives `["config", "proxy",
/// "enabled"]`), with its line. `$.Values...` counts the same; references inside any expression (`include`,
/// `default`, `toYaml`, pipelines) count; comments do not. A bare `.Values` gives an empty path, which a test
/// refuses: it would hide which keys are used.
pub fn values_refs(text: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let mut out = Vec::new();
    for a in actions(text)? {
        if a.comment {
            continue;
        }
        let body = a.body.as_str();
        let mut from = 0;
        while let Some(at) = body[from..].find(".Values").map(|i| from + i) {
            let before = body[..at].chars().next_back();
            let after = body[at + ".Values".len()..].chars().next();
            from = at + ".Values".len();
            // `.ValuesX` or `foo.Values` (a field of something else) are not references.
            if after.is_some_and(|c| c.is_alphanumeric() || c == '_')
                || before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ')')
            {
                continue;
            }
            let mut path = Vec::new();
            let mut rest = &body[from..];
            while let Some(r) = rest.strip_prefix('.') {
                let len = r
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(r.len());
                if len == 0 {
                    break;
                }
                path.push(r[..len].to_string());
                rest = &r[len..];
            }
            out.push((a.line, path));
        }
    }
    Ok(out)
}

/// The template with every action removed: a line holding only actions disappears, and an action inside a line
/// becomes `TEMPLATE`. Both branches of an `if` stay, so a template written for this (no key set in two branches)
/// parses as YAML, with the rendered structure minus what the actions add.
pub fn strip_actions(text: &str) -> Result<String> {
    // Mark each action with a control character, then drop the lines that were only actions.
    let mut marked = String::new();
    let mut cursor = 0;
    for a in actions(text)? {
        marked.push_str(&text[cursor..a.span.start]);
        marked.push('\u{1}');
        cursor = a.span.end;
    }
    marked.push_str(&text[cursor..]);
    let mut out = String::new();
    for line in marked.split_inclusive('\n') {
        if line.contains('\u{1}') && line.replace('\u{1}', "").trim().is_empty() {
            continue;
        }
        out.push_str(&line.replace('\u{1}', "TEMPLATE"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// values.yaml

/// A mapping key of `values.yaml`, found by scanning its lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValuesKey {
    /// The key and its parents, from the top.
    pub path: Vec<String>,
    /// 1-based line.
    pub line: usize,
    /// The line before it is a comment (its documentation).
    pub commented: bool,
}

/// The block-mapping keys of a YAML file such as `values.yaml`, with their lines and whether a comment line comes
/// right before each. Keys inside sequences, flow collections (`{a: 1}`) and block scalars are not listed, exactly
/// like [`yaml_key_paths`], which a test compares this with.
pub fn values_keys(text: &str) -> Result<Vec<ValuesKey>> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    // Lines deeper than this indent belong to a sequence item or a block scalar, not to the mapping.
    let mut skip_deeper_than: Option<usize> = None;
    let mut prev_comment = false;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() {
            prev_comment = false;
            continue;
        }
        if trimmed.starts_with('#') {
            prev_comment = true;
            continue;
        }
        let was_comment = std::mem::replace(&mut prev_comment, false);
        if raw.starts_with('\t') {
            bail!("line {}: tab indentation", n + 1);
        }
        let indent = raw.len() - trimmed.len();
        if let Some(limit) = skip_deeper_than {
            if indent > limit || (indent == limit && trimmed.starts_with('-')) {
                continue;
            }
            skip_deeper_than = None;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        if trimmed == "-" || trimmed.starts_with("- ") {
            skip_deeper_than = Some(indent);
            continue;
        }
        if trimmed.starts_with("---") || trimmed.starts_with("...") {
            continue;
        }
        let (key, rest) = split_key(trimmed)
            .ok_or_else(|| anyhow!("line {}: not a `key: value` line: {trimmed:?}", n + 1))?;
        let mut path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
        path.push(key.clone());
        out.push(ValuesKey {
            path,
            line: n + 1,
            commented: was_comment,
        });
        let value = strip_comment(rest).trim();
        if value.is_empty() {
            stack.push((indent, key));
        } else if value.starts_with('|') || value.starts_with('>') {
            skip_deeper_than = Some(indent);
        }
    }
    Ok(out)
}

/// Splits `key: rest` (plain or quoted key). `None` when the line is no mapping entry.
fn split_key(line: &str) -> Option<(String, &str)> {
    let (key, rest) = if let Some(q) = line.strip_prefix('"') {
        let end = q.find('"')?;
        (q[..end].to_string(), &q[end + 1..])
    } else if let Some(q) = line.strip_prefix('\'') {
        let end = q.find('\'')?;
        (q[..end].to_string(), &q[end + 1..])
    } else {
        let end = line
            .find(": ")
            .or_else(|| line.strip_suffix(':').map(|l| l.len()))?;
        (line[..end].to_string(), &line[end..])
    };
    let rest = rest.strip_prefix(':')?;
    if !(rest.is_empty() || rest.starts_with(' ')) || key.is_empty() {
        return None;
    }
    Some((key, rest))
}

/// A value without its trailing `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(value: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in value.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &value[..i],
            _ => {}
        }
        prev = c;
    }
    value
}

/// The mapping key paths of a parsed document (not descending into sequences), for comparison with
/// [`values_keys`].
pub fn yaml_key_paths(v: &Value) -> BTreeSet<Vec<String>> {
    fn walk(v: &Value, at: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        if let Value::Object(map) = v {
            for (k, child) in map {
                at.push(k.clone());
                out.insert(at.clone());
                walk(child, at, out);
                at.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The value at `path` in `v` (through mappings), if there is one.
pub fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.as_object()?.get(k))
}

/// How the templates use a key of `values.yaml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A template refers to this key as a whole (`.Values.nodeSelector`); what is below it is data.
    Leaf,
    /// Templates refer to keys below it.
    Group,
    /// No template refers to it or to anything below it.
    Unused,
}

/// The chart's options: every key of `values` that is a leaf (used whole), a group (used through its children,
/// which are listed too) or unused, given the template references `refs`. Data below a leaf (the `requests` of
/// `resources`) is not listed.
pub fn option_paths(values: &Value, refs: &BTreeSet<Vec<String>>) -> Vec<(Vec<String>, Usage)> {
    fn walk(
        v: &Value,
        at: &mut Vec<String>,
        refs: &BTreeSet<Vec<String>>,
        out: &mut Vec<(Vec<String>, Usage)>,
    ) {
        let Value::Object(map) = v else { return };
        for (k, child) in map {
            at.push(k.clone());
            if refs.contains(&*at) {
                out.push((at.clone(), Usage::Leaf));
            } else if child.is_object()
                && refs
                    .iter()
                    .any(|r| r.len() > at.len() && r.starts_with(at.as_slice()))
            {
                out.push((at.clone(), Usage::Group));
                walk(child, at, refs, out);
            } else {
                out.push((at.clone(), Usage::Unused));
            }
            at.pop();
        }
    }
    let mut out = Vec::new();
    walk(values, &mut Vec::new(), refs, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The agent's config keys

/// The keys `mesh-agent run --config FILE` accepts: the fields of `struct FileConfig` in `config_rs` (the text of
/// `mesh-agent/src/config.rs`), renamed as serde renames them (`rename_all = "kebab-case"`, or a field's own
/// `rename`).
pub fn file_config_keys(config_rs: &str) -> Result<BTreeSet<String>> {
    let start = config_rs
        .find("struct FileConfig")
        .ok_or_else(|| anyhow!("no `struct FileConfig` in config.rs"))?;
    // The struct's own attributes are the lines right above its line.
    let line_start = config_rs[..start].rfind('\n').map_or(0, |i| i + 1);
    let attrs: String = config_rs[..line_start]
        .lines()
        .rev()
        .take_while(|l| l.trim_start().starts_with("#[") || l.trim_start().starts_with("//"))
        .collect();
    let kebab = attrs.contains("rename_all = \"kebab-case\"");
    if !kebab {
        bail!("FileConfig is no longer `rename_all = \"kebab-case\"`: update this reader");
    }
    let body_start = config_rs[start..]
        .find('{')
        .map(|i| start + i + 1)
        .ok_or_else(|| anyhow!("FileConfig has no body"))?;
    let body_end = config_rs[body_start..]
        .find("\n}")
        .map(|i| body_start + i)
        .ok_or_else(|| anyhow!("FileConfig's body does not end"))?;
    let mut keys = BTreeSet::new();
    let mut rename: Option<String> = None;
    for line in config_rs[body_start..body_end].lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[") {
            if let Some(r) = t
                .split("rename = \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                rename = Some(r.to_string());
            }
            continue;
        }
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        let Some((name, _)) = t.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        keys.insert(rename.take().unwrap_or_else(|| name.replace('_', "-")));
    }
    if keys.is_empty() {
        bail!("FileConfig has no fields");
    }
    Ok(keys)
}

/// The keys of the agent config file in the ConfigMap template: the `key:` lines of its `config.yaml: |` block
/// (inside `if` blocks too).
pub fn config_map_keys(configmap_template: &str) -> Result<Vec<String>> {
    let stripped = strip_actions(configmap_template)?;
    let mut lines = stripped.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("config.yaml: |"))
        .ok_or_else(|| anyhow!("no `config.yaml: |` block in the ConfigMap template"))?;
    let indent = header.len() - header.trim_start().len();
    let mut keys = Vec::new();
    for l in lines {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if l.len() - t.len() <= indent {
            break;
        }
        let (key, _) = split_key(t).ok_or_else(|| anyhow!("not a config line: {l:?}"))?;
        keys.push(key);
    }
    Ok(keys)
}

/// Renders a template that uses only the simplest actions, the way helm would: `.Values.a.b` (optionally piped
/// into `quote` or `int64`), `include "sinew.meshRootNamespace" .`, `if .Values.a.b` / `else` / `end`, comments,
/// and the `{{-`/`-}}` trim markers. Any other action is an error, so the template cannot outgrow this renderer
/// unnoticed. The ConfigMap is written this way, so its config file can be checked without helm.
pub fn render_simple(text: &str, values: &Value, release_namespace: &str) -> Result<String> {
    fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }
    fn value_at<'a>(values: &'a Value, expr: &str, line: usize) -> Result<&'a Value> {
        let path: Vec<String> = expr
            .strip_prefix(".Values.")
            .ok_or_else(|| anyhow!("line {line}: not a .Values reference: {expr:?}"))?
            .split('.')
            .map(str::to_string)
            .collect();
        lookup(values, &path).ok_or_else(|| anyhow!("line {line}: {expr} is not in values.yaml"))
    }
    fn print(v: &Value, line: usize) -> Result<String> {
        Ok(match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            Value::Number(n) => n.as_f64().map(|f| f.to_string()).unwrap_or_default(),
            other => bail!("line {line}: cannot print {other} in place"),
        })
    }
    let mut out = String::new();
    // One entry per open `if`: (this branch is taken, some branch was taken).
    let mut conds: Vec<(bool, bool)> = Vec::new();
    let mut cursor = 0;
    let mut skip_leading_ws = false;
    for a in actions(text)? {
        let active = conds.iter().all(|c| c.0);
        let mut chunk = &text[cursor..a.span.start];
        if skip_leading_ws {
            chunk = chunk.trim_start();
        }
        if active {
            out.push_str(chunk);
        }
        if a.trim_left && active {
            let kept = out.trim_end().len();
            out.truncate(kept);
        }
        cursor = a.span.end;
        skip_leading_ws = a.trim_right;
        if a.comment {
            continue;
        }
        let body = a.body.as_str();
        if let Some(cond) = body.strip_prefix("if ") {
            let taken = truthy(value_at(values, cond.trim(), a.line)?);
            conds.push((taken, taken));
        } else if body == "else" {
            let c = conds
                .last_mut()
                .ok_or_else(|| anyhow!("line {}: else outside if", a.line))?;
            *c = (!c.1, true);
        } else if body == "end" {
            conds
                .pop()
                .ok_or_else(|| anyhow!("line {}: end outside if", a.line))?;
        } else if body == "include \"sinew.meshRootNamespace\" ." {
            if active {
                let configured = values
                    .pointer("/config/meshRootNamespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                out.push_str(if configured.is_empty() {
                    release_namespace
                } else {
                    configured
                });
            }
        } else {
            let mut parts = body.split('|').map(str::trim);
            let expr = parts.next().unwrap_or_default();
            let v = value_at(values, expr, a.line)?;
            let mut s = print(v, a.line)?;
            for f in parts {
                s = match f {
                    "quote" => serde_json::to_string(&s)?,
                    "int64" => match v.as_f64() {
                        Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
                        _ => bail!("line {}: int64 of {v}", a.line),
                    },
                    other => bail!("line {}: unsupported function {other:?}", a.line),
                };
            }
            if active {
                out.push_str(&s);
            }
        }
    }
    if !conds.is_empty() {
        bail!("an `if` is never closed");
    }
    let mut tail = &text[cursor..];
    if skip_leading_ws {
        tail = tail.trim_start();
    }
    out.push_str(tail);
    Ok(out)
}

/// The raw template text of the agent config file in the ConfigMap template: the lines of its `config.yaml: |`
/// block, without the block's indentation. Render it with [`render_simple`].
pub fn config_block(configmap_template: &str) -> Result<String> {
    let mut lines = configmap_template.lines();
    let header = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("config.yaml: |"))
        .ok_or_else(|| anyhow!("no `config.yaml: |` block in the ConfigMap template"))?;
    let outer = header.len() - header.trim_start().len();
    let mut block = Vec::new();
    for l in lines {
        let t = l.trim_start();
        if !t.is_empty() && l.len() - t.len() <= outer {
            break;
        }
        block.push(l);
    }
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    Ok(block
        .iter()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect())
}

// ---------------------------------------------------------------------------------------------------------------
// helm, when installed

/// A `helm` binary: `$HELM` if set, else `helm` on `PATH`. `None` when there is none (the tests that need one say
/// so and skip).
pub fn helm_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HELM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("helm"))
            .find(|p| p.is_file())
    })
}

/// Runs `helm args...` in the chart's parent directory; `Ok(stdout)` on success, `Err(stderr)` on failure.
pub fn helm(bin: &Path, args: &[&str]) -> std::result::Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .current_dir(chart_dir().parent().expect("charts/"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The documents of a multi-document YAML stream (empty documents dropped), as JSON.
pub fn yaml_docs(text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(doc).context("parsing a YAML document")?;
        if !v.is_null() {
            out.push(serde_json::to_value(v).context("converting YAML to JSON")?);
        }
    }
    Ok(out)
}
