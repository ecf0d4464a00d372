//! Tokenization shared by the mock vLLM engine and the proxy, matching vLLM exactly.
//!
//! vLLM tokenizes the two OpenAI endpoints differently, and so does [`Tokenizer`]:
//!
//! * `/v1/completions`: [`Tokenizer::encode`]`(prompt, true)` — HF `tokenizer.encode(prompt,
//!   add_special_tokens=True)`, so a post-processor (Llama 3's `TemplateProcessing`) adds BOS.
//! * `/v1/chat/completions`: [`Tokenizer::apply_chat_template`] renders the model's chat template
//!   like transformers' `apply_chat_template` (variables `messages`, `add_generation_prompt`,
//!   `tools`, `documents`, `bos_token`/`eos_token`/`unk_token`/`pad_token`, then
//!   `chat_template_kwargs`, which override all but `messages`; globals `raise_exception(msg)` and
//!   `strftime_now(fmt)` (UTC); transformers' `tojson`; Python string/dict methods via
//!   minijinja-contrib's pycompat; `trim_blocks` + `lstrip_blocks`), then
//!   [`Tokenizer::encode`]`(rendered, false)`, so the template's BOS is the only one.
//!   Messages are first normalised like vLLM's "string" content format: content-part arrays
//!   (`[{"type":"text","text":"a"},{"type":"text","text":"b"}]`) become `"a\nb"`, `null` content
//!   becomes `""`, only `role`, `content`, `name`, `tool_calls` (assistant; JSON-string
//!   `arguments` parsed to objects), `tool_call_id` (tool), `reasoning_content`/`reasoning` are
//!   kept, and non-text parts are an error.
//!
//! Main types: [`Tokenizer`] (`Send + Sync`, share it in an `Arc`), [`ChatTemplateInput`],
//! [`TokenizerError`]. A [`Tokenizer`] is either loaded from a Hugging Face model directory
//! ([`Tokenizer::from_dir`]: `tokenizer.json`, and the chat template from `chat_template.jinja`,
//! `chat_template.json` or `tokenizer_config.json`'s `chat_template`) or the built-in one.
//!
//! Read `tests/golden.rs` first: it replays token ids and rendered prompts produced by Python
//! transformers for the model directories in `testdata/` (see `testdata/README.md`).
//!
//! # The built-in tokenizer
//!
//! [`Tokenizer::builtin`] needs no files, is deterministic and invertible, and gives synthetic
//! text an exact token count. Vocabulary ([`BUILTIN_VOCAB_SIZE`] = 16,639 ids):
//!
//! | ids | tokens |
//! | --- | --- |
//! | 0, 1, 2 | special `<\|endoftext\|>`, `<\|im_start\|>`, `<\|im_end\|>`; EOS = 2, no BOS |
//! | 3..=258 | the single bytes 0x00..=0xFF (id = 3 + byte) |
//! | 259 + 2w | word `w` with a leading space (`" bado"`) |
//! | 260 + 2w | word `w` without one (`"bado"`) |
//!
//! Syllables are each consonant of `bcdfghjklmnprstvwz` followed by each vowel of `aeiou`
//! (90, consonant-major: `ba be bi bo bu ca …`). Words ([`builtin_words`], 8,190) are the 90
//! one-syllable words, then the 8,100 two-syllable words (first syllable major: `baba babe …`).
//!
//! Encoding: special-token strings anywhere in the text become their token (also with
//! `add_special_tokens = false`, as HF tokenizers do). The rest is scanned left to right: a piece
//! is an optional single space followed by a maximal run of ASCII lowercase letters; a piece that
//! is a vocabulary word is one token, otherwise each of its bytes is a byte token. Every other
//! byte (digits, punctuation, newline, uppercase, a space not followed by a lowercase letter,
//! non-ASCII) is a byte token. So `" bado kema"` is exactly 2 tokens, and **`n` words each with
//! a leading space are exactly `n` tokens** ([`builtin_word_text`]). `add_special_tokens` adds
//! nothing. Decoding concatenates the tokens' bytes and converts them to UTF-8 *lossily*
//! (invalid sequences, possible only from hand-picked byte tokens, become U+FFFD), so
//! `decode(encode(s)) == s` for every string. The chat template is [`BUILTIN_CHAT_TEMPLATE`]
//! (ChatML); `output_tokens()` is the first [`BUILTIN_OUTPUT_TOKENS`] leading-space words
//! (`" ba"`, `" be"`, …).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod builtin;
mod cache;
mod chat;
mod hf;

