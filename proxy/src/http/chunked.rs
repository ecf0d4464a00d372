//! Chunked transfer coding: an incremental decoder and the encoder's framing helpers.

use bytes::{Bytes, BytesMut};

use super::HttpError;

/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_SIZE_LINE: usize = 1024;
/// Longest trailer section accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Incremental decoder of a chunked body. Feed it the connection's read buffer; it takes what
/// it can decode and leaves the rest (for example the next pipelined message) in place.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the zero-size chunk: skipping trailer lines until the empty line.
    Trailers,
    /// The body is complete.
    Done,
}

/// One step of decoding.
#[derive(Debug)]
pub enum Decoded {
    /// Some body bytes.
    Data(Bytes),
    /// More input is needed.
    NeedMore,
    /// The body is complete (the terminating chunk and trailers were consumed).
    Done,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedDecoder { state: State::Size }
    }

    /// Whether the terminating chunk has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the front of `buf`, consuming what it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, HttpError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Size => {
                    let Some(eol) = memchr::memchr(b'\n', buf) else {
                        if buf.len() > MAX_SIZE_LINE {
                            return Err(HttpError::BadChunk("chunk-size line too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    if eol > MAX_SIZE_LINE {
                        return Err(HttpError::BadChunk("chunk-size line too long"));
                    }
                    let line = &buf[..eol];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err(HttpError::BadChunk("invalid chunk size"));
                    }
                    let mut size: u64 = 0;
                    for &d in digits {
                        let v = (d as char).to_digit(16).ok_or(HttpError::BadChunk("invalid chunk size"))?;
                        size = size * 16 + u64::from(v);
                    }
                    let _ = buf.split_to(eol + 1);
                    self.state = if size == 0 { State::Trailers } else { State::Data(size) };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = (left.min(buf.len() as u64)) as usize;
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Decoded::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r' && b != b'\n') {
                            return Err(HttpError::BadChunk("missing CRLF after chunk data"));
                        }
                        if buf.first() == Some(&b'\n') {
                            let _ = buf.split_to(1);
                            self.state = State::Size;
                            continue;
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        let _ = buf.split_to(2);
                    } else if buf[0] == b'\n' {
                        let _ = buf.split_to(1);
                    } else {
                        return Err(HttpError::BadChunk("missing CRLF after chunk data"));
                    }
                    self.state = State::Size;
                }
                State::Trailers => {
                    let Some(eol) = memchr::memchr(b'\n', buf) else {
                        if buf.len() > MAX_TRAILERS {
                            return Err(HttpError::BadChunk("trailers too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let line_len = if eol > 0 && buf[eol - 1] == b'\r' { eol - 1 } else { eol };
                    let _ = buf.split_to(eol + 1);
                    if line_len == 0 {
                        self.state = State::Done;
                        return Ok(Decoded::Done);
                    }
                }
            }
        }
    }
}

/// Appends one chunk (size line, data, CRLF) to `out`. Empty `data` writes nothing, since a
/// zero-size chunk would end the body; use [`LAST_CHUNK`] for that.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    while n > 0 || i == hex.len() {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
    }
    out.reserve(hex.len() - i + data.len() + 4);
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The terminating zero-size chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
