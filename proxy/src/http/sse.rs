//! Incremental parser for `text/event-stream` bodies (the subset OpenAI servers send).
//!
//! Events are separated by a blank line; `data:` lines of one event are joined with `\n`;
//! lines starting with `:` are comments (keep-alives) and are skipped, as are events that carry
//! no data. `\n` and `\r\n` line endings are both accepted.
//!
//! Also the scans of an event's OpenAI payload that the proxy and the bench client share:
//! [`is_token_event`] (what counts as a token for TTFT and ITL) and [`json_uint_after`] (usage).

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The joined `data:` lines.
    pub data: String,
}

/// Feed bytes as they arrive with [`SseParser::push`], take events with [`SseParser::next_event`].
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    pos: usize,
    current: SseEvent,
    has_data: bool,
}

/// Longest buffered, unfinished event accepted before the stream is declared malformed.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Returns false if the unfinished event grew past [`MAX_EVENT_BYTES`].
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
        self.buf.len() - self.pos <= MAX_EVENT_BYTES
    }

    /// The next complete event, if one has fully arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let rest = &self.buf[self.pos..];
            let eol = memchr::memchr(b'\n', rest)?;
            let line = &rest[..eol];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            self.pos += eol + 1;
            if line.is_empty() {
                if self.has_data {
                    self.has_data = false;
                    return Some(std::mem::take(&mut self.current));
                }
                self.current = SseEvent::default();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                "event" => self.current.event = Some(value.to_owned()),
                _ => {}
            }
        }
    }
}

/// Longest event the scanner buffers across reads; longer ones are skipped (not metered).
const MAX_SCANNED_EVENT: usize = 1024 * 1024;

/// Splits a byte stream into raw SSE events (separated by `\n\n`) without allocating per
/// event: for measuring a stream that is forwarded unchanged. Only an event split across two
/// reads is copied.
#[derive(Debug, Default)]
pub struct SseScanner {
    partial: Vec<u8>,
    skipping: bool,
}

impl SseScanner {
    /// A scanner at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds received bytes; calls `on_event` with each complete event's bytes.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_event: impl FnMut(&[u8])) {
        if !self.partial.is_empty() || self.skipping {
            let split_boundary = self.partial.last() == Some(&b'\n') && bytes.first() == Some(&b'\n');
            if split_boundary {
                // The blank line straddles the two reads: the event is what was buffered.
                self.partial.pop();
            }
            let boundary =
                if split_boundary { Some((0, 1)) } else { memchr::memmem::find(bytes, b"\n\n").map(|i| (i, i + 2)) };
            match boundary {
                None => {
                    if !self.skipping && self.partial.len() + bytes.len() <= MAX_SCANNED_EVENT {
                        self.partial.extend_from_slice(bytes);
                    } else {
                        self.partial.clear();
                        self.skipping = true;
                    }
                    return;
                }
                Some((end, next)) => {
                    if !self.skipping {
                        self.partial.extend_from_slice(&bytes[..end]);
                        on_event(&self.partial);
                    }
                    self.partial.clear();
                    self.skipping = false;
                    bytes = &bytes[next..];
                }
            }
        }
        while let Some(i) = memchr::memmem::find(bytes, b"\n\n") {
            on_event(&bytes[..i]);
            bytes = &bytes[i + 2..];
        }
        if bytes.len() <= MAX_SCANNED_EVENT {
            self.partial.extend_from_slice(bytes);
        } else {
            self.skipping = true;
        }
    }
}

/// Whether an SSE event, or its `data` payload, carries generated text: a non-empty `content`
/// or `text`, or reasoning (`reasoning_content`, `reasoning`), which reasoning models stream
/// before their answer, so it is their first token.
pub fn is_token_event(data: &[u8]) -> bool {
    const KEYS: [&[u8]; 4] = [b"\"content\":\"", b"\"text\":\"", b"\"reasoning_content\":\"", b"\"reasoning\":\""];
    KEYS.iter()
        .any(|k| memchr::memmem::find(data, k).is_some_and(|i| data.get(i + k.len()).is_some_and(|&b| b != b'"')))
}

/// The unsigned integer that follows `key` (such as `"completion_tokens":`) in a JSON text,
/// found by scanning, not parsing: for usage numbers in bodies and events relayed unchanged.
pub fn json_uint_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(json, key)? + key.len();
    let digits: &[u8] = json[at..].trim_ascii_start();
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}