pub use builtin::{
    builtin_word_text, builtin_words, BUILTIN_CHAT_TEMPLATE, BUILTIN_CONSONANTS, BUILTIN_FIRST_BYTE_ID,
    BUILTIN_FIRST_WORD_ID, BUILTIN_OUTPUT_TOKENS, BUILTIN_SPECIAL_TOKENS, BUILTIN_VOCAB_SIZE, BUILTIN_VOWELS,
    BUILTIN_WORD_COUNT,
};
pub use cache::{EncodeCache, MIN_CACHED_PIECE};
pub use chat::ChatTemplateInput;

use builtin::Builtin;
use chat::ChatTemplate;

/// Everything that can go wrong loading a tokenizer or tokenizing a request.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model directory does not exist or is not a directory.
    #[error("model directory {path} does not exist or is not a directory")]
    NotADirectory { path: PathBuf },
    /// A required file is missing.
    #[error("{path}: file not found (a model directory needs tokenizer.json)")]
    MissingFile { path: PathBuf },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `tokenizer.json` could not be parsed.
    #[error("{path}: invalid tokenizer.json: {message}")]
    TokenizerJson { path: PathBuf, message: String },
    /// A config file or one of its keys is invalid.
    #[error("{path}{}: {message}", if key.is_empty() { String::new() } else { format!(": key `{key}`") })]
    Config { path: PathBuf, key: String, message: String },
    /// The model has no chat template.
    #[error("{name}: no chat template; as of transformers v4.44 a default chat template is no longer allowed, so chat requests need a model with `chat_template`")]
    NoChatTemplate { name: String },
    /// The chat template failed to compile or render (including `raise_exception`).
    #[error("template error: {message}")]
    Template { message: String },
    /// A message in the request is malformed; `path` is e.g. `messages[2].content`.
    #[error("{path}: {message}")]
    Messages { path: String, message: String },
    /// Request flags that cannot be combined.
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// A token id outside the vocabulary.
    #[error("token id {id} out of range (vocab size {vocab_size})")]
    IdOutOfRange { id: u32, vocab_size: u32 },
    /// The HF tokenizer failed to encode or decode.
    #[error("tokenizer error: {message}")]
    Tokenizers { message: String },
}

enum Backend {
    Builtin(Box<Builtin>),
    Hf { tok: Box<tokenizers::Tokenizer>, clean_up_spaces: bool },
}

/// A tokenizer plus chat template: the built-in one or a Hugging Face model directory's.
pub struct Tokenizer {
    name: String,
    backend: Backend,
    template: Option<ChatTemplate>,
    vocab_size: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    output_tokens: Vec<u32>,
    /// `decode([id])` for each id of `output_tokens`, keyed by id.
    pieces: HashMap<u32, Box<str>>,
    /// Special tokens that split text into independently encoded pieces (see [`EncodeCache`]);
    /// `None` when this tokenizer failed the split self-check.
    splitter: Option<Splitter>,
}

/// Verbatim special tokens and their ids, found leftmost-longest.
struct Splitter {
    finder: aho_corasick::AhoCorasick,
    ids: Vec<u32>,
}

impl Splitter {
    fn new(tokens: Vec<(String, u32)>) -> Option<Splitter> {
        if tokens.is_empty() {
            return None;
        }
        let finder = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(s, _)| s.as_str()))
            .ok()?;
        Some(Splitter { finder, ids: tokens.into_iter().map(|(_, id)| id).collect() })
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

