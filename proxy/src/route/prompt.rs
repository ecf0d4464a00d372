//! What routing needs from a request body: the prompt's tokens, exactly as vLLM tokenizes them,
//! and their chained block hashes.
//!
//! - `/v1/chat/completions`: the model's chat template over `messages` (with the request's
//!   `add_generation_prompt`, `continue_final_message`, `tools`, `chat_template_kwargs`), then
//!   encoded without special tokens — vLLM's path, through the worker's [`EncodeCache`].
//! - `/v1/completions`: a string prompt is encoded with special tokens (BOS); token ids are taken
//!   as they are, after a range check. A batch routes by its first prompt.
//! - A model without a tokenizer: the text (prompt, or message contents in order) is cut into
//!   [`TEXT_CHUNK_BYTES`]-byte chunks that are hashed like blocks, so requests that share a text
//!   prefix share hashes. Such hashes only ever meet the index's predicted entries (approximate
//!   routing); the token count is estimated as bytes / 4.
//! - Extra keys, mixed in exactly as the engine's events key blocks: a LoRA adapter's name in
//!   every block (`extra_keys[i] = [lora]`), and `cache_salt` (vLLM's per-request cache
//!   isolation) in the first (`[lora, salt]`, or `[salt]`). So adapter and salted requests match
//!   only blocks cached under the same adapter and salt.

use gantry_kvindex::hash::{block_hash, hash_blocks_keyed};
use gantry_kvindex::{extra_keys_hash, ExtraKey};
use gantry_tokenizer::{ChatTemplateInput, EncodeCache, Tokenizer};
use serde_json::Value;

/// Bytes of text per hashed chunk when no tokenizer is configured (about 16 tokens).
pub const TEXT_CHUNK_BYTES: usize = 64;
/// Seed of text-chunk hashes (kept apart from token-block hashes).
pub const TEXT_SEED: u64 = 0x7465_7874;

/// A request the proxy refuses before routing: a 400 with this message and parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPrompt {
    /// What is wrong, for the client.
    pub message: String,
    /// The offending field.
    pub param: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: &'static str) -> BadPrompt {
    BadPrompt { message: message.into(), param: Some(param) }
}

/// The routed prompt.
#[derive(Debug, Default)]
pub struct Prompt {
    /// Prompt tokens (exact, or estimated without a tokenizer).
    pub tokens: usize,
    /// Chained block hashes of its full blocks (token blocks, or text chunks when `!exact`).
    pub hashes: Vec<u64>,
    /// Whether the hashes are token blocks (comparable with engine KV events).
    pub exact: bool,
}

/// Which OpenAI endpoint the body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// A request's prompt before hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptInput {
    /// Token ids, or text when the model has no tokenizer.
    pub content: PromptContent,
    /// Mixed into the first block's hash: its extra keys, the adapter and the request's
    /// `cache_salt` (0: none).
    pub first_extra: u64,
    /// Mixed into every later block's hash: the LoRA adapter (0: none).
    pub rest_extra: u64,
}

/// What a prompt is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptContent {
    /// Exact token ids.
    Tokens(Vec<u32>),
    /// Text, for approximate routing.
    Text(String),
}

impl PromptInput {
    /// Reads the prompt of `body` (already parsed), refusing bad or over-long prompts; `lora` is
    /// the adapter the request's model names, if it is one.
    pub fn read(
        body: &Value,
        endpoint: Endpoint,
        tokenizer: Option<&Tokenizer>,
        cache: &mut EncodeCache,
        max_model_len: Option<usize>,
        lora: Option<&str>,
    ) -> Result<PromptInput, BadPrompt> {
        let salt = cache_salt(body)?;
        // The engine's event form of the keys, in vLLM's order (adapter, then salt).
        let lora = lora.map(|l| ExtraKey::Str(l.to_owned()));
        let first: Vec<ExtraKey> = lora.iter().cloned().chain(salt.map(ExtraKey::Str)).collect();
        let first_extra = if first.is_empty() { 0 } else { extra_keys_hash(&first) };
        let rest_extra = lora.map_or(0, |l| extra_keys_hash(&[l]));
        let Some(tok) = tokenizer else {
            return Ok(PromptInput { content: PromptContent::Text(text(body, endpoint)?), first_extra, rest_extra });
        };
        let ids = tokens(body, endpoint, tok, cache)?;
        if let Some(max) = max_model_len {
            // As vLLM: the prompt must leave room for at least one generated token.
            if ids.len() >= max {
                return Err(bad(
                    format!(
                        "This model's maximum context length is {max} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                        ids.len()
                    ),
                    if endpoint == Endpoint::Chat { "messages" } else { "prompt" },
                ));
            }
        }
        Ok(PromptInput { content: PromptContent::Tokens(ids), first_extra, rest_extra })
    }

