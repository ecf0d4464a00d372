//! Reading from a connection into its buffer, and reading a body under its framing and limit.

use std::io;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

use super::chunked::{ChunkedDecoder, Decoded};
use super::{BodyFraming, HttpError};

/// Bytes reserved in the read buffer before each read.
pub(crate) const READ_RESERVE: usize = 8 * 1024;
/// Bytes reserved per read while relaying a long streamed body (fewer, larger reads).
pub const STREAM_READ_RESERVE: usize = 32 * 1024;

/// Reads once from `r`, appending to `buf`. Returns the byte count (0 = end of stream).
pub(crate) async fn fill<R: AsyncReadRent>(r: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    fill_reserving(r, buf, READ_RESERVE).await
}

/// [`fill`] with `reserve` bytes of room guaranteed before the read.
pub(crate) async fn fill_reserving<R: AsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    reserve: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < reserve {
        buf.reserve(reserve);
    }
    let owned = std::mem::take(buf);
    let (len, cap) = (owned.len(), owned.capacity());
    let (res, slice) = r.read(owned.slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    res
}

/// Reads a message body chunk by chunk, enforcing its framing and a size limit.
#[derive(Debug)]
pub struct BodyReader {
    kind: Kind,
    limit: usize,
    total: usize,
    reserve: usize,
}

#[derive(Debug)]
enum Kind {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
    Done,
}

impl BodyReader {
    /// A reader for a body with this framing. A declared length over `limit` fails at once.
    pub fn new(framing: BodyFraming, limit: usize) -> Result<BodyReader, HttpError> {
        let kind = match framing {
            BodyFraming::None | BodyFraming::Length(0) => Kind::Done,
            BodyFraming::Length(n) if n > limit as u64 => {
                return Err(HttpError::BodyTooLarge { limit });
            }
            BodyFraming::Length(n) => Kind::Length(n),
            BodyFraming::Chunked => Kind::Chunked(ChunkedDecoder::new()),
            BodyFraming::Close => Kind::Close,
        };
        Ok(BodyReader { kind, limit, total: 0, reserve: READ_RESERVE })
    }

    /// Sets the room reserved before each read (larger for long streams).
    pub fn set_read_reserve(&mut self, bytes: usize) {
        self.reserve = bytes.max(1024);
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// The next piece of the body, or `None` at its end. Reads from `r` when `buf` runs dry.
    pub async fn next<R: AsyncReadRent>(&mut self, r: &mut R, buf: &mut BytesMut) -> Result<Option<Bytes>, HttpError> {
        loop {
            let piece = match &mut self.kind {
                Kind::Done => return Ok(None),
                Kind::Length(left) => {
                    if buf.is_empty() {
                        None
                    } else {
                        let take = (*left).min(buf.len() as u64) as usize;
                        *left -= take as u64;
                        if *left == 0 {
                            self.kind = Kind::Done;
                        }
                        Some(buf.split_to(take).freeze())
                    }
                }
                Kind::Chunked(dec) => match dec.decode(buf)? {
                    Decoded::Data(d) => Some(d),
                    Decoded::Done => {
                        self.kind = Kind::Done;
                        return Ok(None);
                    }
                    Decoded::NeedMore => None,
                },
                Kind::Close => {
                    if buf.is_empty() {
                        None
                    } else {
                        Some(buf.split().freeze())
                    }
                }
            };
            if let Some(data) = piece {
                self.total += data.len();
                if self.total > self.limit {
                    return Err(HttpError::BodyTooLarge { limit: self.limit });
                }
                return Ok(Some(data));
            }
            if fill_reserving(r, buf, self.reserve).await? == 0 {
                if matches!(self.kind, Kind::Close) {
                    self.kind = Kind::Done;
                    return Ok(None);
                }
                return Err(HttpError::UnexpectedEof("body"));
            }
        }
    }

    /// Reads the rest of the body into one buffer.
    pub async fn read_all<R: AsyncReadRent>(&mut self, r: &mut R, buf: &mut BytesMut) -> Result<Bytes, HttpError> {
        // Fast path: a Content-Length body already fully buffered is split off without copying.
        if let Kind::Length(n) = self.kind {
            if buf.len() as u64 >= n {
                if let Some(b) = self.next(r, buf).await? {
                    return Ok(b);
                }
            }
        }
        let mut out = BytesMut::new();
        while let Some(piece) = self.next(r, buf).await? {
            if out.is_empty() && self.is_done() {
                return Ok(piece);
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }
}
