//! Chat templates: vLLM's message normalisation, then rendering with minijinja like transformers.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value as Json};

use crate::TokenizerError;

/// One chat request's template inputs, as they arrive in `/v1/chat/completions` or `/tokenize`.
#[derive(Debug, Clone, Copy)]
pub struct ChatTemplateInput<'a> {
    /// The request's `messages` array, as sent.
    pub messages: &'a Json,
    /// Append the assistant header (vLLM default: true).
    pub add_generation_prompt: bool,
    /// Leave the final message open so the model continues it (vLLM default: false).
    pub continue_final_message: bool,
    /// The request's `tools` array, passed to the template as `tools`.
    pub tools: Option<&'a Json>,
    /// Extra template variables; like vLLM they override every other variable except `messages`.
    pub chat_template_kwargs: Option<&'a Map<String, Json>>,
}

impl<'a> ChatTemplateInput<'a> {
    /// Inputs with vLLM's defaults: `add_generation_prompt` on, no tools, no kwargs.
    pub fn new(messages: &'a Json) -> Self {
        ChatTemplateInput {
            messages,
            add_generation_prompt: true,
            continue_final_message: false,
            tools: None,
            chat_template_kwargs: None,
        }
    }
}

/// transformers' marker for `continue_final_message`: appended to the final message, then the
/// rendered text is cut where it appears.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// A compiled chat template plus the special-token variables it is rendered with.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    source_has_content: bool,
    /// `bos_token`, `eos_token`, ... as strings (transformers' `special_tokens_map`).
    specials: Vec<(&'static str, String)>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from, for the error.
    pub(crate) fn new(
        source: String,
        origin: &str,
        specials: Vec<(&'static str, String)>,
    ) -> Result<ChatTemplate, TokenizerError> {
        let source_has_content = source.contains("content");
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat_template", source)
            .map_err(|e| TokenizerError::Template { message: format!("{origin}: {e:#}") })?;
        Ok(ChatTemplate { env, source_has_content, specials })
    }

    /// Renders the request like vLLM: normalise messages, render, handle `continue_final_message`.
    pub(crate) fn render(&self, req: &ChatTemplateInput<'_>) -> Result<String, TokenizerError> {
        let mut messages = normalize_messages(req.messages)?;
        let kwargs = req.chat_template_kwargs;
        let flag = |key: &str, default: bool| match kwargs.and_then(|k| k.get(key)) {
            Some(Json::Bool(b)) => *b,
            _ => default,
        };
        let add_generation_prompt = flag("add_generation_prompt", req.add_generation_prompt);
        let continue_final = flag("continue_final_message", req.continue_final_message);
        if add_generation_prompt && continue_final {
            return Err(TokenizerError::InvalidRequest {
                message: "cannot set both `continue_final_message` and `add_generation_prompt` to true".into(),
            });
        }
        let mut final_message = String::new();
        if continue_final {
            let last = messages.last_mut().ok_or_else(|| TokenizerError::InvalidRequest {
                message: "continue_final_message is set but `messages` is empty".into(),
            })?;
            if !self.source_has_content {
                return Err(template_err("continue_final_message is set but the chat template never reads `content`"));
            }
            final_message = last.content.to_string();
            last.content.to_mut().push_str(CONTINUE_TAG);
        }

        // The context is built as minijinja values directly (each string copied once), in the
        // order transformers gives it: special tokens, tools, documents, add_generation_prompt,
        // then the kwargs (overriding any of those), then messages.
        let mut ctx = SmallMap::with_capacity(self.specials.len() + 4 + kwargs.map_or(0, Map::len));
        for (k, v) in &self.specials {
            ctx.insert(Cow::Borrowed(k), Value::from(v.as_str()));
        }
        ctx.insert(Cow::Borrowed("tools"), req.tools.map_or(Value::from(()), Value::from_serialize));
        ctx.insert(Cow::Borrowed("documents"), Value::from(()));
        ctx.insert(Cow::Borrowed("add_generation_prompt"), Value::from(add_generation_prompt));
        if let Some(kwargs) = kwargs {
            for (k, v) in kwargs {
                ctx.insert(Cow::Owned(k.clone()), Value::from_serialize(v));
            }
        }
        ctx.insert(Cow::Borrowed("messages"), messages.iter().map(Message::to_value).collect());
        let ctx = Value::from_object(ctx);
        let tmpl = self.env.get_template("chat_template").map_err(|e| template_err(&format!("{e:#}")))?;
        let rendered = tmpl.render(ctx).map_err(|e| template_err(&render_error_message(&e)))?;
        if !continue_final {
            return Ok(rendered);
        }
        let tag = CONTINUE_TAG.trim();
        let Some(loc) = rendered.rfind(tag).filter(|_| rendered.contains(final_message.trim())) else {
            return Err(template_err(
                "continue_final_message is set but the final message does not appear in the rendered chat",
            ));
        };
        if rendered[loc..].starts_with(CONTINUE_TAG) {
            Ok(rendered[..loc].to_string())
        } else {
            Ok(rendered[..loc].trim_end().to_string())
        }
    }
}

fn template_err(message: &str) -> TokenizerError {
    TokenizerError::Template { message: message.to_string() }
}

/// `raise_exception(msg)` errors carry just `msg`; other errors carry minijinja's full text.
fn render_error_message(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("raise_exception: ") => {
            d.trim_start_matches("raise_exception: ").to_string()
        }
        _ => format!("{e:#}"),
    }
}

