//! Round trips and hostile input for every message.

use super::*;
use crate::protocol::frame::read_frame;
use proptest::prelude::*;

fn any_chunk() -> impl Strategy<Value = Chunk> {
    (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(offset, payload)| Chunk {
        offset,
        codec: codec::RAW,
        raw_len: payload.len() as u32,
        payload,
    })
}

fn any_kind() -> impl Strategy<Value = ErrorKind> {
    (0u8..13).prop_map(ErrorKind::from_wire)
}

fn hashes() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    proptest::collection::vec((0u8..2, any::<[u8; 16]>()), 0..20)
        .prop_map(|v| (v.iter().map(|x| x.0).collect(), v.iter().flat_map(|x| x.1).collect()))
}

#[allow(clippy::too_many_lines)] // One strategy per message, mirroring the spec's table.
fn any_msg() -> impl Strategy<Value = Msg> {
    let b = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(version, features, want_exe_hash)| Msg::Hello {
            version,
            features,
            want_exe_hash
        }),
        (any::<bool>(), 0u32..64, any::<u32>(), any::<u64>(), b(), b(), any::<i32>()).prop_map(
            |(t, flags, mode, size, path, name, level)| {
                Msg::Open { role: if t { Role::Target } else { Role::Source }, flags, mode, size, path, name, level }
            }
        ),
        any::<u64>().prop_map(|size| Msg::SetSize { size }),
        (
            (any::<[u8; 32]>(), any::<u32>(), any::<u64>(), any::<u64>()),
            (any::<u16>(), any::<u64>(), any::<bool>(), any::<bool>()),
            any::<Option<u64>>()
        )
            .prop_map(|((key, block, end, data_len), (threads, rate, fingerprint, changes), only_if_size)| {
                Msg::Scan { key, block, end, data_len, threads, rate, fingerprint, changes, only_if_size }
            }),
        any::<u64>().prop_map(|chunks| Msg::Ack { chunks }),
        any::<u64>().prop_map(|chunk| Msg::Groups { chunk }),
        (any::<u64>(), any::<u32>()).prop_map(|(chunk, group)| Msg::Leaves { chunk, group }),
        (any::<u64>(), any::<u32>(), any::<i32>())
            .prop_map(|(offset, len, compress)| { Msg::Read { offset, len, compress } }),
        any_chunk().prop_map(Msg::Write),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Msg::Zero { offset, len }),
        Just(Msg::Flush),
        Just(Msg::FlushPartial),
        Just(Msg::Alive),
        Just(Msg::Discard),
        Just(Msg::CheckIntact),
        (any::<u64>(), any::<u64>(), any::<i32>(), any::<u16>())
            .prop_map(|(end, data_len, compress, threads)| Msg::Copy { end, data_len, compress, threads }),
        Just(Msg::Bye),
        (any::<u32>(), any::<u64>(), b(), b(), b()).prop_map(|(version, features, tool_version, boot_id, exe_hash)| {
            Msg::HelloReply { version, features, tool_version, boot_id, exe_hash }
        }),
        (
            (any::<bool>(), any::<u64>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<bool>()),
            (any::<u32>(), any::<u32>(), any::<u32>(), b())
        )
            .prop_map(|((exists, size, identity_tag, id_a, id_b, created), (mode, caps, block_size, path))| {
                Msg::Opened { exists, size, identity_tag, id_a, id_b, created, mode, caps, block_size, path }
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(first, count)| Msg::Holes { first, count }),
        (any::<u64>(), any::<u64>()).prop_map(|(first, count)| Msg::Clean { first, count }),
        (any::<u64>(), any::<u64>()).prop_map(|(start, len)| Msg::Unused { start, len }),
        (any::<[u64; 3]>(), ".{0,8}", ".{0,40}", ".{0,40}").prop_map(|([start, len, used], f, detail, whole)| {
            Msg::Filesystem {
                start,
                len,
                used,
                filesystem: f.into_bytes(),
                detail: detail.into_bytes(),
                whole: whole.into_bytes(),
            }
        }),
        (any::<u64>(), any::<bool>(), any::<[u8; 16]>()).prop_map(|(chunk, zero, hash)| Msg::Summary {
            chunk,
            zero,
            hash
        }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(chunks, read, fingerprint)| Msg::ScanDone {
            chunks,
            read,
            fingerprint
        }),
        any::<[u8; 32]>().prop_map(|after| Msg::Fingerprint { after }),
        (any::<u64>(), hashes()).prop_map(|(chunk, (zero, hashes))| Msg::GroupHashes { chunk, zero, hashes }),
        (any::<u64>(), any::<u32>(), hashes())
            .prop_map(|(chunk, group, (zero, hashes))| { Msg::LeafHashes { chunk, group, zero, hashes } }),
        any_chunk().prop_map(Msg::Data),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Msg::Zeros { offset, len }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(offset, len, read)| Msg::ReadDone { offset, len, read }),
        Just(Msg::Done),
        (any_kind(), ".{0,40}", 0..7u8).prop_map(|(kind, message, hint)| Msg::Error {
            kind,
            message,
            hint: crate::error::Hint::from_wire(hint)
        }),
        b().prop_map(|request| Msg::Job { request }),
        (b(), any::<u32>()).prop_map(|(path, mode)| Msg::Put { path, mode }),
        (b(), any::<i32>()).prop_map(|(path, compress)| Msg::Get { path, compress }),
        (b(), b(), b(), any::<u32>()).prop_map(|(path, comment, source, block)| Msg::Record {
            path,
            comment,
            source,
            block
        }),
        (b(), b()).prop_map(|(path, comment)| Msg::Undo { path, comment }),
        b().prop_map(|result| Msg::JobDone { result }),
        b().prop_map(|path| Msg::Path { path }),
        Just(Msg::Cancel),
        (b(), any::<bool>(), 0u8..3, any::<i64>(), b(), b(), any::<u32>(), any::<u64>(), any::<i32>()).prop_map(
            |(dir, t, at_kind, at, comment, source, block, source_size, level)| Msg::OpenChain {
                dir,
                role: if t { Role::Target } else { Role::Source },
                at_kind,
                at,
                comment,
                source,
                block,
                source_size,
                level
            }
        ),
        (any::<u8>(), any::<[u64; 7]>()).prop_map(|(phase, counters)| Msg::Progress { phase, counters }),
        ".{0,40}".prop_map(|text| Msg::Warning { text }),
    ]
}

