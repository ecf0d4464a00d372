//! Loading a Hugging Face model directory the way transformers / vLLM do.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::TokenizerError;

/// What a model directory holds, parsed but not yet compiled.
pub(crate) struct HfDir {
    pub(crate) tokenizer: tokenizers::Tokenizer,
    /// Template source and the file (and key) it came from.
    pub(crate) chat_template: Option<(String, String)>,
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) unk_token: Option<String>,
    pub(crate) pad_token: Option<String>,
    pub(crate) clean_up_tokenization_spaces: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    serde_json::from_slice(&read(path)?).map_err(|e| TokenizerError::Config {
        path: path.to_path_buf(),
        key: String::new(),
        message: format!("invalid JSON: {e}"),
    })
}

pub(crate) fn load(dir: &Path) -> Result<HfDir, TokenizerError> {
    if !dir.is_dir() {
        return Err(TokenizerError::NotADirectory { path: dir.to_path_buf() });
    }
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(TokenizerError::MissingFile { path: tok_path });
    }
    let tokenizer = tokenizers::Tokenizer::from_bytes(read(&tok_path)?)
        .map_err(|e| TokenizerError::TokenizerJson { path: tok_path.clone(), message: e.to_string() })?;

    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.is_file() {
        match read_json(&cfg_path)? {
            Json::Object(m) => m,
            _ => {
                return Err(config_err(&cfg_path, "", "expected a JSON object"));
            }
        }
    } else {
        serde_json::Map::new()
    };
    let token = |key: &str| -> Result<Option<String>, TokenizerError> {
        match cfg.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(config_err(&cfg_path, key, "AddedToken object without a string `content`")),
            },
            Some(_) => Err(config_err(&cfg_path, key, "expected a string, an AddedToken object or null")),
        }
    };
    let bos_token = token("bos_token")?;
    let eos_token = token("eos_token")?;
    let unk_token = token("unk_token")?;
    let pad_token = token("pad_token")?;
    let clean_up_tokenization_spaces = matches!(cfg.get("clean_up_tokenization_spaces"), Some(Json::Bool(true)));

    // transformers' order: chat_template.jinja, chat_template.json, tokenizer_config.json.
    let jinja_path = dir.join("chat_template.jinja");
    let json_path = dir.join("chat_template.json");
    let chat_template = if jinja_path.is_file() {
        let src = String::from_utf8(read(&jinja_path)?).map_err(|_| config_err(&jinja_path, "", "not valid UTF-8"))?;
        Some((src, jinja_path.display().to_string()))
    } else if json_path.is_file() {
        let j = read_json(&json_path)?;
        template_from_value(j.get("chat_template"), &json_path)?
    } else {
        template_from_value(cfg.get("chat_template"), &cfg_path)?
    };

    Ok(HfDir { tokenizer, chat_template, bos_token, eos_token, unk_token, pad_token, clean_up_tokenization_spaces })
}

fn config_err(path: &Path, key: &str, message: &str) -> TokenizerError {
    TokenizerError::Config { path: PathBuf::from(path), key: key.to_string(), message: message.to_string() }
}

/// `chat_template` is a string, or a list of `{"name", "template"}` (pick "default", else the
/// first), or absent/null.
fn template_from_value(v: Option<&Json>, path: &Path) -> Result<Option<(String, String)>, TokenizerError> {
    let origin = |suffix: &str| format!("{} (key `chat_template{suffix}`)", path.display());
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some((s.clone(), origin("")))),
        Some(Json::Array(list)) => {
            let mut first = None;
            for (i, item) in list.iter().enumerate() {
                let name = item.get("name").and_then(Json::as_str);
                let Some(tmpl) = item.get("template").and_then(Json::as_str) else {
                    return Err(config_err(path, &format!("chat_template[{i}].template"), "expected a string"));
                };
                let entry = (tmpl.to_string(), origin(&format!("[{i}]")));
                if name == Some("default") {
                    return Ok(Some(entry));
                }
                first.get_or_insert(entry);
            }
            Ok(first)
        }
        Some(_) => {
            Err(config_err(path, "chat_template", "expected a string or a list of {\"name\", \"template\"} objects"))
        }
    }
}

/// transformers' `clean_up_tokenization` (used only when the config asks for it).
pub(crate) fn clean_up_tokenization(s: String) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
