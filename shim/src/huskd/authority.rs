//! The CRI socket's HTTP/2 request headers, made acceptable to h2 before
//! h2 (under tonic) reads them. grpc-go up to 1.5x (the kubelet, crictl and
//! critest up to 1.30) dials a unix socket and sends the socket's path
//! (`/run/husk/huskd.sock`) as `:authority`; h2 refuses such a request with
//! RST_STREAM(PROTOCOL_ERROR) before any service sees it, where Go servers
//! (containerd, CRI-O) take it. [`GrpcGoCompat`] wraps each accepted
//! connection: it passes every frame through unchanged except header
//! blocks, which it decodes (HPACK), gives `localhost` for an `:authority`
//! that is not a valid URI authority, and encodes again without the
//! dynamic table (so h2's decoder state cannot drift from the client's).
//! A request whose headers h2 would still refuse is logged at warn level,
//! naming what is wrong: h2 itself only says so at debug level.
//!
//! It also moves a request's `grpc-timeout` aside, for huskd's own
//! deadline layer (see [`super::deadline`]: tonic would answer CANCELLED).
//! It must not change anything else: no frame is reordered, merged or
//! dropped, and the server-to-client direction is not touched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an unusable `:authority` becomes (what newer grpc-go sends).
const LOCALHOST: &[u8] = b"localhost";
/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload h2 takes before SETTINGS say otherwise
/// (SETTINGS_MAX_FRAME_SIZE's initial value); tonic does not raise it.
const MAX_FRAME: usize = 16_384;
/// How much of one header block is kept while its CONTINUATIONs come
/// (h2's default max header list size is 16 MiB; a CRI request's headers
/// are a few hundred bytes).
const MAX_BLOCK: usize = 1 << 20;

/// One accepted CRI connection, with its request headers mended as the
/// module doc says.
pub struct GrpcGoCompat<S> {
    inner: S,
    /// Bytes read from the client and not yet parsed.
    input: Vec<u8>,
    /// Bytes ready for h2, and how many of them it has taken.
    output: Vec<u8>,
    taken: usize,
    preface_seen: bool,
    /// Set when the stream is not HTTP/2 as expected (or a header block
    /// cannot be decoded): from then on bytes pass through as they come,
    /// and h2 gives the error.
    passthrough: bool,
    /// A HEADERS frame whose CONTINUATIONs are still coming.
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    /// Whether this connection's rewrite was logged (once per connection).
    logged_rewrite: bool,
}

struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as they came, for passthrough if the block is unusable.
    raw: Vec<u8>,
}

impl<S> GrpcGoCompat<S> {
    pub fn new(inner: S) -> Self {
        GrpcGoCompat {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            taken: 0,
            preface_seen: false,
            passthrough: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            logged_rewrite: false,
        }
    }

