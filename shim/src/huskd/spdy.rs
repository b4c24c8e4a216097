//! SPDY/3.1 framing, as the CRI streaming protocols use it: kubectl and
//! crictl before 1.30, and the API server's proxy to a kubelet, speak it
//! through moby/spdystream. Only what those peers send and expect is
//! here: streams opened by the client (SYN_STREAM, answered with
//! SYN_REPLY), DATA with FIN for a half-close, RST_STREAM, PING (echoed)
//! and GOAWAY. SETTINGS and WINDOW_UPDATE are read and ignored: spdystream
//! does no flow control, so neither side waits for a window.
//!
//! Header blocks are zlib streams, one per direction for the whole
//! connection, primed with the SPDY/3 dictionary (`dictionary()`).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version in every control frame.
const VERSION: u16 = 3;
/// Control frames carry headers or a few words; anything larger is hostile.
const MAX_CONTROL: usize = 64 << 10;
/// A decompressed header block (a kubectl stream sends three short pairs).
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The largest DATA payload one frame can carry (a 24-bit length).
const MAX_DATA: usize = 0xff_ffff;

/// RST_STREAM and GOAWAY status codes that huskd sends.
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 3;

pub type Headers = Vec<(String, String)>;

/// The value of header `name` (names are lower case on the wire).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    Ping(u32),
    GoAway {
        last: u32,
        status: u32,
    },
    Headers {
        id: u32,
        headers: Headers,
    },
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// SETTINGS, WINDOW_UPDATE and control frames of unknown types, which
    /// SPDY tells a receiver to ignore.
    Ignored(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, SpdyError> {
    Err(SpdyError::Protocol(msg.into()))
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads frames from a client, decompressing header blocks.
pub struct FrameReader<R> {
    r: R,
    inflate: Decompress,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            r,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame; None when the peer closed the connection between
    /// frames.
    pub async fn read(&mut self) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        if self.r.read(&mut head[..1]).await? == 0 {
            return Ok(None);
        }
        self.r.read_exact(&mut head[1..]).await?;
        let first = word(&head, 0);
        let flags = head[4];
        let len = (word(&head, 4) & 0xff_ffff) as usize;
        if first & 0x8000_0000 == 0 {
            let mut data = vec![0u8; len];
            self.r.read_exact(&mut data).await?;
            return Ok(Some(Frame::Data {
                id: first & 0x7fff_ffff,
                fin: flags & 0x01 != 0,
                data,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        let kind = (first & 0xffff) as u16;
        if version != VERSION {
            return protocol(format!("control frame of version {version}, not 3"));
        }
        if len > MAX_CONTROL {
            return protocol(format!("control frame of {len} bytes"));
        }
        let mut p = vec![0u8; len];
        self.r.read_exact(&mut p).await?;
        let fin = flags & 0x01 != 0;
        let need = |n: usize| {
            if p.len() < n {
                protocol(format!("control frame type {kind} of {} bytes", p.len()))
            } else {
                Ok(())
            }
        };
        let stream = |at: usize| word(&p, at) & 0x7fff_ffff;
        Ok(Some(match kind {
            1 => {
                need(10)?;
                let headers = self.headers(&p[10..])?;
                Frame::SynStream {
                    id: nonzero(stream(0))?,
                    fin,
                    headers,
                }
            }
            2 => {
                need(4)?;
                let headers = self.headers(&p[4..])?;
                Frame::SynReply {
                    id: nonzero(stream(0))?,
                    fin,
                    headers,
                }
            }
            3 => {
                need(8)?;
                Frame::RstStream {
                    id: stream(0),
                    status: word(&p, 4),
                }
            }
            6 => {
                need(4)?;
                Frame::Ping(word(&p, 0))
            }
            7 => {
                need(8)?;
                Frame::GoAway {
                    last: stream(0),
                    status: word(&p, 4),
                }
            }
            8 => {
                need(4)?;
                let headers = self.headers(&p[4..])?;
                Frame::Headers {
                    id: nonzero(stream(0))?,
                    headers,
                }
            }
            other => Frame::Ignored(other),
        }))
    }

    fn headers(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let raw = self.inflate_block(block)?;
        parse_block(&raw)
    }

    /// One frame's share of the client's header stream.
    fn inflate_block(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let mut pos = 0;
        loop {
            let (in0, out0) = (self.inflate.total_in(), out.len());
            let r = self
                .inflate
                .decompress_vec(&block[pos..], &mut out, FlushDecompress::Sync);
            pos += (self.inflate.total_in() - in0) as usize;
            match r {
                Ok(Status::StreamEnd) => return protocol("the header stream ended"),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&dictionary())
                        .map_err(|e| SpdyError::Protocol(format!("header dictionary: {e}")))?;
                    continue;
                }
                Err(e) => return protocol(format!("header block: {e}")),
            }
            let stuck = (self.inflate.total_in(), out.len()) == (in0, out0);
            if pos == block.len() && (out.len() < out.capacity() || stuck) {
                return Ok(out);
            }
            if out.len() >= MAX_HEADER_BLOCK {
                return protocol("header block too large");
            }
            if stuck {
                return protocol("header block does not inflate");
            }
            if out.len() < out.capacity() {
                continue;
            }
            out.reserve(out.capacity().max(256));
        }
    }
}

fn nonzero(id: u32) -> Result<u32, SpdyError> {
    if id == 0 {
        protocol("stream id 0")
    } else {
        Ok(id)
    }
}

/// A name/value header block: a count, then each name and value with its
/// length (32-bit); a value may hold several, separated by NUL.
fn parse_block(b: &[u8]) -> Result<Headers, SpdyError> {
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        if b.len() - at < n {
            return protocol("truncated header block");
        }
        at += n;
        Ok(&b[at - n..at])
    };
    let count = word(take(4)?, 0);
    let mut h = Headers::new();
    for _ in 0..count {
        let n = word(take(4)?, 0) as usize;
        let name = String::from_utf8(take(n)?.to_vec())
            .map_err(|_| SpdyError::Protocol("header name is not UTF-8".into()))?;
        let n = word(take(4)?, 0) as usize;
        let value = String::from_utf8(take(n)?.to_vec())
            .map_err(|_| SpdyError::Protocol(format!("header {name}: not UTF-8")))?;
        if name.is_empty() || name.bytes().any(|c| c.is_ascii_uppercase()) {
            return protocol(format!("header name {name:?}"));
        }
        for v in value.split('\0') {
            h.push((name.clone(), v.to_owned()));
        }
    }
    Ok(h)
}

/// Writes frames to a client, compressing header blocks.
pub struct FrameWriter<W> {
    w: W,
    deflate: Compress,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(&dictionary())
            .expect("a fresh deflate stream takes a dictionary");
        FrameWriter { w, deflate }
    }

    pub async fn write(&mut self, f: &Frame) -> std::io::Result<()> {
        let bytes = self.encode(f);
        self.w.write_all(&bytes).await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.w.shutdown().await
    }

    fn encode(&mut self, f: &Frame) -> Vec<u8> {
        let control = |kind: u16, flags: u8, p: Vec<u8>| {
            let mut b = Vec::with_capacity(8 + p.len());
            b.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&((u32::from(flags) << 24) | p.len() as u32).to_be_bytes());
            b.extend_from_slice(&p);
            b
        };
        let words = |w: &[u32]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        match f {
            Frame::SynStream { id, fin, headers } => {
                let mut p = words(&[*id, 0]);
                p.extend_from_slice(&[0, 0]);
                p.extend(self.block(headers));
                control(1, u8::from(*fin), p)
            }
            Frame::SynReply { id, fin, headers } => {
                let mut p = words(&[*id]);
                p.extend(self.block(headers));
                control(2, u8::from(*fin), p)
            }
            Frame::RstStream { id, status } => control(3, 0, words(&[*id, *status])),
            Frame::Ping(id) => control(6, 0, words(&[*id])),
            Frame::GoAway { last, status } => control(7, 0, words(&[*last, *status])),
            Frame::Headers { id, headers } => {
                let mut p = words(&[*id]);
                p.extend(self.block(headers));
                control(8, 0, p)
            }
            Frame::Data { id, fin, data } => {
                // Longer data goes as several frames, FIN on the last.
                let mut b = Vec::with_capacity(data.len() + 8);
                let mut chunks: Vec<&[u8]> = data.chunks(MAX_DATA).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                let last = chunks.len() - 1;
                for (i, c) in chunks.into_iter().enumerate() {
                    let flags = u32::from(*fin && i == last);
                    b.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                    b.extend_from_slice(&((flags << 24) | c.len() as u32).to_be_bytes());
                    b.extend_from_slice(c);
                }
                b
            }
            Frame::Ignored(_) => Vec::new(),
        }
    }

    fn block(&mut self, headers: &Headers) -> Vec<u8> {
        // A name appears once; its values are joined with NUL.
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (k, v) in headers {
            match pairs.iter_mut().find(|(n, _)| n == k) {
                Some((_, all)) => {
                    all.push('\0');
                    all.push_str(v);
                }
                None => pairs.push((k, v.clone())),
            }
        }
        let mut raw = (pairs.len() as u32).to_be_bytes().to_vec();
        for (k, v) in &pairs {
            for s in [*k, v.as_str()] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut pos = 0;
        loop {
            let in0 = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[pos..], &mut out, FlushCompress::Sync)
                .expect("deflate into a Vec cannot fail");
            pos += (self.deflate.total_in() - in0) as usize;
            if pos == raw.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00,
/// 2.6.10.1): these words, each after its length as a 32-bit big-endian
/// number, then `DICTIONARY_TAIL` as is.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        // Its length and Adler-32 (the dictionary id in a zlib header)
        // are those every SPDY/3 peer checks the stream against.
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &d {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn frames_survive_the_wire_with_one_header_stream_per_direction() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 20);
            let mut w = FrameWriter::new(a);
            let mut r = FrameReader::new(b);
            let frames = vec![
                Frame::SynStream {
                    id: 1,
                    fin: false,
                    headers: h(&[("streamtype", "error")]),
                },
                Frame::SynStream {
                    id: 3,
                    fin: true,
                    headers: h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
                },
                Frame::SynReply {
                    id: 1,
                    fin: false,
                    headers: vec![],
                },
                Frame::Headers {
                    id: 3,
                    headers: h(&[("x", "1"), ("x", "2")]),
                },
                Frame::Data {
                    id: 3,
                    fin: true,
                    data: (0..70_000u32).map(|i| i as u8).collect(),
                },
                Frame::Data {
                    id: 5,
                    fin: true,
                    data: vec![],
                },
                Frame::RstStream { id: 3, status: 5 },
                Frame::Ping(1),
                Frame::GoAway { last: 3, status: 0 },
            ];
            for f in &frames {
                w.write(f).await.unwrap();
            }
            drop(w);
            for f in &frames {
                assert_eq!(r.read().await.unwrap().as_ref(), Some(f));
            }
            assert!(r.read().await.unwrap().is_none());
        });
    }

    /// Raw control frame bytes.
    fn control(version: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = (0x8000 | version).to_be_bytes().to_vec();
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn read_one(bytes: Vec<u8>) -> Result<Option<Frame>, SpdyError> {
        rt().block_on(async { FrameReader::new(&bytes[..]).read().await })
    }

    /// A SYN_STREAM for stream 1 whose header block is `raw`, compressed
    /// as a client does.
    fn syn_with_block(raw: &[u8]) -> Vec<u8> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&dictionary()).unwrap();
        let mut out = Vec::with_capacity(raw.len() + 1024);
        z.compress_vec(raw, &mut out, FlushCompress::Sync).unwrap();
        let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend(out);
        control(3, 1, &p)
    }

    #[test]
    fn hostile_frames_are_protocol_errors() {
        let bad = |b: Vec<u8>, want: &str| match read_one(b) {
            Err(SpdyError::Protocol(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("{want}: {other:?}"),
        };
        bad(control(2, 6, &[0, 0, 0, 1]), "version 2");
        bad(control(3, 3, &[0, 0, 0, 1]), "of 4 bytes");
        let mut huge = (0x8003u16).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0, 1, 0, 0x10, 0, 0]);
        bad(huge, "control frame of 1048576 bytes");
        bad(
            control(3, 1, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
            "header block",
        );
        // A header block that inflates past the limit (a zip bomb).
        let mut bomb = 1u32.to_be_bytes().to_vec();
        bomb.extend_from_slice(&1u32.to_be_bytes());
        bomb.push(b'a');
        bomb.extend_from_slice(&(1u32 << 20).to_be_bytes());
        bomb.extend(vec![b'b'; 1 << 20]);
        let frame = syn_with_block(&bomb);
        assert!(frame.len() < MAX_CONTROL, "{}", frame.len());
        bad(frame, "too large");
        // Counts that promise more than the block holds.
        bad(syn_with_block(&5u32.to_be_bytes()), "truncated");
        bad(
            syn_with_block(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0]),
            "header name \"A\"",
        );
        // Stream 0 cannot be opened.
        let mut zero = syn_with_block(&0u32.to_be_bytes());
        zero[11] = 0;
        bad(zero, "stream id 0");
        // Unknown control frames are skipped, as SPDY asks.
        assert_eq!(
            read_one(control(3, 0x7f, &[1, 2])).unwrap(),
            Some(Frame::Ignored(0x7f))
        );
        // A frame cut short is an I/O error, not a frame.
        assert!(matches!(
            read_one(control(3, 6, &[0, 0, 0, 1])[..10].to_vec()),
            Err(SpdyError::Io(_))
        ));
    }
}
