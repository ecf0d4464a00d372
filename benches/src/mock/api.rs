//! The mock's HTTP surface: vLLM 0.33's OpenAI server, byte-shaped like the real one.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gantry_proxy::http::server::{Handler, Request, Responder, Response};
use gantry_proxy::http::Method;
use gantry_tokenizer::ChatTemplateInput;
use serde::Deserialize;
use serde_json::{json, Value};

use super::config::{Role, VLLM_VERSION};
use super::engine::{splitmix, FinishReason, LoraModule, NewRequest, OutputRef, RemotePrefill, SubmitError};
use super::faults::FaultsUpdate;
use super::metrics::{self, CacheInfo, Gauges};
use super::runner::Engine;

/// The HTTP handler of one engine.
#[derive(Debug)]
pub struct Api {
    /// The engine it serves.
    pub engine: Rc<Engine>,
}

/// A vLLM-shaped error: `{"error": {"message", "type", "param", "code"}}` with status = code.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: u16,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        gantry_proxy::forward::error_body(self.status, &self.message, self.param)
    }

    fn response(&self) -> Response {
        Response::json(self.status, self.body())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

/// The fields of a chat or completion request the mock acts on. Other fields are accepted and
/// ignored, as vLLM ignores unknown sampling fields.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GenRequest {
    model: Option<String>,
    messages: Option<Value>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    n: Option<i64>,
    seed: Option<i64>,
    kv_transfer_params: Option<Value>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    add_special_tokens: Option<bool>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    tools: Option<Value>,
    echo: Option<bool>,
    return_token_strs: Option<bool>,
    tokens: Option<Value>,
    cache_salt: Option<Value>,
}

impl GenRequest {
    /// The chat template's input, with vLLM's defaults for absent fields.
    fn chat_input<'a>(&'a self, messages: &'a Value) -> ChatTemplateInput<'a> {
        ChatTemplateInput {
            messages,
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
            continue_final_message: self.continue_final_message.unwrap_or(false),
            tools: self.tools.as_ref(),
            chat_template_kwargs: self.chat_template_kwargs.as_ref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn usage_json(out: &mut String, prompt: usize, completion: usize, cached: usize) {
    let _ = write!(
        out,
        r#"{{"prompt_tokens":{prompt},"total_tokens":{},"completion_tokens":{completion},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}"#,
        prompt + completion
    );
}

/// Cancels the engine request if the handler goes away before it finished.
struct AbortGuard {
    out: OutputRef,
    engine: Rc<Engine>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let mut out = self.out.borrow_mut();
        if out.finished.is_none() {
            out.aborted = true;
            drop(out);
            self.engine.core.borrow_mut().note_abort();
            self.engine.wake.notify();
        }
    }
}

/// Waits for new tokens or the end; returns the tokens taken and the finish reason if over.
async fn next_output(out: &OutputRef) -> (Vec<u32>, Option<FinishReason>) {
    poll_fn(|cx| {
        let mut o = out.borrow_mut();
        if !o.new_tokens.is_empty() || o.finished.is_some() {
            let toks = std::mem::take(&mut o.new_tokens);
            return Poll::Ready((toks, o.finished.clone()));
        }
        o.set_waker(cx.waker());
        Poll::Pending
    })
    .await
}

/// Waits until the request is over; returns all its tokens.
async fn whole_output(out: &OutputRef) -> (Vec<u32>, FinishReason) {
    let mut all = Vec::new();
    loop {
        let (toks, fin) = next_output(out).await;
        all.extend(toks);
        if let Some(f) = fin {
            return (all, f);
        }
    }
}

struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    ignore_eos: bool,
    seed: u64,
    lease: bool,
    remote: Option<RemotePrefill>,
    echo_prompt: Option<String>,
    cache_salt: Option<String>,
    lora: Option<LoraModule>,
}

impl Api {
    /// Checks the request's model: the served one, or one of its LoRA adapters (returned).
    fn info_model_ok(&self, model: Option<&str>, required: bool) -> Result<Option<&LoraModule>, ApiError> {
        match model {
            None if required => Err(ApiError::bad("Field required: `model`").param("model")),
            None => Ok(None),
            Some(m) if m == self.engine.info.model => Ok(None),
            Some(m) => match self.engine.info.lora_modules.iter().find(|l| l.name == m) {
                Some(l) => Ok(Some(l)),
                None => Err(ApiError::new(404, format!("The model `{m}` does not exist.")).param("model")),
            },
        }
    }