/// A template map with a few string keys, in insertion order: the render context and each
/// message. Inserts and lookups scan the keys: for a dozen keys that is cheaper than building
/// minijinja's own maps, which hash (SipHash) every key on insert and on item lookups. To a
/// template it is a mapping like any other (`is mapping`, iteration, `items()`, `tojson` all see
/// the keys in order; `reverse` reverses them, as Jinja2 does).
#[derive(Debug, Default)]
struct SmallMap(Vec<(Cow<'static, str>, Value)>);

impl SmallMap {
    fn with_capacity(n: usize) -> Self {
        SmallMap(Vec::with_capacity(n))
    }

    /// Sets `key`; a key already present keeps its place and takes the new value (as a map
    /// built from a list of pairs does).
    fn insert(&mut self, key: Cow<'static, str>, value: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key, value)),
        }
    }
}

impl Object for SmallMap {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.0.iter().map(|(k, _)| Value::from(k.as_ref()))))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// One message after vLLM's normalisation, borrowing the request where it can.
#[derive(Debug, Clone)]
pub(crate) struct Message<'a> {
    pub(crate) role: &'a str,
    pub(crate) content: Cow<'a, str>,
    /// The other keys vLLM keeps, in its order: `name`, `reasoning_content`, `reasoning`, then
    /// `tool_calls` (assistant) or `tool_call_id` (tool).
    pub(crate) extra: Vec<(&'static str, Cow<'a, Json>)>,
}

impl Message<'_> {
    /// The message as the template sees it (a map, keys in vLLM's order).
    fn to_value(&self) -> Value {
        let mut map = SmallMap::with_capacity(2 + self.extra.len());
        map.insert(Cow::Borrowed("role"), Value::from(self.role));
        map.insert(Cow::Borrowed("content"), Value::from(self.content.as_ref()));
        for (k, v) in &self.extra {
            map.insert(Cow::Borrowed(k), Value::from_serialize(v.as_ref()));
        }
        Value::from_object(map)
    }

    /// The message as JSON (same keys, same order).
    #[cfg(test)]
    pub(crate) fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert("role".into(), Json::from(self.role));
        m.insert("content".into(), Json::from(self.content.as_ref()));
        for (k, v) in &self.extra {
            m.insert((*k).into(), v.as_ref().clone());
        }
        Json::Object(m)
    }
}

/// vLLM's "string" content format: keep the keys vLLM keeps, join text parts with `"\n"`,
/// turn `null` content into `""`, and parse JSON-string tool-call arguments into objects.
pub(crate) fn normalize_messages(messages: &Json) -> Result<Vec<Message<'_>>, TokenizerError> {
    let bad = |path: String, message: String| TokenizerError::Messages { path, message };
    let list = messages.as_array().ok_or_else(|| bad("messages".into(), "expected an array of messages".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let m = m.as_object().ok_or_else(|| bad(format!("messages[{i}]"), "expected an object".into()))?;
        let role = match m.get("role") {
            Some(Json::String(r)) => r.as_str(),
            Some(_) => return Err(bad(format!("messages[{i}].role"), "expected a string".into())),
            None => return Err(bad(format!("messages[{i}]"), "missing `role`".into())),
        };
        let content = match m.get("content") {
            None | Some(Json::Null) => Cow::Borrowed(""),
            Some(Json::String(s)) => Cow::Borrowed(s.as_str()),
            Some(Json::Array(parts)) => Cow::Owned(join_text_parts(parts, i)?),
            Some(_) => {
                return Err(bad(
                    format!("messages[{i}].content"),
                    "expected a string, null or an array of content parts".into(),
                ))
            }
        };
        let mut extra = Vec::new();
        if let Some(name @ Json::String(_)) = m.get("name") {
            extra.push(("name", Cow::Borrowed(name)));
        }
        for key in ["reasoning_content", "reasoning"] {
            if let Some(v @ Json::String(_)) = m.get(key) {
                extra.push((key, Cow::Borrowed(v)));
            }
        }
        if role == "assistant" {
            if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
                extra.push(("tool_calls", Cow::Owned(normalize_tool_calls(calls, i)?)));
            }
        } else if role == "tool" {
            if let Some(id) = m.get("tool_call_id") {
                extra.push(("tool_call_id", Cow::Borrowed(id)));
            }
        }
        out.push(Message { role, content, extra });
    }
    Ok(out)
}

