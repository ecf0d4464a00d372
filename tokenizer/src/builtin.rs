//! The deterministic built-in tokenizer: 3 special tokens, 256 byte tokens, 16,380 word tokens.

use std::sync::OnceLock;

/// Consonants of the built-in syllables, in order.
pub const BUILTIN_CONSONANTS: &str = "bcdfghjklmnprstvwz";
/// Vowels of the built-in syllables, in order.
pub const BUILTIN_VOWELS: &str = "aeiou";
/// Number of syllables (consonant × vowel).
const SYLLABLES: usize = 18 * 5;
/// Number of built-in words: 90 one-syllable words, then 8,100 two-syllable words.
pub const BUILTIN_WORD_COUNT: usize = SYLLABLES + SYLLABLES * SYLLABLES;
/// Special tokens of the built-in tokenizer; their ids are their indices.
pub const BUILTIN_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Id of the first byte token (byte `b` has id `BUILTIN_FIRST_BYTE_ID + b`).
pub const BUILTIN_FIRST_BYTE_ID: u32 = 3;
/// Id of the first word token: word `w` with a leading space is `BUILTIN_FIRST_WORD_ID + 2w`,
/// without one `BUILTIN_FIRST_WORD_ID + 2w + 1`.
pub const BUILTIN_FIRST_WORD_ID: u32 = BUILTIN_FIRST_BYTE_ID + 256;
/// Vocabulary size of the built-in tokenizer (16,639).
pub const BUILTIN_VOCAB_SIZE: u32 = BUILTIN_FIRST_WORD_ID + 2 * BUILTIN_WORD_COUNT as u32;
/// The built-in ChatML chat template.
pub const BUILTIN_CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
/// How many leading-space word tokens `output_tokens()` returns for the built-in tokenizer.
pub const BUILTIN_OUTPUT_TOKENS: usize = 512;

/// All 8,190 built-in words in id order (`builtin_words()[w]` is word `w`).
///
/// Joining `n` of them with a leading space each (`" bado kema ..."`) gives text that the
/// built-in tokenizer encodes to exactly `n` tokens.
pub fn builtin_words() -> &'static [&'static str] {
    static TEXT: OnceLock<String> = OnceLock::new();
    static WORDS: OnceLock<Vec<&'static str>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let text = TEXT.get_or_init(|| {
            let syl = syllables();
            let mut s = String::with_capacity(BUILTIN_WORD_COUNT * 4);
            for a in &syl {
                s.push_str(a);
            }
            for a in &syl {
                for b in &syl {
                    s.push_str(a);
                    s.push_str(b);
                }
            }
            s
        });
        let mut words = Vec::with_capacity(BUILTIN_WORD_COUNT);
        let (one, two) = text.split_at(SYLLABLES * 2);
        words.extend((0..SYLLABLES).map(|i| &one[2 * i..2 * i + 2]));
        words.extend((0..SYLLABLES * SYLLABLES).map(|i| &two[4 * i..4 * i + 4]));
        words
    })
}

/// `n` built-in words starting at word `start` (wrapping), each with a leading space: text that
/// the built-in tokenizer encodes to exactly `n` tokens.
pub fn builtin_word_text(start: usize, n: usize) -> String {
    let words = builtin_words();
    let mut s = String::with_capacity(n * 5);
    for i in 0..n {
        s.push(' ');
        s.push_str(words[(start + i) % words.len()]);
    }
    s
}

fn syllables() -> Vec<String> {
    let mut v = Vec::with_capacity(SYLLABLES);
    for c in BUILTIN_CONSONANTS.chars() {
        for w in BUILTIN_VOWELS.chars() {
            v.push(format!("{c}{w}"));
        }
    }
    v
}

/// Lookup tables of the built-in tokenizer, built once by [`Builtin::new`].
pub(crate) struct Builtin {
    /// Bytes of every token, indexed by id.
    token_bytes: Vec<Box<[u8]>>,
    /// Syllable index of each ASCII letter pair, `[first][second]`; `u8::MAX` = not a syllable.
    consonant: [u8; 256],
    vowel: [u8; 256],
}

impl Builtin {
    pub(crate) fn new() -> Builtin {
        let mut token_bytes: Vec<Box<[u8]>> = Vec::with_capacity(BUILTIN_VOCAB_SIZE as usize);
        for s in BUILTIN_SPECIAL_TOKENS {
            token_bytes.push(s.as_bytes().into());
        }
        for b in 0..=255u8 {
            token_bytes.push(Box::new([b]));
        }
        for w in builtin_words() {
            token_bytes.push(format!(" {w}").into_bytes().into());
            token_bytes.push(w.as_bytes().into());
        }
        debug_assert_eq!(token_bytes.len(), BUILTIN_VOCAB_SIZE as usize);
        let mut consonant = [u8::MAX; 256];
        for (i, c) in BUILTIN_CONSONANTS.bytes().enumerate() {
            consonant[c as usize] = i as u8;
        }
        let mut vowel = [u8::MAX; 256];
        for (i, c) in BUILTIN_VOWELS.bytes().enumerate() {
            vowel[c as usize] = i as u8;
        }
        Builtin { token_bytes, consonant, vowel }
    }

    /// Syllable index of the two bytes `s`, if they form one.
    fn syllable(&self, s: &[u8]) -> Option<usize> {
        let c = self.consonant[s[0] as usize];
        let v = self.vowel[s[1] as usize];
        (c != u8::MAX && v != u8::MAX).then_some(c as usize * 5 + v as usize)
    }

    /// Word index of a run of lowercase letters, if it is a vocabulary word.
    fn word(&self, letters: &[u8]) -> Option<usize> {
        match letters.len() {
            2 => self.syllable(letters),
            4 => {
                let a = self.syllable(&letters[..2])?;
                let b = self.syllable(&letters[2..])?;
                Some(SYLLABLES + a * SYLLABLES + b)
            }
            _ => None,
        }
    }

    /// Encodes `text`; special-token strings anywhere in it become their special token.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() / 4 + 4);
        let mut start = 0;
        let mut i = 0;
        while i + 1 < bytes.len() {
            if bytes[i] == b'<' && bytes[i + 1] == b'|' {
                if let Some(id) = BUILTIN_SPECIAL_TOKENS.iter().position(|s| bytes[i..].starts_with(s.as_bytes())) {
                    self.encode_plain(&bytes[start..i], &mut out);
                    out.push(id as u32);
                    i += BUILTIN_SPECIAL_TOKENS[id].len();
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        self.encode_plain(&bytes[start..], &mut out);
        out
    }

    /// Encodes text that holds no special tokens.
    fn encode_plain(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let space = b == b' ' && bytes.get(i + 1).is_some_and(u8::is_ascii_lowercase);
            if !space && !b.is_ascii_lowercase() {
                out.push(BUILTIN_FIRST_BYTE_ID + b as u32);
                i += 1;
                continue;
            }
            let letters_start = i + space as usize;
            let mut end = letters_start;
            while end < bytes.len() && bytes[end].is_ascii_lowercase() {
                end += 1;
            }
            match self.word(&bytes[letters_start..end]) {
                Some(w) => out.push(BUILTIN_FIRST_WORD_ID + 2 * w as u32 + (!space) as u32),
                None => out.extend(bytes[i..end].iter().map(|&b| BUILTIN_FIRST_BYTE_ID + b as u32)),
            }
            i = end;
        }
    }

    /// Bytes of token `id`, if it is in the vocabulary.
    pub(crate) fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|b| &b[..])
    }
}

#[cfg(test)]
mod tests;