/// How many output tokens a model directory's tokenizer offers at most.
const MAX_OUTPUT_TOKENS: usize = 512;

impl Tokenizer {
    /// The deterministic built-in tokenizer (see the crate docs).
    pub fn builtin() -> Tokenizer {
        let b = Builtin::new();
        let output_tokens: Vec<u32> =
            (0..BUILTIN_OUTPUT_TOKENS as u32).map(|w| BUILTIN_FIRST_WORD_ID + 2 * w).collect();
        let pieces = output_tokens
            .iter()
            .map(|&id| {
                let bytes = b.token_bytes(id).unwrap_or_default();
                (id, String::from_utf8_lossy(bytes).into())
            })
            .collect();
        let template = ChatTemplate::new(
            BUILTIN_CHAT_TEMPLATE.to_string(),
            "builtin",
            vec![("eos_token", BUILTIN_SPECIAL_TOKENS[2].to_string())],
        )
        .ok();
        Tokenizer {
            name: "builtin".into(),
            backend: Backend::Builtin(Box::new(b)),
            template,
            vocab_size: BUILTIN_VOCAB_SIZE,
            bos_id: None,
            eos_id: Some(2),
            output_tokens,
            pieces,
            splitter: Splitter::new(
                BUILTIN_SPECIAL_TOKENS.iter().enumerate().map(|(id, s)| (s.to_string(), id as u32)).collect(),
            ),
        }
    }