    fn authorized(&self, req: &Request) -> bool {
        let Some(key) = &self.engine.info.api_key else { return true };
        let path = req.head.path();
        if !(path.starts_with("/v1") || path.starts_with("/v2")) {
            return true;
        }
        req.head.headers().get_str("authorization").and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| t == key)
    }

    fn prepare(&self, kind: Kind, body: &[u8]) -> Result<Prepared, ApiError> {
        let r: GenRequest =
            serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("Invalid request body: {e}")))?;
        let lora = self.info_model_ok(r.model.as_deref(), true)?.cloned();
        let tok = &self.engine.tokenizer;
        let mut echo_prompt = None;
        let prompt = match kind {
            Kind::Chat => {
                let messages =
                    r.messages.as_ref().ok_or_else(|| ApiError::bad("Field required: `messages`").param("messages"))?;
                if !messages.is_array() {
                    return Err(ApiError::bad("`messages` must be an array").param("messages"));
                }
                if messages.as_array().is_some_and(Vec::is_empty) {
                    return Err(ApiError::bad("`messages` must not be empty").param("messages"));
                }
                tok.encode_chat(&r.chat_input(messages)).map_err(|e| ApiError::bad(e.to_string()))?
            }
            Kind::Text => {
                let p = r.prompt.as_ref().ok_or_else(|| ApiError::bad("Field required: `prompt`").param("prompt"))?;
                let ids = self.prompt_ids(p, r.add_special_tokens.unwrap_or(true))?;
                if r.echo == Some(true) {
                    echo_prompt = Some(tok.decode(&ids, false).unwrap_or_default());
                }
                ids
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::bad("The prompt cannot be empty.").param("prompt"));
        }
        if r.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("gantry mock supports only n = 1").param("n"));
        }
        let stream = r.stream.unwrap_or(false);
        if r.stream_options.is_some() && !stream {
            return Err(ApiError::bad("Stream options can only be defined when `stream=True`.").param("stream_options"));
        }
        let max_model_len = self.engine.core.borrow().config().max_model_len;
        let requested = match kind {
            Kind::Chat => r.max_completion_tokens.or(r.max_tokens),
            Kind::Text => r.max_tokens,
        };
        if let Some(m) = requested {
            if m < 1 {
                return Err(ApiError::bad(format!("max_tokens must be at least 1, got {m}.")).param("max_tokens"));
            }
        }
        if prompt.len() >= max_model_len {
            return Err(ApiError::bad(format!(
                "This model's maximum context length is {max_model_len} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                prompt.len()
            ))
            .param("messages"));
        }
        let max_tokens = match requested {
            Some(m) => {
                let m = m as u64;
                if prompt.len() as u64 + m > max_model_len as u64 {
                    return Err(ApiError::bad(format!(
                        "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                        prompt.len() as u64 + m,
                        prompt.len()
                    ))
                    .param("max_tokens"));
                }
                m as usize
            }
            None => max_model_len - prompt.len(),
        };
        let so = r.stream_options.unwrap_or_default();
        let (lease, remote) = self.kv_transfer(r.kv_transfer_params.as_ref())?;
        let cache_salt = match r.cache_salt {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(_) => return Err(ApiError::bad("Parameter 'cache_salt' must be a non-empty string if provided.")),
        };
        let mut seed = r.seed.unwrap_or(0) as u64;
        for &t in &prompt {
            seed = splitmix(seed ^ u64::from(t));
        }
        Ok(Prepared {
            prompt,
            max_tokens,
            stream,
            include_usage: so.include_usage.unwrap_or(false),
            continuous_usage: so.continuous_usage_stats.unwrap_or(false),
            ignore_eos: r.ignore_eos.unwrap_or(false),
            seed,
            lease,
            remote,
            echo_prompt,
            cache_salt,
            lora,
        })
    }

    fn prompt_ids(&self, p: &Value, add_special: bool) -> Result<Vec<u32>, ApiError> {
        let tok = &self.engine.tokenizer;
        let single = match p {
            Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => &a[0],
            Value::Array(a) if a.len() > 1 && (a[0].is_string() || a[0].is_array()) => {
                return Err(ApiError::bad("gantry mock serves one prompt per request").param("prompt"));
            }
            other => other,
        };
        match single {
            Value::String(s) => tok.encode(s, add_special).map_err(|e| ApiError::bad(e.to_string())),
            Value::Array(ids) => {
                let vocab = tok.vocab_size();
                ids.iter()
                    .map(|v| match v.as_u64() {
                        Some(id) if id < u64::from(vocab) => Ok(id as u32),
                        _ => Err(ApiError::bad(format!("Token id {v} is out of vocabulary (vocab size {vocab})"))
                            .param("prompt")),
                    })
                    .collect()
            }
            _ => {
                Err(ApiError::bad("`prompt` must be a string, an array of token ids, or a one-element array of either")
                    .param("prompt"))
            }
        }
    }

    /// Reads `kv_transfer_params` for this engine's role: (lease the blocks, remote prefill).
    fn kv_transfer(&self, params: Option<&Value>) -> Result<(bool, Option<RemotePrefill>), ApiError> {
        let Some(p) = params.filter(|v| !v.is_null()) else { return Ok((false, None)) };
        let p = p
            .as_object()
            .ok_or_else(|| ApiError::bad("`kv_transfer_params` must be an object").param("kv_transfer_params"))?;
        let flag = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
        match self.engine.info.role {
            Role::Agg => Ok((false, None)),
            Role::Prefill => Ok((flag("do_remote_decode"), None)),
            Role::Decode if flag("do_remote_prefill") => {
                let missing = |k: &str| {
                    ApiError::bad(format!("kv_transfer_params.{k} is missing or has the wrong type"))
                        .param("kv_transfer_params")
                };
                let host = p.get("remote_host").and_then(Value::as_str).ok_or_else(|| missing("remote_host"))?;
                let port = p
                    .get("remote_port")
                    .and_then(Value::as_u64)
                    .filter(|&v| v <= 65535)
                    .ok_or_else(|| missing("remote_port"))?;
                let request_id =
                    p.get("remote_request_id").and_then(Value::as_str).ok_or_else(|| missing("remote_request_id"))?;
                let mut block_ids = Vec::new();
                if let Some(ids) = p.get("remote_block_ids").and_then(Value::as_array) {
                    // 0.33 nests one list per KV-cache group; older versions send a flat list.
                    for v in ids {
                        match v {
                            Value::Array(group) => block_ids.extend(group.iter().filter_map(Value::as_u64)),
                            other => block_ids.extend(other.as_u64()),
                        }
                    }
                }
                let num_tokens = p.get("remote_num_tokens").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
                Ok((
                    false,
                    Some(RemotePrefill {
                        host: host.to_owned(),
                        port: port as u16,
                        request_id: request_id.to_owned(),
                        block_ids,
                        num_tokens,
                    }),
                ))
            }
            Role::Decode => Ok((false, None)),
        }
    }

    async fn generate(&self, kind: Kind, req: Request, resp: &mut Responder) {
        let engine = &self.engine;
        let seq = engine.request_seq.get();
        engine.request_seq.set(seq + 1);
        let injected = {
            let f = engine.faults.borrow();
            let draw = splitmix(seq ^ engine.info.fault_seed) as f64 / u64::MAX as f64;
            if f.dead {
                Some(ApiError::new(500, "EngineCore encountered an issue. See stack trace (above) for the root cause."))
            } else if draw < f.fail_rate {
                Some(ApiError::new(f.fail_status, format!("injected failure (status {})", f.fail_status)))
            } else {
                None
            }
        };
        if let Some(e) = injected {
            let _ = resp.send(e.response()).await;
            return;
        }
        let p = match self.prepare(kind, &req.body) {
            Ok(p) => p,
            Err(e) => {
                let _ = resp.send(e.response()).await;
                return;
            }
        };
        let request_id = req
            .head
            .headers()
            .get_str("x-request-id")
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!("{:016x}{:016x}", splitmix(seq ^ engine.id_salt), splitmix(!seq ^ engine.id_salt))
            });
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        let id = format!("{prefix}-{request_id}");
        let lease_id = p.lease.then(|| format!("{id}-{:08x}", splitmix(seq) as u32));
        let prompt_len = p.prompt.len();
        let submitted = engine.core.borrow_mut().submit(
            NewRequest {
                prompt: p.prompt,
                max_tokens: p.max_tokens,
                ignore_eos: p.ignore_eos,
                seed: p.seed,
                lease_id: lease_id.clone(),
                remote_prefill: p.remote,
                cache_salt: p.cache_salt,
                lora: p.lora.clone(),
            },
            Instant::now(),
        );
        let out = match submitted {
            Ok((_, out)) => out,
            Err(SubmitError::QueueFull) => {
                let e =
                    ApiError::new(503, "The server is overloaded: the waiting queue is full. Retry on another engine.");
                let _ = resp.send(e.response()).await;
                return;
            }
        };
        engine.wake.notify();
        let guard = AbortGuard { out: out.clone(), engine: engine.clone() };
        // vLLM answers with the model the request named (an adapter's name, for LoRA).
        let model = p.lora.map_or_else(|| self.engine.info.model.clone(), |l| l.name);
        let ctx = Ctx { id, kind, created: unix_now(), prompt_len, lease_id, echo: p.echo_prompt, model };
        if p.stream {
            self.stream(&ctx, &out, resp, p.include_usage, p.continuous_usage).await;
        } else {
            self.whole(&ctx, &out, resp).await;
        }
        drop(guard);
        engine.exit_after.served_one();
    }

    fn kv_params_json(&self, ctx: &Ctx, out: &OutputRef) -> String {
        let o = out.borrow();
        match (&ctx.lease_id, &o.lease) {
            (Some(lease_id), Some(lease)) => {
                let info = &self.engine.info;
                let side = info.side_channel.map(|a| a.port()).unwrap_or(0);
                json!({
                    "do_remote_prefill": true,
                    "do_remote_decode": false,
                    "remote_block_ids": [lease.block_ids],
                    "remote_engine_id": info.engine_id,
                    "remote_request_id": lease_id,
                    "remote_host": info.http.ip().to_string(),
                    "remote_port": side,
                    "tp_size": 1,
                    "dcp_size": 1,
                    "pp_size": 1,
                    "remote_num_tokens": lease.num_tokens,
                    "remote_blocks_expiry_time": null,
                    "remote_registration_generation": 0,
                    "transfer_mode": "pull",
                })
                .to_string()
            }
            _ => "null".to_owned(),
        }
    }

    async fn whole(&self, ctx: &Ctx, out: &OutputRef, resp: &mut Responder) {
        let faults = self.engine.faults.borrow().clone();
        if faults.cut_after.is_some() {
            resp.abort();
            return;
        }
        if faults.stall_after.is_some() {
            std::future::pending::<()>().await;
        }
        let (tokens, finish) = whole_output(out).await;
        if let FinishReason::Error(msg) = &finish {
            let _ = resp.send(ApiError::new(500, msg.clone()).response()).await;
            return;
        }
        let tok = &self.engine.tokenizer;
        let mut text = ctx.echo.clone().unwrap_or_default();
        for &t in &tokens {
            text.push_str(tok.piece(t));
        }
        let num_output = out.borrow().num_output;
        let cached = out.borrow().cached_tokens;
        let kv = self.kv_params_json(ctx, out);
        let mut b = String::with_capacity(512 + text.len());
        b.push_str(r#"{"id":"#);
        push_json_str(&mut b, &ctx.id);
        match ctx.kind {
            Kind::Chat => {
                let _ = write!(b, r#","object":"chat.completion","created":{},"model":"#, ctx.created);
                push_json_str(&mut b, &ctx.model);
                b.push_str(r#","choices":[{"index":0,"message":{"role":"assistant","content":"#);
                push_json_str(&mut b, &text);
                let _ = write!(
                    b,
                    r#","refusal":null,"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning_content":null}},"logprobs":null,"finish_reason":"{}","stop_reason":null,"token_ids":null}}],"service_tier":null,"system_fingerprint":null,"usage":"#,
                    finish.as_str()
                );
                usage_json(&mut b, ctx.prompt_len, num_output, cached);
                let _ = write!(b, r#","prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":{kv}}}"#);
            }
            Kind::Text => {
                let _ = write!(b, r#","object":"text_completion","created":{},"model":"#, ctx.created);
                push_json_str(&mut b, &ctx.model);
                b.push_str(r#","choices":[{"index":0,"text":"#);
                push_json_str(&mut b, &text);
                let _ = write!(
                    b,
                    r#","logprobs":null,"finish_reason":"{}","stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null}}],"service_tier":null,"system_fingerprint":null,"usage":"#,
                    finish.as_str()
                );
                usage_json(&mut b, ctx.prompt_len, num_output, cached);
                let _ = write!(b, r#","kv_transfer_params":{kv}}}"#);
            }
        }
        let _ = resp.send(Response::json(200, b)).await;
    }

    async fn stream(&self, ctx: &Ctx, out: &OutputRef, resp: &mut Responder, include_usage: bool, continuous: bool) {
        out.borrow_mut().stream = true;
        let headers = [("content-type".into(), Bytes::from_static(b"text/event-stream; charset=utf-8"))];
        if resp.start_stream(200, &headers).await.is_err() {
            return;
        }
        let model = &ctx.model;
        let mut head = String::new();
        head.push_str(r#"{"id":"#);
        push_json_str(&mut head, &ctx.id);
        let object = match ctx.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let _ = write!(head, r#","object":"{object}","created":{},"model":"#, ctx.created);
        push_json_str(&mut head, model);
        head.push_str(r#","choices":["#);
        let tok = &self.engine.tokenizer;
        let mut sent = 0usize;
        let mut buf = String::with_capacity(1024);
        if ctx.kind == Kind::Chat {
            buf.push_str("data: ");
            buf.push_str(&head);
            buf.push_str(
                r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]"#,
            );
            if include_usage && continuous {
                buf.push_str(r#","usage":"#);
                usage_json(&mut buf, ctx.prompt_len, 0, out.borrow().cached_tokens);
            }
            buf.push_str("}\n\n");
        }
        let faults = self.engine.faults.borrow().clone();
        loop {
            let (tokens, finish) = next_output(out).await;
            if let Some(FinishReason::Error(msg)) = &finish {
                let e = ApiError::new(500, msg.clone());
                let _ = write!(buf, "data: {}\n\ndata: [DONE]\n\n", e.body());
                let _ = resp.send_chunk(buf.as_bytes()).await;
                let _ = resp.end_stream().await;
                return;
            }
            let n = tokens.len();
            for (i, &t) in tokens.iter().enumerate() {
                if faults.cut_after.is_some_and(|k| sent >= k) {
                    let _ = resp.send_chunk(buf.as_bytes()).await;
                    resp.abort();
                    return;
                }
                if faults.stall_after.is_some_and(|k| sent >= k) {
                    let _ = resp.send_chunk(buf.as_bytes()).await;
                    std::future::pending::<()>().await;
                }
                let last = i + 1 == n && finish.is_some();
                let piece = tok.piece(t);
                sent += 1;
                buf.push_str("data: ");
                buf.push_str(&head);
                match ctx.kind {
                    Kind::Chat => {
                        buf.push_str(r#"{"index":0,"delta":{"content":"#);
                        push_json_str(&mut buf, piece);
                        buf.push_str(r#"},"logprobs":null,"finish_reason":"#);
                    }
                    Kind::Text => {
                        buf.push_str(r#"{"index":0,"text":"#);
                        push_json_str(&mut buf, piece);
                        buf.push_str(r#","logprobs":null,"finish_reason":"#);
                    }
                }
                self.finish_fields(&mut buf, ctx, out, finish.as_ref().filter(|_| last));
                if include_usage && continuous {
                    buf.push_str(r#","usage":"#);
                    usage_json(&mut buf, ctx.prompt_len, sent, out.borrow().cached_tokens);
                }
                buf.push_str("}\n\n");
            }
            if let Some(f) = &finish {
                if n == 0 {
                    // Finished without a visible token (EOS): a final empty delta.
                    buf.push_str("data: ");
                    buf.push_str(&head);
                    match ctx.kind {
                        Kind::Chat => buf.push_str(r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"#),
                        Kind::Text => buf.push_str(r#"{"index":0,"text":"","logprobs":null,"finish_reason":"#),
                    }
                    self.finish_fields(&mut buf, ctx, out, Some(f));
                    buf.push_str("}\n\n");
                }
                if include_usage {
                    buf.push_str("data: ");
                    buf.push_str(&head);
                    buf.push_str(r#"],"usage":"#);
                    let o = out.borrow();
                    usage_json(&mut buf, ctx.prompt_len, o.num_output, o.cached_tokens);
                    buf.push_str("}\n\n");
                }
                buf.push_str("data: [DONE]\n\n");
                let _ = resp.send_chunk(buf.as_bytes()).await;
                let _ = resp.end_stream().await;
                return;
            }
            if resp.send_chunk(buf.as_bytes()).await.is_err() {
                return;
            }
            buf.clear();
        }
    }

    /// Writes `finish_reason` (and the rest of the choice) after `"finish_reason":`.
    fn finish_fields(&self, buf: &mut String, ctx: &Ctx, out: &OutputRef, finish: Option<&FinishReason>) {
        match finish {
            None => buf.push_str("null}]"),
            Some(f) => {
                let _ = write!(buf, r#""{}","stop_reason":null"#, f.as_str());
                if ctx.lease_id.is_some() {
                    let _ = write!(buf, r#","kv_transfer_params":{}"#, self.kv_params_json(ctx, out));
                }
                buf.push_str("}]");
            }
        }
    }

    fn models(&self) -> Response {
        let info = &self.engine.info;
        let created = self.engine.started;
        let max_len = self.engine.core.borrow().config().max_model_len;
        // The served model, then each LoRA adapter (vLLM: `root` its path, `parent` the model).
        let entry = |id: &str, root: &str, parent: Option<&str>| {
            json!({
                "id": id, "object": "model", "created": created, "owned_by": "vllm",
                "root": root, "parent": parent, "max_model_len": max_len,
                "permission": [{"id": format!("modelperm-{:016x}", splitmix(created ^ u64::from(parent.is_some()))), "object": "model_permission",
                    "created": created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
                    "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
                    "organization": "*", "group": null, "is_blocking": false}]
            })
        };
        let mut data = vec![entry(&info.model, &info.model, None)];
        data.extend(info.lora_modules.iter().map(|l| entry(&l.name, &l.path, Some(&info.model))));
        let body = json!({"object": "list", "data": data});
        Response::json(200, body.to_string())
    }

    fn metrics(&self) -> Response {
        let core = self.engine.core.borrow();
        let cfg = core.config();
        let g = Gauges { running: core.num_running(), waiting: core.num_waiting(), kv_usage: core.kv_usage() };
        let cache = CacheInfo {
            block_size: cfg.block_size,
            num_gpu_blocks: cfg.num_gpu_blocks,
            prefix_caching: cfg.prefix_caching,
            hash_algo: self.engine.info.hash_algo,
        };
        let text = metrics::render(&self.engine.info.model, &core.metrics, &g, &cache);
        Response::new(200).header("content-type", "text/plain; version=0.0.4; charset=utf-8").body(text)
    }

    fn tokenize(&self, body: &[u8]) -> Result<Response, ApiError> {
        let r: GenRequest =
            serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("Invalid request body: {e}")))?;
        self.info_model_ok(r.model.as_deref(), false)?;
        let tok = &self.engine.tokenizer;
        let tokens = if let Some(messages) = &r.messages {
            if !messages.is_array() {
                return Err(ApiError::bad("`messages` must be an array").param("messages"));
            }
            let text = tok.apply_chat_template(&r.chat_input(messages)).map_err(|e| ApiError::bad(e.to_string()))?;
            tok.encode(&text, r.add_special_tokens.unwrap_or(false)).map_err(|e| ApiError::bad(e.to_string()))?
        } else if let Some(p) = &r.prompt {
            let s = p.as_str().ok_or_else(|| ApiError::bad("`prompt` must be a string").param("prompt"))?;
            tok.encode(s, r.add_special_tokens.unwrap_or(true)).map_err(|e| ApiError::bad(e.to_string()))?
        } else {
            return Err(ApiError::bad("Either `prompt` or `messages` is required"));
        };
        let token_strs = if r.return_token_strs == Some(true) {
            let strs: Vec<String> = tokens.iter().map(|&t| tok.decode(&[t], false).unwrap_or_default()).collect();
            json!(strs)
        } else {
            Value::Null
        };
        let max_len = self.engine.core.borrow().config().max_model_len;
        let body = json!({"count": tokens.len(), "max_model_len": max_len, "tokens": tokens, "token_strs": token_strs});
        Ok(Response::json(200, body.to_string()))
    }

    fn detokenize(&self, body: &[u8]) -> Result<Response, ApiError> {
        let r: GenRequest =
            serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("Invalid request body: {e}")))?;
        self.info_model_ok(r.model.as_deref(), false)?;
        let ids = r
            .tokens
            .as_ref()
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad("Field required: `tokens`").param("tokens"))?;
        let ids: Vec<u32> = ids
            .iter()
            .map(|v| v.as_u64().filter(|&x| x <= u64::from(u32::MAX)).map(|x| x as u32))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::bad("`tokens` must be non-negative integers").param("tokens"))?;
        let text =
            self.engine.tokenizer.decode(&ids, false).map_err(|e| ApiError::bad(e.to_string()).param("tokens"))?;
        Ok(Response::json(200, json!({"prompt": text}).to_string()))
    }

    fn kv_event_sources(&self) -> Response {
        let info = &self.engine.info;
        let body = match &info.kv_events {
            None => json!({}),
            Some(endpoint) => json!({"0": {
                "enable_kv_cache_events": true, "publisher": "zmq", "endpoint": endpoint,
                "replay_endpoint": info.kv_replay, "buffer_steps": info.kv_buffer_steps,
                "hwm": gantry_kvindex::publisher::DEFAULT_HWM, "max_queue_size": gantry_kvindex::publisher::DEFAULT_MAX_QUEUE_SIZE,
                "topic": info.kv_topic,
            }}),
        };
        Response::json(200, body.to_string())
    }

    fn state(&self) -> Response {
        let core = self.engine.core.borrow();
        let f = self.engine.faults.borrow();
        let body = json!({
            "running": core.num_running(), "waiting": core.num_waiting(), "kv_usage": core.kv_usage(),
            "leases": core.num_leases(), "aborted": core.metrics.success.iter().find(|(r, _)| *r == "abort").map(|e| e.1),
            "role": format!("{:?}", self.engine.info.role).to_lowercase(), "faults": *f,
            "events_published": self.engine.publisher.as_ref().map(|p| p.stats().published),
        });
        Response::json(200, body.to_string())
    }
}

struct Ctx {
    id: String,
    kind: Kind,
    created: u64,
    prompt_len: usize,
    lease_id: Option<String>,
    echo: Option<String>,
    /// The model the response names.
    model: String,
}

const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/chat/completions", &["POST"]),
    ("/v1/completions", &["POST"]),
    ("/v1/models", &["GET"]),
    ("/health", &["GET"]),
    ("/ping", &["GET", "POST"]),
    ("/metrics", &["GET"]),
    ("/tokenize", &["POST"]),
    ("/detokenize", &["POST"]),
    ("/kv_event_sources", &["GET"]),
    ("/version", &["GET"]),
    ("/load", &["GET"]),
    ("/reset_prefix_cache", &["POST"]),
    ("/mock/faults", &["GET", "POST"]),
    ("/mock/state", &["GET"]),
];

impl Handler for Api {
    async fn handle(&self, req: Request, resp: &mut Responder) {
        if !self.authorized(&req) {
            let _ = resp.send(Response::json(401, r#"{"error":"Unauthorized"}"#)).await;
            return;
        }
        let path = req.head.path().to_owned();
        let method = req.head.method.clone();
        let m = match method {
            Method::Head => "GET",
            ref other => other.as_str(),
        };
        let Some((_, methods)) = ROUTES.iter().find(|(p, _)| *p == path) else {
            let _ = resp.send(ApiError::new(404, format!("Not Found: {path}")).response()).await;
            return;
        };
        if !methods.contains(&m) {
            let e = ApiError::new(405, format!("Method {} not allowed on {path}", method.as_str()));
            let _ = resp.send(e.response().header("allow", methods.join(", "))).await;
            return;
        }
        let engine = &self.engine;
        let r = match path.as_str() {
            "/v1/chat/completions" => return self.generate(Kind::Chat, req, resp).await,
            "/v1/completions" => return self.generate(Kind::Text, req, resp).await,
            "/v1/models" => Ok(self.models()),
            "/health" | "/ping" => {
                let healthy = engine.faults.borrow_mut().probe_health();
                Ok(Response::new(if healthy { 200 } else { 503 }))
            }
            "/metrics" => Ok(self.metrics()),
            "/tokenize" => self.tokenize(&req.body),
            "/detokenize" => self.detokenize(&req.body),
            "/kv_event_sources" => Ok(self.kv_event_sources()),
            "/version" => Ok(Response::json(200, format!(r#"{{"version":"{VLLM_VERSION}"}}"#))),
            "/load" => {
                let core = engine.core.borrow();
                Ok(Response::json(200, format!(r#"{{"server_load":{}}}"#, core.num_running() + core.num_waiting())))
            }
            "/reset_prefix_cache" => {
                let res = engine.core.borrow_mut().reset_prefix_cache();
                match res {
                    Ok(()) => {
                        // Publish AllBlocksCleared now: the loop may be idle.
                        let events = engine.core.borrow_mut().take_events();
                        if let (Some(p), false) = (&engine.publisher, events.is_empty()) {
                            p.publish(events);
                        }
                    }
                    Err(used) => tracing::warn!(used, "failed to reset prefix cache: blocks still in use"),
                }
                Ok(Response::new(200))
            }
            "/mock/faults" if m == "POST" => match serde_json::from_slice::<FaultsUpdate>(&req.body) {
                Ok(u) => {
                    let mut f = engine.faults.borrow_mut();
                    match f.apply(u) {
                        Ok(()) => Ok(Response::json(200, json!(*f).to_string())),
                        Err(e) => Err(ApiError::bad(e)),
                    }
                }
                Err(e) => Err(ApiError::bad(format!("Invalid faults update: {e}"))),
            },
            "/mock/faults" => Ok(Response::json(200, json!(*engine.faults.borrow()).to_string())),
            "/mock/state" => Ok(self.state()),
            _ => Err(ApiError::new(404, "Not Found")),
        };
        let r = r.unwrap_or_else(|e| e.response());
        let _ = resp.send(r).await;
    }

    fn error_response(&self, status: u16, message: &str) -> Response {
        ApiError::new(status, message).response()
    }
}
