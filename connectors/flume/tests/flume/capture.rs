//! The bytes a real Java Avro client (Flume's `NettyAvroRpcClient`) sent, and the replies the
//! reference server gave (`protocols/java_client_capture.txt`): weir decodes the same events and
//! answers with the same bytes.

use bytes::Bytes;
use weir_flume::avro_source_responder;
use weir_flume::flume::{self, Status};
use weir_flume::ipc::frame::{encode_frame, FrameDecoder, FrameLimits};
use weir_flume::ipc::responder::{ConnectionState, Incoming};

const CAPTURE: &str = include_str!("../../protocols/java_client_capture.txt");

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// (direction, serial, buffers) of each `<-`/`->` line.
fn packs() -> Vec<(&'static str, i32, Vec<Vec<u8>>)> {
    CAPTURE
        .lines()
        .filter_map(|l| {
            let dir = if l.contains("] <- ") {
                "request"
            } else if l.contains("] -> ") {
                "reply"
            } else {
                return None;
            };
            let serial = l.split("serial=").nth(1)?.split(' ').next()?.parse().ok()?;
            let list = l.split("buffers=[").nth(1)?.trim_end_matches(']');
            let buffers = list
                .split(", ")
                .map(|b| unhex(b.trim_matches('\'')))
                .collect();
            Some((dir, serial, buffers))
        })
        .collect()
}

#[test]
fn the_java_clients_calls_decode_and_get_javas_replies_byte_for_byte() {
    let packs = packs();
    assert_eq!(
        packs.len(),
        4,
        "two requests and two replies in the capture"
    );
    let responder = avro_source_responder();
    let mut state = ConnectionState::default();
    let mut decoder = FrameDecoder::new(FrameLimits {
        max_frame_bytes: 1 << 20,
        max_buffers: 16,
    });
    for pair in packs.chunks(2) {
        let [(req_dir, serial, req), (reply_dir, reply_serial, want)] = pair else {
            unreachable!()
        };
        assert_eq!((*req_dir, *reply_dir), ("request", "reply"));
        assert_eq!(serial, reply_serial);
        // Through the framing as sent on the wire.
        let mut wire = Vec::new();
        encode_frame(&mut wire, *serial, req);
        decoder.extend(&wire);
        let frame = decoder.decode().unwrap().expect("a whole frame");
        assert_eq!(frame.serial, *serial);
        assert_eq!(frame.buffers, req.len());
        let Incoming::Call(mut call) = responder.respond(frame.payload, &mut state).unwrap() else {
            panic!("expected a call")
        };
        assert_eq!(call.message, "appendBatch");
        let batch = serial - 1;
        let records = flume::decode_append_batch(&mut call.params, 100).unwrap();
        assert_eq!(call.params.remaining(), 0);
        assert_eq!(records.len(), 3);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(
                r.payload,
                Bytes::from(format!("java batch {batch} event {i}"))
            );
            assert_eq!(r.headers.len(), 1);
            assert_eq!(r.headers[0].name, "seq");
            assert_eq!(r.headers[0].value, Bytes::from(format!("{batch}.{i}")));
        }
        let mut status = Vec::new();
        Status::Ok.encode(&mut status);
        assert_eq!(&call.reply(&status), want, "reply to serial {serial}");
    }
    assert!(state.remote().is_some(), "the connection stays handshaken");
}
