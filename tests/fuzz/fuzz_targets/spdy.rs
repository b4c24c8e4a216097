//! huskd's SPDY/3.1 codec (kubectl/crictl exec, attach and port-forward
//! before 1.30), as a hostile client drives it: frames with zlib header
//! blocks on one stream per connection. Every frame read is written
//! again (the header stream of a fresh connection) and must read back
//! equal, values of one name grouped as the writer joins them.
#![no_main]

#[allow(dead_code)]
#[path = "../../../shim/src/huskd/spdy.rs"]
mod spdy;

use libfuzzer_sys::fuzz_target;
use spdy::{Frame, FrameReader, FrameWriter, Headers};
use std::sync::OnceLock;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Headers as the writer sends them: one entry per name (first
/// appearance order), its values in order.
fn grouped(h: &Headers) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in h {
        match out.iter_mut().find(|(n, _)| n == k) {
            Some((_, vs)) => vs.push(v.clone()),
            None => out.push((k.clone(), vec![v.clone()])),
        }
    }
    out
}

fn normal(f: &Frame) -> (Frame, Vec<(String, Vec<String>)>) {
    let mut f = f.clone();
    let h = match &mut f {
        Frame::SynStream { headers, .. }
        | Frame::SynReply { headers, .. }
        | Frame::Headers { headers, .. } => std::mem::take(headers),
        _ => Headers::new(),
    };
    (f, grouped(&h))
}

async fn check(data: &[u8]) {
    let mut reader = FrameReader::new(data);
    let mut frames = Vec::new();
    for _ in 0..256 {
        match reader.read().await {
            Ok(Some(Frame::Ignored(_))) => {}
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                break;
            }
        }
    }
    let mut wire = Vec::new();
    let mut writer = FrameWriter::new(&mut wire);
    for f in &frames {
        writer.write(f).await.expect("writing into a Vec");
    }
    let mut again = FrameReader::new(wire.as_slice());
    for f in &frames {
        let back = again
            .read()
            .await
            .expect("a written frame reads back")
            .expect("as many frames as were written");
        assert_eq!(normal(&back), normal(f));
    }
    assert!(matches!(again.read().await, Ok(None)));
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(check(data));
});