    /// Loads a Hugging Face model directory (`tokenizer.json` required).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let d = hf::load(dir)?;
        let name = dir.display().to_string();
        let tok = d.tokenizer;
        let vocab_size = tok
            .get_vocab(true)
            .values()
            .map(|&id| id.saturating_add(1))
            .max()
            .unwrap_or(0)
            .max(tok.get_vocab_size(true) as u32);
        let bos_id = d.bos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let eos_id = d.eos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let mut specials = Vec::new();
        for (k, v) in [
            ("bos_token", &d.bos_token),
            ("eos_token", &d.eos_token),
            ("unk_token", &d.unk_token),
            ("pad_token", &d.pad_token),
        ] {
            if let Some(v) = v {
                specials.push((k, v.clone()));
            }
        }
        let template = match d.chat_template {
            Some((src, origin)) => Some(ChatTemplate::new(src, &origin, specials)?),
            None => None,
        };
        let mut t = Tokenizer {
            name,
            backend: Backend::Hf { tok: Box::new(tok), clean_up_spaces: d.clean_up_tokenization_spaces },
            template,
            vocab_size,
            bos_id,
            eos_id,
            output_tokens: Vec::new(),
            pieces: HashMap::new(),
            splitter: None,
        };
        t.pick_output_tokens();
        t.splitter = t.hf_splitter();
        Ok(t)
    }

    /// `None` -> [`Tokenizer::builtin`], `Some(dir)` -> [`Tokenizer::from_dir`].
    pub fn load(dir: Option<&Path>) -> Result<Tokenizer, TokenizerError> {
        match dir {
            None => Ok(Tokenizer::builtin()),
            Some(d) => Tokenizer::from_dir(d),
        }
    }

    /// `"builtin"` or the model directory's path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The HF tokenizer's verbatim special tokens, if splitting at them passes a self-check.
    fn hf_splitter(&self) -> Option<Splitter> {
        let Backend::Hf { tok, .. } = &self.backend else { return None };
        let mut tokens: Vec<(String, u32)> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.normalized && !t.lstrip && !t.rstrip && !t.single_word)
            .map(|(id, t)| (t.content, id))
            .collect();
        tokens.sort_by_key(|&(_, id)| id);
        let splitter = Splitter::new(tokens)?;
        // Pieces are encoded alone; a pre-tokenizer that treats the text's first piece apart
        // (Metaspace `prepend_scheme: first`) would then differ. Check a few shapes.
        let probe =
            |s: &str| -> String { format!("Hello world{s}\nuser turn one\n{s} two  spaces{s}{s}x\ty{s} tail  ") };
        let mut cache = EncodeCache::with_capacity_tokens(1 << 12);
        let mut split = Vec::new();
        let specials: Vec<String> =
            tok.get_added_tokens_decoder().values().filter(|t| t.special).take(4).map(|t| probe(&t.content)).collect();
        for text in specials {
            let whole = tok.encode_fast(text.as_str(), false).ok()?.get_ids().to_vec();
            split.clear();
            self.encode_split(&splitter, &text, &mut cache, &mut split).ok()?;
            if whole != split {
                return None;
            }
        }
        Some(splitter)
    }

    /// Encodes `text` piece by piece between `splitter`'s tokens, without special tokens added.
    fn encode_split(
        &self,
        splitter: &Splitter,
        text: &str,
        cache: &mut EncodeCache,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut piece = |p: &str, out: &mut Vec<u32>| -> Result<(), TokenizerError> {
            if p.is_empty() {
                Ok(())
            } else if p.len() < MIN_CACHED_PIECE {
                out.extend(self.encode(p, false)?);
                Ok(())
            } else {
                cache.piece(p, out, |p| self.encode(p, false))
            }
        };
        let mut at = 0;
        for m in splitter.finder.find_iter(text) {
            piece(&text[at..m.start()], out)?;
            out.push(splitter.ids[m.pattern().as_usize()]);
            at = m.end();
        }
        piece(&text[at..], out)
    }

    /// [`Tokenizer::encode`] through a per-thread [`EncodeCache`]: the same ids, but text between
    /// special tokens that was encoded before costs a hash lookup. Falls back to a plain encode
    /// when the tokenizer cannot be split (see the cache's docs) or when `add_special_tokens`
    /// would make a Hugging Face post-processor add tokens.
    pub fn encode_cached(
        &self,
        text: &str,
        add_special_tokens: bool,
        cache: &mut EncodeCache,
    ) -> Result<Vec<u32>, TokenizerError> {
        let hf_specials = add_special_tokens && matches!(self.backend, Backend::Hf { .. });
        match &self.splitter {
            Some(splitter) if !hf_specials => {
                let mut out = Vec::with_capacity(text.len() / 3 + 8);
                self.encode_split(splitter, text, cache, &mut out)?;
                Ok(out)
            }
            _ => self.encode(text, add_special_tokens),
        }
    }

    /// [`Tokenizer::encode_chat`] through `cache` (see [`Tokenizer::encode_cached`]).
    pub fn encode_chat_cached(
        &self,
        req: &ChatTemplateInput<'_>,
        cache: &mut EncodeCache,
    ) -> Result<Vec<u32>, TokenizerError> {
        let rendered = self.apply_chat_template(req)?;
        self.encode_cached(&rendered, false, cache)
    }

    /// Whether [`Tokenizer::encode_cached`] splits text (else it encodes whole, uncached).
    pub fn splits_for_cache(&self) -> bool {
        self.splitter.is_some()
    }

    /// HF `tokenizer.encode(text, add_special_tokens=...)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Builtin(b) => Ok(b.encode(text)),
            Backend::Hf { tok, .. } => tok
                .encode_fast(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Tokenizers { message: e.to_string() }),
        }
    }

    /// HF `tokenizer.decode(ids, skip_special_tokens=...)`; ids `>= vocab_size()` are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(TokenizerError::IdOutOfRange { id, vocab_size: self.vocab_size });
        }
        match &self.backend {
            Backend::Builtin(b) => {
                let mut bytes = Vec::with_capacity(ids.len() * 5);
                for &id in ids {
                    if skip_special_tokens && id < BUILTIN_FIRST_BYTE_ID {
                        continue;
                    }
                    bytes.extend_from_slice(b.token_bytes(id).unwrap_or_default());
                }
                Ok(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            Backend::Hf { tok, clean_up_spaces } => {
                let s = tok
                    .decode(ids, skip_special_tokens)
                    .map_err(|e| TokenizerError::Tokenizers { message: e.to_string() })?;
                Ok(if *clean_up_spaces { hf::clean_up_tokenization(s) } else { s })
            }
        }
    }

    /// Renders the chat template for a request (see the crate docs); encode the result with
    /// `add_special_tokens = false`.
    pub fn apply_chat_template(&self, req: &ChatTemplateInput<'_>) -> Result<String, TokenizerError> {
        match &self.template {
            Some(t) => t.render(req),
            None => Err(TokenizerError::NoChatTemplate { name: self.name.clone() }),
        }
    }

    /// [`Tokenizer::apply_chat_template`] then [`Tokenizer::encode`]`(.., false)`: the prompt
    /// token ids vLLM computes for a chat request.
    pub fn encode_chat(&self, req: &ChatTemplateInput<'_>) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&self.apply_chat_template(req)?, false)
    }

    /// Number of token ids; ids `>=` this are out of range.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The EOS token id (`eos_token` of `tokenizer_config.json`), if any.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The BOS token id (`bos_token` of `tokenizer_config.json`), if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// A fixed, deterministic list of ordinary token ids, each decoding on its own to non-empty
    /// valid UTF-8, such that `decode(seq) == concat(piece(id))` for any sequence drawn from it.
    /// The mock engine draws output tokens from it. Word-like tokens (`" the"`) come first.
    pub fn output_tokens(&self) -> &[u32] {
        &self.output_tokens
    }

    /// `decode([id])` for ids from [`Tokenizer::output_tokens`]; `""` for any other id.
    pub fn piece(&self, id: u32) -> &str {
        self.pieces.get(&id).map(|s| &**s).unwrap_or("")
    }

    /// Picks output tokens for a model directory: non-added tokens whose lone decode is
    /// non-empty valid UTF-8 and that concatenate cleanly; `" word"`-like tokens first.
    fn pick_output_tokens(&mut self) {
        let Backend::Hf { tok, .. } = &self.backend else {
            return;
        };
        let added: std::collections::HashSet<u32> = tok.get_added_tokens_decoder().keys().copied().collect();
        let dec = |ids: &[u32]| self.decode(ids, false).ok();
        let mut words: Vec<(u32, String)> = Vec::new();
        let mut others: Vec<(u32, String)> = Vec::new();
        let mut anchor: Option<(u32, String)> = None;
        for id in 0..self.vocab_size {
            if words.len() >= MAX_OUTPUT_TOKENS {
                break;
            }
            if added.contains(&id) || tok.id_to_token(id).is_none() {
                continue;
            }
            let Some(p) = dec(&[id]) else { continue };
            if p.is_empty() || p.contains('\u{FFFD}') || p.chars().any(char::is_control) {
                continue;
            }
            if dec(&[id, id]).as_deref() != Some(&format!("{p}{p}")) {
                continue;
            }
            if let Some((a, ap)) = &anchor {
                if dec(&[*a, id]).as_deref() != Some(&format!("{ap}{p}"))
                    || dec(&[id, *a]).as_deref() != Some(&format!("{p}{ap}"))
                {
                    continue;
                }
            } else {
                anchor = Some((id, p.clone()));
            }
            let wordlike = p.len() >= 3 && p.starts_with(' ') && p[1..].bytes().all(|b| b.is_ascii_alphabetic());
            if wordlike {
                words.push((id, p));
            } else if others.len() < MAX_OUTPUT_TOKENS {
                others.push((id, p));
            }
        }
        words.extend(others);
        words.truncate(MAX_OUTPUT_TOKENS);
        self.output_tokens = words.iter().map(|(id, _)| *id).collect();
        self.pieces = words.into_iter().map(|(id, p)| (id, p.into())).collect();
    }
}

/// Compile-time check: a `Tokenizer` can be shared across threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<TokenizerError>();
};