    /// Moves what can be handled from `input` to `output`.
    fn process(&mut self) {
        if self.passthrough {
            self.output.append(&mut self.input);
            return;
        }
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.passthrough = true;
                self.output.append(&mut self.input);
                return;
            }
            if n < PREFACE.len() {
                return;
            }
            self.output.extend_from_slice(PREFACE);
            self.input.drain(..PREFACE.len());
            self.preface_seen = true;
        }
        let mut at = 0;
        while self.input.len() - at >= FRAME_HEADER {
            let h = &self.input[at..at + FRAME_HEADER];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if self.input.len() - at < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = at..at + FRAME_HEADER + len;
            at = frame.end;
            match kind {
                HEADERS if self.pending.is_none() => {
                    let raw = self.input[frame.clone()].to_vec();
                    let Some((priority, fragment)) = headers_payload(flags, &raw[FRAME_HEADER..])
                    else {
                        self.output.extend_from_slice(&raw);
                        continue;
                    };
                    let block = PendingBlock {
                        stream,
                        flags,
                        priority,
                        block: fragment.to_vec(),
                        raw,
                    };
                    if flags & END_HEADERS != 0 {
                        self.finish(block);
                    } else {
                        self.pending = Some(block);
                    }
                }
                CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream == stream) => {
                    let Some(mut block) = self.pending.take() else {
                        continue;
                    };
                    block.raw.extend_from_slice(&self.input[frame.clone()]);
                    block
                        .block
                        .extend_from_slice(&self.input[frame.start + FRAME_HEADER..frame.end]);
                    if block.block.len() > MAX_BLOCK {
                        // Not ours to judge further: h2 refuses it.
                        self.give_up(block.raw);
                    } else if flags & END_HEADERS != 0 {
                        self.finish(block);
                    } else {
                        self.pending = Some(block);
                    }
                }
                _ => {
                    if let Some(block) = self.pending.take() {
                        // A frame inside a header block is a protocol
                        // error; h2 says so.
                        self.give_up(block.raw);
                        self.output.extend_from_slice(&self.input[frame]);
                        break;
                    }
                    self.output.extend_from_slice(&self.input[frame]);
                }
            }
        }
        self.input.drain(..at);
        if self.passthrough {
            self.output.append(&mut self.input);
        }
    }

    /// Everything from here on passes through as it came.
    fn give_up(&mut self, raw: Vec<u8>) {
        self.output.extend_from_slice(&raw);
        self.passthrough = true;
    }

    /// A whole header block: decoded, mended, encoded again.
    fn finish(&mut self, block: PendingBlock) {
        let mut headers = match self.decoder.decode(&block.block) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(
                    stream = block.stream,
                    "CRI socket: a client sent a header block that cannot be decoded ({e:?}); \
                     the connection will be refused"
                );
                return self.give_up(block.raw);
            }
        };
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b"grpc-timeout" {
                *name = super::deadline::DEADLINE_HEADER.as_bytes().to_vec();
            }
            if name.as_slice() == b":authority" && !valid_authority(value) {
                if !self.logged_rewrite {
                    tracing::info!(
                        authority = %String::from_utf8_lossy(value),
                        "CRI socket: a client sent a socket path as :authority (grpc-go does); \
                         taken as localhost"
                    );
                    self.logged_rewrite = true;
                }
                *value = LOCALHOST.to_vec();
            }
        }
        if let Some(why) = refused_by_h2(&headers) {
            tracing::warn!(
                stream = block.stream,
                headers = %describe(&headers),
                "CRI socket: a request has malformed headers ({why}); \
                 the HTTP/2 layer refuses it with PROTOCOL_ERROR"
            );
        }
        let encoded = encode_literal(&headers);
        // An empty block still needs its HEADERS frame.
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[]]
        } else {
            encoded.chunks(MAX_FRAME - 5).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            if i == 0 {
                write_headers_frame(&mut self.output, &block, chunk, i == last);
            } else {
                let flags = if i == last { END_HEADERS } else { 0 };
                write_frame(
                    &mut self.output,
                    CONTINUATION,
                    flags,
                    block.stream,
                    &[chunk],
                );
            }
        }
    }
}

/// A HEADERS payload's priority fields and header block fragment, padding
/// removed; None when the padding is longer than the payload.
fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    let priority = if flags & PRIORITY != 0 {
        let pr: [u8; 5] = p.get(..5)?.try_into().ok()?;
        p = &p[5..];
        Some(pr)
    } else {
        None
    };
    let end = p.len().checked_sub(pad)?;
    Some((priority, &p[..end]))
}

fn write_headers_frame(
    out: &mut Vec<u8>,
    block: &PendingBlock,
    fragment: &[u8],
    end_headers: bool,
) {
    let mut flags = block.flags & END_STREAM;
    if end_headers {
        flags |= END_HEADERS;
    }
    let prio: &[u8] = match &block.priority {
        Some(p) => {
            flags |= PRIORITY;
            p
        }
        None => &[],
    };
    write_frame(out, HEADERS, flags, block.stream, &[prio, fragment]);
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// HPACK "literal header field without indexing, new name" for every
/// field, no Huffman coding: nothing enters either dynamic table.
fn encode_literal(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_string(&mut out, name);
        encode_string(&mut out, value);
    }
    out
}

