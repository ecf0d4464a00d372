//! Incremental parser for `text/event-stream` bodies (the subset OpenAI servers send).
//!
//! Events are separated by a blank line; `data:` lines of one event are joined with `\n`;
//! lines starting with `:` are comments (keep-alives) and are skipped, as are events that carry
//! no data. `\n` and `\r\n` line endings are both accepted.

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