    /// Prompt tokens (estimated as bytes / 4 for text).
    pub fn tokens(&self) -> usize {
        match &self.content {
            PromptContent::Tokens(ids) => ids.len(),
            PromptContent::Text(t) => t.len() / 4,
        }
    }

    /// Hashes the prompt in `block_size`-token blocks (text: [`TEXT_CHUNK_BYTES`] chunks).
    pub fn hash(&self, block_size: u32, seed: u64) -> Prompt {
        let mut out = Prompt { tokens: self.tokens(), ..Prompt::default() };
        match &self.content {
            PromptContent::Tokens(ids) => {
                out.exact = true;
                hash_blocks_keyed(seed, ids, block_size as usize, self.first_extra, self.rest_extra, &mut out.hashes);
            }
            PromptContent::Text(text) => {
                let (mut parent, mut extra) = (TEXT_SEED, self.first_extra);
                for chunk in text.as_bytes().chunks_exact(TEXT_CHUNK_BYTES) {
                    let words: Vec<u32> =
                        chunk.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
                    parent = block_hash(parent, &words, extra);
                    extra = self.rest_extra;
                    out.hashes.push(parent);
                }
            }
        }
        out
    }
}

/// Reads the prompt of `body` (already parsed) and hashes it in `block_size`-token blocks.
pub fn prompt(
    body: &Value,
    endpoint: Endpoint,
    tokenizer: Option<&Tokenizer>,
    cache: &mut EncodeCache,
    block_size: u32,
    seed: u64,
    max_model_len: Option<usize>,
) -> Result<Prompt, BadPrompt> {
    Ok(PromptInput::read(body, endpoint, tokenizer, cache, max_model_len, None)?.hash(block_size, seed))
}

fn tokens(body: &Value, endpoint: Endpoint, tok: &Tokenizer, cache: &mut EncodeCache) -> Result<Vec<u32>, BadPrompt> {
    match endpoint {
        Endpoint::Chat => {
            let messages = body.get("messages").ok_or_else(|| bad("Field required: `messages`", "messages"))?;
            match messages.as_array() {
                Some(m) if m.is_empty() => return Err(bad("`messages` must not be empty", "messages")),
                Some(_) => {}
                None => return Err(bad("`messages` must be an array", "messages")),
            }
            let flag = |k: &str, default: bool| body.get(k).and_then(Value::as_bool).unwrap_or(default);
            let input = ChatTemplateInput {
                messages,
                add_generation_prompt: flag("add_generation_prompt", true),
                continue_final_message: flag("continue_final_message", false),
                tools: body.get("tools").filter(|t| !t.is_null()),
                chat_template_kwargs: body.get("chat_template_kwargs").and_then(Value::as_object),
            };
            tok.encode_chat_cached(&input, cache).map_err(|e| bad(e.to_string(), "messages"))
        }
        Endpoint::Completions => {
            let p = body.get("prompt").ok_or_else(|| bad("Field required: `prompt`", "prompt"))?;
            let first = match p {
                Value::Array(items) if items.first().is_some_and(|x| x.is_string() || x.is_array()) => &items[0],
                other => other,
            };
            match first {
                Value::String(s) => {
                    let add_special = body.get("add_special_tokens").and_then(Value::as_bool).unwrap_or(true);
                    tok.encode_cached(s, add_special, cache).map_err(|e| bad(e.to_string(), "prompt"))
                }
                Value::Array(ids) => {
                    if ids.is_empty() {
                        return Err(bad("`prompt` must not be empty", "prompt"));
                    }
                    let vocab = tok.vocab_size();
                    ids.iter()
                        .map(|v| match v.as_u64() {
                            Some(id) if id < u64::from(vocab) => Ok(id as u32),
                            _ => Err(bad(format!("token id {v} out of vocabulary [0, {vocab})"), "prompt")),
                        })
                        .collect()
                }
                _ => Err(bad("`prompt` must be a string, a list of strings or token ids", "prompt")),
            }
        }
    }
}