/// An HPACK string literal (RFC 7541 §5.2) without Huffman coding: the
/// length as a 7-bit prefix integer (§5.1), then the bytes.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// What h2's server would refuse in a request's headers (its checks in
/// `Peer::convert_poll_message` and the header map), if anything.
fn refused_by_h2(headers: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    let mut method = false;
    for (name, value) in headers {
        let text = String::from_utf8_lossy(name);
        match name.as_slice() {
            b":method" => method = http::Method::from_bytes(value).is_ok(),
            b":authority" if !valid_authority(value) => {
                return Some(format!(
                    ":authority {:?} is not a URI authority",
                    String::from_utf8_lossy(value)
                ))
            }
            b":scheme" | b":path" | b":authority" | b":protocol" => {}
            n if n.starts_with(b":") => return Some(format!("unknown pseudo-header {text}")),
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Some(format!("connection-specific header {text}")),
            b"te" if value.as_slice() != b"trailers" => {
                return Some("te other than \"trailers\"".to_owned())
            }
            _ => {
                if http::HeaderName::from_bytes(name).is_err()
                    || name.iter().any(u8::is_ascii_uppercase)
                {
                    return Some(format!("header name {text:?} is not valid in HTTP/2"));
                }
                if http::HeaderValue::from_bytes(value).is_err() {
                    return Some(format!("header {text} has an invalid value"));
                }
            }
        }
    }
    (!method).then(|| "no valid :method".to_owned())
}