proptest! {
    #[test]
    fn written_frames_equal_encoded_frames(msg in any_msg()) {
        let mut out = Vec::new();
        let n = msg.write_to(&mut out).unwrap();
        prop_assert_eq!(n as usize, out.len());
        prop_assert_eq!(out, msg.encode());
    }

    #[test]
    fn every_message_round_trips_through_a_frame(msg in any_msg()) {
        let frame = msg.encode();
        let mut buf = Vec::new();
        let kind = read_frame(&mut &frame[..], &mut buf).unwrap().unwrap();
        prop_assert_eq!(Msg::decode(kind, &buf[1..]).unwrap(), msg);
    }

    /// Random bytes never panic the decoder, and never make it allocate past the frame.
    #[test]
    fn random_input_is_an_error_not_a_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = Vec::new();
        let mut r = &data[..];
        while let Ok(Some(kind)) = read_frame(&mut r, &mut buf) {
            let _ = Msg::decode(kind, &buf[1..]);
        }
    }

    #[test]
    fn truncated_frames_are_errors(msg in any_msg(), cut in 0usize..1000) {
        let frame = msg.encode();
        let cut = cut % frame.len();
        let mut buf = Vec::new();
        match read_frame(&mut &frame[..cut], &mut buf) {
            Ok(None) => prop_assert_eq!(cut, 0),
            Ok(Some(_)) => prop_assert!(false, "a truncated frame was accepted"),
            Err(_) => {}
        }
    }
}

#[test]
fn oversized_length_is_refused_before_allocating() {
    let frame = [0xFF, 0xFF, 0xFF, 0x7F, 1];
    let err = read_frame(&mut &frame[..], &mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol);
}

#[test]
fn trailing_bytes_and_unknown_types_are_refused() {
    assert!(Msg::decode(tag::FLUSH, &[0]).is_err());
    assert!(Msg::decode(0x7E, &[]).is_err());
    assert!(Msg::decode(tag::OPEN, &[0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
}