/// The first block's extra hash for the request's `cache_salt` (0 without one). vLLM refuses a
/// salt that is not a non-empty string, with this message.
fn cache_salt(body: &Value) -> Result<Option<String>, BadPrompt> {
    match body.get("cache_salt") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(bad("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")),
    }
}

/// The prompt's text without a tokenizer: the prompt string, or message contents in order.
fn text(body: &Value, endpoint: Endpoint) -> Result<String, BadPrompt> {
    match endpoint {
        Endpoint::Chat => {
            let messages = body
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("Field required: `messages` (an array)", "messages"))?;
            if messages.is_empty() {
                return Err(bad("`messages` must not be empty", "messages"));
            }
            let mut s = String::new();
            for m in messages {
                s.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
                s.push('\n');
                match m.get("content") {
                    Some(Value::String(c)) => s.push_str(c),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            s.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""));
                        }
                    }
                    _ => {}
                }
                s.push('\n');
            }
            Ok(s)
        }
        Endpoint::Completions => match body.get("prompt") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(items)) => Ok(match items.first() {
                Some(Value::String(s)) => s.clone(),
                _ => items.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
            }),
            _ => Err(bad("Field required: `prompt`", "prompt")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_kvindex::hash::hash_blocks;
    use serde_json::json;

    fn run(body: Value, endpoint: Endpoint, tok: Option<&Tokenizer>) -> Result<Prompt, BadPrompt> {
        prompt(&body, endpoint, tok, &mut EncodeCache::default(), 16, 1337, Some(64))
    }

    #[test]
    fn chat_prompts_hash_their_templated_tokens() {
        let tok = Tokenizer::builtin();
        let words = gantry_tokenizer::builtin_word_text(0, 40);
        let body = json!({"messages": [{"role": "user", "content": words}]});
        let p = run(body.clone(), Endpoint::Chat, Some(&tok)).unwrap();
        let input = ChatTemplateInput::new(&body["messages"]);
        let ids = tok.encode_chat(&input).unwrap();
        assert_eq!(p.tokens, ids.len());
        assert!(p.exact);
        let mut want = Vec::new();
        hash_blocks(1337, &ids, 16, 0, &mut want);
        assert_eq!(p.hashes, want);
        assert_eq!(p.hashes.len(), ids.len() / 16);
    }

    #[test]
    fn bad_prompts_are_refused_with_the_field_named() {
        let tok = Tokenizer::builtin();
        let cases = [
            (json!({"messages": []}), Endpoint::Chat, "messages"),
            (json!({"messages": "hi"}), Endpoint::Chat, "messages"),
            (json!({}), Endpoint::Chat, "messages"),
            (json!({"prompt": [1, 2, 99999999]}), Endpoint::Completions, "prompt"),
            (json!({"prompt": [1, -2]}), Endpoint::Completions, "prompt"),
            (json!({"prompt": []}), Endpoint::Completions, "prompt"),
            (json!({"prompt": 5}), Endpoint::Completions, "prompt"),
            (json!({"prompt": gantry_tokenizer::builtin_word_text(0, 65)}), Endpoint::Completions, "prompt"),
        ];
        for (body, ep, param) in cases {
            let e = run(body.clone(), ep, Some(&tok)).unwrap_err();
            assert_eq!(e.param, Some(param), "{body}: {}", e.message);
        }
        let long =
            run(json!({"prompt": gantry_tokenizer::builtin_word_text(0, 65)}), Endpoint::Completions, Some(&tok));
        assert!(long.unwrap_err().message.contains("maximum context length is 64"));
        // As vLLM (and `gantry mock`): a prompt of the whole context leaves no room to generate.
        let whole =
            |n| run(json!({"prompt": gantry_tokenizer::builtin_word_text(0, n)}), Endpoint::Completions, Some(&tok));
        assert!(whole(64).is_err(), "64 tokens of a 64-token context");
        assert_eq!(whole(63).expect("63 tokens fit").tokens, 63);
    }

    #[test]
    fn a_cache_salt_keys_the_first_block_as_the_engines_events_do() {
        let tok = Tokenizer::builtin();
        let words = gantry_tokenizer::builtin_word_text(0, 40);
        let plain = run(json!({"prompt": words}), Endpoint::Completions, Some(&tok)).unwrap();
        let salted =
            run(json!({"prompt": words, "cache_salt": "tenant-a"}), Endpoint::Completions, Some(&tok)).unwrap();
        let ids = tok.encode(&words, true).unwrap();
        let mut want = Vec::new();
        hash_blocks(1337, &ids, 16, extra_keys_hash(&[ExtraKey::Str("tenant-a".into())]), &mut want);
        assert_eq!(salted.hashes, want);
        assert_ne!(salted.hashes[0], plain.hashes[0]);
        let other = run(json!({"prompt": words, "cache_salt": "tenant-b"}), Endpoint::Completions, Some(&tok)).unwrap();
        assert_ne!(salted.hashes[0], other.hashes[0], "each salt has its own chain");
        let null = run(json!({"prompt": words, "cache_salt": null}), Endpoint::Completions, Some(&tok)).unwrap();
        assert_eq!(null.hashes, plain.hashes);
        let text = |salt: Value| {
            run(
                json!({"messages": [{"role": "user", "content": "x".repeat(200)}], "cache_salt": salt}),
                Endpoint::Chat,
                None,
            )
            .unwrap()
            .hashes
        };
        assert_ne!(text(json!("a"))[0], text(Value::Null)[0], "text chunks are salted too");
        for bad_salt in [json!(""), json!(5), json!(["a"])] {
            let e =
                run(json!({"prompt": words, "cache_salt": bad_salt}), Endpoint::Completions, Some(&tok)).unwrap_err();
            assert_eq!(e.param, Some("cache_salt"));
            assert_eq!(e.message, "Parameter 'cache_salt' must be a non-empty string if provided.");
        }
    }

    #[test]
    fn a_lora_adapter_keys_every_block_as_the_engines_events_do() {
        let tok = Tokenizer::builtin();
        let words = gantry_tokenizer::builtin_word_text(0, 40);
        let body = json!({"prompt": words, "cache_salt": "tenant-a"});
        let read = |body: &Value, lora| {
            PromptInput::read(body, Endpoint::Completions, Some(&tok), &mut EncodeCache::default(), None, lora)
                .unwrap()
                .hash(16, 1337)
                .hashes
        };
        // The events' keys: `[lora, salt]` on the first block, `[lora]` on every other.
        let key = |k: &[&str]| extra_keys_hash(&k.iter().map(|s| ExtraKey::Str((*s).to_owned())).collect::<Vec<_>>());
        let ids = tok.encode(&words, true).unwrap();
        let mut want = Vec::new();
        hash_blocks_keyed(1337, &ids, 16, key(&["sql-lora", "tenant-a"]), key(&["sql-lora"]), &mut want);
        assert!(want.len() >= 2);
        assert_eq!(read(&body, Some("sql-lora")), want);
        let unsalted = read(&json!({"prompt": words}), Some("sql-lora"));
        assert_eq!(unsalted[0], block_hash(1337, &ids[..16], key(&["sql-lora"])));
        let base = read(&body, None);
        assert!(base.iter().zip(&want).all(|(a, b)| a != b), "no block of the base model's chain is the adapter's");
    }

    #[test]
    fn completions_take_ids_or_the_first_prompt_of_a_batch() {
        let tok = Tokenizer::builtin();
        let ids: Vec<u32> = (300..340).collect();
        let p = run(json!({"prompt": ids}), Endpoint::Completions, Some(&tok)).unwrap();
        assert_eq!((p.tokens, p.hashes.len()), (40, 2));
        let a = gantry_tokenizer::builtin_word_text(0, 32);
        let batch = run(json!({"prompt": [a.clone(), "x"]}), Endpoint::Completions, Some(&tok)).unwrap();
        let single = run(json!({"prompt": a}), Endpoint::Completions, Some(&tok)).unwrap();
        assert_eq!(batch.hashes, single.hashes);
    }

    #[test]
    fn without_a_tokenizer_shared_text_prefixes_share_chunk_hashes() {
        let long = "x".repeat(10 * TEXT_CHUNK_BYTES);
        let a = run(
            json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "a"}]}),
            Endpoint::Chat,
            None,
        )
        .unwrap();
        let b = run(
            json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "b"}]}),
            Endpoint::Chat,
            None,
        )
        .unwrap();
        assert!(!a.exact);
        assert!(a.hashes.len() >= 10);
        assert_eq!(a.hashes[..10], b.hashes[..10]);
        let c = run(json!({"messages": [{"role": "user", "content": long}]}), Endpoint::Chat, None).unwrap();
        assert_ne!(a.hashes[0], c.hashes[0], "a different role changes the first chunk");
    }
}