fn join_text_parts(parts: &[Json], i: usize) -> Result<String, TokenizerError> {
    let path = || format!("messages[{i}].content");
    let mut texts: Vec<&str> = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        match p {
            Json::String(s) => texts.push(s),
            Json::Object(o) => {
                let ty = match o.get("type") {
                    Some(Json::String(t)) => t.as_str(),
                    _ => {
                        return Err(TokenizerError::Messages {
                            path: format!("messages[{i}].content[{j}]"),
                            message: "content part without a string `type`".into(),
                        })
                    }
                };
                let key = match ty {
                    "text" | "input_text" | "output_text" => "text",
                    "refusal" => "refusal",
                    other => {
                        return Err(TokenizerError::Messages {
                            path: path(),
                            message: format!("unsupported content part type `{other}`"),
                        })
                    }
                };
                match o.get(key) {
                    Some(Json::String(s)) => texts.push(s),
                    _ => {
                        return Err(TokenizerError::Messages {
                            path: format!("messages[{i}].content[{j}].{key}"),
                            message: "expected a string".into(),
                        })
                    }
                }
            }
            _ => {
                return Err(TokenizerError::Messages {
                    path: format!("messages[{i}].content[{j}]"),
                    message: "expected a content part object".into(),
                })
            }
        }
    }
    Ok(texts.join("\n"))
}

fn normalize_tool_calls(calls: &Json, i: usize) -> Result<Json, TokenizerError> {
    let Json::Array(list) = calls else {
        return Err(TokenizerError::Messages {
            path: format!("messages[{i}].tool_calls"),
            message: "expected an array".into(),
        });
    };
    let mut out = list.clone();
    for (j, call) in out.iter_mut().enumerate() {
        let Some(Json::Object(f)) = call.get_mut("function") else {
            continue;
        };
        if let Some(Json::String(args)) = f.get("arguments") {
            let parsed: Json = serde_json::from_str(args).map_err(|e| TokenizerError::Messages {
                path: format!("messages[{i}].tool_calls[{j}].function.arguments"),
                message: format!("invalid JSON: {e}"),
            })?;
            f.insert("arguments".into(), parsed);
        }
    }
    Ok(Json::Array(out))
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

/// transformers' `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` — no HTML escaping, `", "` / `": "` separators.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            None => Some(v.to_string()),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item_by_index(0)?.to_string();
            let b = s.get_item_by_index(1)?.to_string();
            (a, b)
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut w = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    w.write(&json, 0);
    Ok(Value::from(w.out))
}

/// Writes JSON the way Python's `json.dumps` does.
struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn write(&mut self, v: &Json, depth: usize) {
        match v {
            Json::Null => self.out.push_str("null"),
            Json::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => {
                let _ = write!(self.out, "{n}");
            }
            Json::String(s) => self.string(s),
            Json::Array(a) if a.is_empty() => self.out.push_str("[]"),
            Json::Array(a) => {
                self.out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.write(x, depth + 1);
                }
                self.newline(depth);
                self.out.push(']');
            }
            Json::Object(o) if o.is_empty() => self.out.push_str("{}"),
            Json::Object(o) => {
                let mut entries: Vec<(&String, &Json)> = o.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                self.out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.string(k);
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.write(x, depth + 1);
                }
                self.newline(depth);
                self.out.push('}');
            }
        }
    }
}

/// transformers' `strftime_now(fmt)`, in UTC (servers run in UTC; no timezone database here).
/// Supports `%Y %y %m %d %e %H %I %M %S %p %j %b %B %a %A %%`; other directives pass through.
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&fmt, secs)
}

pub(crate) fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{y}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('m') => write!(out, "{m:02}"),
            Some('d') => write!(out, "{d:02}"),
            Some('e') => write!(out, "{d:2}"),
            Some('H') => write!(out, "{hh:02}"),
            Some('I') => write!(out, "{:02}", (hh + 11) % 12 + 1),
            Some('M') => write!(out, "{mm:02}"),
            Some('S') => write!(out, "{ss:02}"),
            Some('p') => write!(out, "{}", if hh < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('B') => write!(out, "{}", MONTHS[(m - 1) as usize]),
            Some('b') => write!(out, "{}", &MONTHS[(m - 1) as usize][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 -> (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