/// Header names with their values, for a log line (values of metadata a
/// client may use for secrets are not shown).
fn describe(headers: &[(Vec<u8>, Vec<u8>)]) -> String {
    headers
        .iter()
        .map(|(n, v)| {
            let n = String::from_utf8_lossy(n);
            if n.starts_with(':') {
                format!("{n}={:?}", String::from_utf8_lossy(v))
            } else {
                n.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl<S: AsyncRead + Unpin> AsyncRead for GrpcGoCompat<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.taken < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.taken);
                buf.put_slice(&this.output[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.output.len() {
                    this.output.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is left goes to h2 as it is.
                if let Some(block) = this.pending.take() {
                    this.output.extend_from_slice(&block.raw);
                }
                this.output.append(&mut this.input);
                if this.output.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.input.extend_from_slice(rb.filled());
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GrpcGoCompat<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for GrpcGoCompat<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, flags, stream, &[payload]);
        out
    }

    fn request_headers(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/Version"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.51.0"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// Feeds `input` through the wrapper `step` bytes at a time and
    /// returns what h2 would read.
    async fn through(input: Vec<u8>, step: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for c in input.chunks(step) {
                client.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let mut out = Vec::new();
        GrpcGoCompat::new(server)
            .read_to_end(&mut out)
            .await
            .unwrap();
        writer.await.unwrap();
        out
    }

    /// The frames of `bytes` after the preface: (type, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut at = PREFACE.len();
        let mut out = Vec::new();
        while at < bytes.len() {
            let h = &bytes[at..at + 9];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
            out.push((h[3], h[4], stream, bytes[at + 9..at + 9 + len].to_vec()));
            at += 9 + len;
        }
        out
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_other_frames_pass_unchanged() {
        let mut enc = loona_hpack::Encoder::new();
        let mut h1 = request_headers("/run/husk/huskd.sock");
        h1.push((b"grpc-timeout".to_vec(), b"1999m".to_vec()));
        let h2 = request_headers("localhost");
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        // Stream 1: padded, with priority, split over a CONTINUATION.
        let block = enc.encode(h1.iter().map(|(n, v)| (&n[..], &v[..])));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8];
        payload.extend([0, 0, 0, 0, 15]);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(&data);
        // Stream 3: the encoder's dynamic table now holds stream 1's
        // fields; the block refers to them.
        let block3 = enc.encode(h2.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block3));
        for step in [1, 7, 4096] {
            let out = through(input.clone(), step).await_in(&rt());
            let f = frames(&out);
            assert_eq!(f.len(), 4, "{f:?}");
            assert_eq!(f[0], (0x4, 0, 0, settings[9..].to_vec()));
            let mut dec = loona_hpack::Decoder::new();
            let (kind, flags, stream, payload) = &f[1];
            assert_eq!((*kind, *stream), (HEADERS, 1));
            assert_eq!(*flags, END_HEADERS | PRIORITY);
            assert_eq!(payload[..5], [0, 0, 0, 0, 15]);
            let mut want = h1.clone();
            want[3].1 = b"localhost".to_vec();
            want[7].0 = b"husk-grpc-timeout".to_vec();
            assert_eq!(dec.decode(&payload[5..]).unwrap(), want);
            assert_eq!(f[2], (0x0, END_STREAM, 1, data[9..].to_vec()));
            let (kind, flags, stream, payload) = &f[3];
            assert_eq!(
                (*kind, *flags, *stream),
                (HEADERS, END_HEADERS | END_STREAM, 3)
            );
            assert_eq!(dec.decode(payload).unwrap(), h2);
        }
    }

    #[test]
    fn what_is_not_http2_passes_through_as_it_came() {
        let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(junk.clone(), 3).await_in(&rt()), junk);
        // A block that cannot be decoded: passed on for h2 to refuse.
        let mut input = PREFACE.to_vec();
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]);
        input.extend(&bad);
        input.extend(frame(0x0, 0, 1, b"x"));
        assert_eq!(through(input.clone(), 5).await_in(&rt()), input);
        // A frame cut short by the end of the stream.
        let mut cut = PREFACE.to_vec();
        cut.extend(&frame(0x0, 0, 1, b"hello")[..10]);
        assert_eq!(through(cut.clone(), 2).await_in(&rt()), cut);
    }

    #[test]
    fn large_header_blocks_are_split_into_frames_h2_accepts() {
        let mut h = request_headers("/a/b.sock");
        h.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(h.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        for (i, c) in block.chunks(10_000).enumerate() {
            let last = (i + 1) * 10_000 >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, c));
        }
        let out = through(input, 1000).await_in(&rt());
        let f = frames(&out);
        assert!(f.len() >= 3, "{}", f.len());
        let mut whole = Vec::new();
        for (i, (kind, flags, stream, p)) in f.iter().enumerate() {
            assert!(p.len() <= MAX_FRAME);
            assert_eq!(*stream, 1);
            assert_eq!(*kind, if i == 0 { HEADERS } else { CONTINUATION });
            assert_eq!(*flags & END_HEADERS != 0, i == f.len() - 1);
            whole.extend(p);
        }
        h[3].1 = b"localhost".to_vec();
        assert_eq!(loona_hpack::Decoder::new().decode(&whole).unwrap(), h);
    }

    #[test]
    fn what_h2_would_still_refuse_is_named() {
        assert_eq!(refused_by_h2(&request_headers("localhost")), None);
        let mut h = request_headers("localhost");
        h.push((b"connection".to_vec(), b"close".to_vec()));
        assert!(refused_by_h2(&h).unwrap().contains("connection"));
        let mut h = request_headers("localhost");
        h.push((b"X-Upper".to_vec(), b"1".to_vec()));
        assert!(refused_by_h2(&h).unwrap().contains("X-Upper"));
        let h = request_headers("/a path");
        assert!(refused_by_h2(&h).unwrap().contains(":authority"));
        assert!(refused_by_h2(&request_headers("localhost")[1..]).is_some());
    }

    #[test]
    fn string_lengths_use_the_prefix_integer_encoding() {
        let mut out = Vec::new();
        encode_string(&mut out, &[b'a'; 126]);
        assert_eq!(out[0], 126);
        out.clear();
        encode_string(&mut out, &[b'a'; 127]);
        assert_eq!(out[..2], [127, 0]);
        out.clear();
        encode_string(&mut out, &[b'a'; 1337]);
        // RFC 7541 C.1.2 for 1337 with a 5-bit prefix; here 7 bits: 1337 - 127 = 1210.
        assert_eq!(
            out[..3],
            [127, (1210 % 128) as u8 | 0x80, (1210 / 128) as u8]
        );
    }

    trait AwaitIn: std::future::Future + Sized {
        fn await_in(self, rt: &tokio::runtime::Runtime) -> Self::Output {
            rt.block_on(self)
        }
    }
    impl<F: std::future::Future> AwaitIn for F {}
}
