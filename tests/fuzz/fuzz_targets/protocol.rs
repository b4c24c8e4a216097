//! husk-protocol frames in both directions: what a hostile guest agent
//! sends the host (`Event`) and what reaches the agent (`Request`). Every
//! frame read is written again and must read back equal.
#![no_main]

use husk_protocol::{read_frame, write_frame, Event, ProtocolError, Request};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Reads frames until the input ends or one is refused.
fn frames<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) {
    let mut r = data;
    for _ in 0..64 {
        match read_frame::<T>(&mut r) {
            Ok(msg) => {
                let mut out = Vec::new();
                write_frame(&mut out, &msg).expect("a frame that was read can be written");
                let again: T = read_frame(&mut out.as_slice()).expect("a written frame reads back");
                assert_eq!(again, msg);
            }
            Err(ProtocolError::Closed) => return,
            Err(e) => {
                // Every refusal says what it is.
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    frames::<Request>(data);
    frames::<Event>(data);
});
