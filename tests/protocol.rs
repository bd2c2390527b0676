//! The wire protocol on its own: every frame of both dialects, and every way a frame can be bad.
//! No sockets: the parser and the codec are pure.

use bytes::BytesMut;
use edgepair::protocol::{Frame, FrameCodec, MsgId, ProtocolError, Role, Stamps, Start, MAX_FRAME};
use tokio_util::codec::Decoder;

fn parse(s: &str) -> Result<Frame, ProtocolError> {
    Frame::parse(s.as_bytes())
}

fn id(p: &str, s: u64) -> MsgId {
    MsgId {
        publisher: p.to_string().into(),
        seq: s,
    }
}

#[test]
fn seed_frames_parse_as_the_seed_writes_them() {
    assert_eq!(
        parse("PUBLISH|topicC|17").ok(),
        Some(Frame::Publish {
            topic: "topicC".into(),
            payload: "17".into()
        })
    );
    assert_eq!(
        parse("SUBSCRIBE|topicC").ok(),
        Some(Frame::Subscribe {
            topic: "topicC".into()
        })
    );
    assert_eq!(
        parse("REPLICATE|t|a").ok(),
        Some(Frame::Replicate {
            topic: "t".into(),
            payload: "a".into()
        })
    );
    assert_eq!(
        parse("CLEAR|t|a").ok(),
        Some(Frame::Clear {
            topic: "t".into(),
            payload: "a".into()
        })
    );
    assert_eq!(parse("PING").ok(), Some(Frame::Ping));
    assert_eq!(parse("PING||").ok(), Some(Frame::Ping));
    assert_eq!(parse("PONG").ok(), Some(Frame::Pong));
    assert_eq!(parse("ACK").ok(), Some(Frame::Ack { id: None }));
    // Fields are cut at each `|` byte: names and payloads beyond ASCII come through whole, and
    // the payload keeps every `|` after the topic's.
    assert_eq!(
        parse("PUBLISH|données/é|a|b|ü").ok(),
        Some(Frame::Publish {
            topic: "données/é".into(),
            payload: "a|b|ü".into()
        })
    );
    assert!(parse("PUBLISH|données").is_err());
}

#[test]
fn every_frame_round_trips_through_encode_and_parse() {
    let stamps = Stamps {
        epoch: 2,
        received_us: 10,
        compute_start_us: 11,
        compute_end_us: 12,
        offset: 41,
    };
    let log_place = Stamps {
        epoch: 2,
        received_us: 10,
        offset: 41,
        ..Stamps::default()
    };
    let frames = vec![
        Frame::Publish {
            topic: "t".into(),
            payload: "x|y".into(),
        },
        Frame::Pub {
            topic: "t".into(),
            id: id("p1", 7),
            sent_us: 123,
            payload: "a|b|c".into(),
        },
        Frame::Subscribe { topic: "t".into() },
        Frame::Sub {
            topic: "t".into(),
            from: None,
        },
        Frame::Sub {
            topic: "t".into(),
            from: Some(Start::New),
        },
        Frame::Sub {
            topic: "t".into(),
            from: Some(Start::Offset(41)),
        },
        Frame::Sub {
            topic: "t".into(),
            from: Some(Start::Last(3)),
        },
        Frame::Sub {
            topic: "t".into(),
            from: Some(Start::Time(1_735_689_600_000_000)),
        },
        Frame::History {
            topic: "t".into(),
            n: 5,
        },
        Frame::Replayed {
            topic: "t".into(),
            next: 42,
        },
        Frame::Msg {
            topic: "t".into(),
            id: id("p1", 7),
            sent_us: 123,
            stamps,
            payload: "with|pipes".into(),
        },
        Frame::Replicate {
            topic: "t".into(),
            payload: "p".into(),
        },
        Frame::Clear {
            topic: "t".into(),
            payload: "p".into(),
        },
        Frame::Repl {
            mid: 9,
            topic: "t".into(),
            id: id("p1", 7),
            sent_us: 1,
            stamps: log_place,
            payload: "".into(),
        },
        Frame::Tail {
            topic: "t".into(),
            next: 42,
            epoch: 2,
            epochs: Vec::new(),
        },
        Frame::Tail {
            topic: "t".into(),
            next: 42,
            epoch: 4,
            epochs: vec![(1, 0), (2, 17), (4, 30)],
        },
        Frame::TailEnd,
        Frame::Settle,
        Frame::Settled,
        Frame::Mark {
            topic: "t".into(),
            upto: 40,
            next: 42,
        },
        Frame::Stored { mid: 9 },
        Frame::Clr {
            topic: "t".into(),
            upto: 9,
        },
        Frame::Hello {
            version: "edgepair/1".into(),
            role: Role::Backup,
            epoch: 3,
            incarnation: 1_795_000_000_000_000,
        },
        Frame::StatusQuery,
        Frame::Status {
            role: Role::Primary,
            epoch: 2,
            link: "up".into(),
            held: 0,
            inflight: 4,
        },
        Frame::Ping,
        Frame::Pong,
        Frame::Ack { id: None },
        Frame::Ack {
            id: Some(id("p1", 7)),
        },
        Frame::Err {
            reason: "bad seq".into(),
        },
    ];
    for f in frames {
        let line = f.encode();
        assert!(line.ends_with('\n'));
        let back = Frame::parse(line.trim_end_matches('\n').as_bytes());
        assert_eq!(back.ok(), Some(f.clone()), "{line:?}");
    }
}

#[test]
fn reading_the_past_has_these_wire_forms() {
    let sub = |from| Frame::Sub {
        topic: "t".into(),
        from,
    };
    // `SUB|topic` is unchanged: live only.
    assert_eq!(parse("SUB|t").ok(), Some(sub(None)));
    assert_eq!(sub(None).encode(), "SUB|t\n");
    for (line, from) in [
        ("SUB|t|new", Start::New),
        ("SUB|t|0", Start::Offset(0)),
        ("SUB|t|17", Start::Offset(17)),
        ("SUB|t|last:3", Start::Last(3)),
        ("SUB|t|12@3", Start::Resume { next: 12, epoch: 3 }),
        (
            "SUB|t|time:1735689600000000",
            Start::Time(1_735_689_600_000_000),
        ),
    ] {
        assert_eq!(parse(line).ok(), Some(sub(Some(from))), "{line}");
        assert_eq!(sub(Some(from)).encode(), format!("{line}\n"));
    }
    assert_eq!(
        parse("HISTORY|t|5").ok(),
        Some(Frame::History {
            topic: "t".into(),
            n: 5
        })
    );
    assert_eq!(
        parse("REPLAYED|t|9").ok(),
        Some(Frame::Replayed {
            topic: "t".into(),
            next: 9
        })
    );
}

#[test]
fn a_bad_start_or_count_says_what_is_wrong_and_keeps_the_connection() {
    for bad in [
        "SUB|t|",
        "SUB|t|-1",
        "SUB|t|soon",
        "SUB|t|last:",
        "SUB|t|last:x",
        "SUB|t|time:yesterday",
        "SUB|t|first:2",
        "SUB|t|1|2",
        "SUB|t|12@",
        "SUB|t|@3",
        "SUB|t|12@x",
        "SUB|t|12@3@4",
    ] {
        match parse(bad) {
            Err(e @ ProtocolError::BadValue(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("bad SUB start"), "{bad}: {msg}");
                assert!(msg.contains("last:N"), "{bad}: {msg}");
                assert!(!e.is_fatal(), "{bad}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    match parse("HISTORY|t|many") {
        Err(e @ ProtocolError::BadValue(_)) => {
            assert!(e.to_string().contains("bad HISTORY count 'many'"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse("HISTORY|t"),
        Err(ProtocolError::MissingFields("HISTORY", 2))
    ));
    assert!(matches!(
        parse("SUB||0"),
        Err(ProtocolError::EmptyField("topic"))
    ));
    assert!(matches!(
        parse("REPLAYED|t|x"),
        Err(ProtocolError::BadField("next"))
    ));
}

#[test]
fn hello_without_an_incarnation_still_parses() {
    assert_eq!(
        parse("HELLO|edgepair/1|primary|2").ok(),
        Some(Frame::Hello {
            version: "edgepair/1".into(),
            role: Role::Primary,
            epoch: 2,
            incarnation: 0
        })
    );
}

#[test]
fn payload_keeps_its_pipes_and_may_be_empty() {
    match parse("PUB|t|p|1|2|a|b||c") {
        Ok(Frame::Pub { payload, .. }) => assert_eq!(payload, "a|b||c"),
        other => panic!("{other:?}"),
    }
    match parse("PUBLISH|t|") {
        Ok(Frame::Publish { payload, .. }) => assert_eq!(payload, ""),
        other => panic!("{other:?}"),
    }
}

#[test]
fn carriage_return_before_newline_is_ignored() {
    assert_eq!(parse("PING\r").ok(), Some(Frame::Ping));
    assert_eq!(
        parse("SUBSCRIBE|t\r").ok(),
        Some(Frame::Subscribe { topic: "t".into() })
    );
}

#[test]
fn bad_frames_get_specific_errors() {
    assert!(matches!(
        Frame::parse(&[0x50, 0xff, 0xfe]),
        Err(ProtocolError::NotUtf8)
    ));
    assert!(matches!(parse(""), Err(ProtocolError::Empty)));
    assert!(matches!(
        parse("PUBLISH||x"),
        Err(ProtocolError::EmptyField("topic"))
    ));
    assert!(matches!(
        parse("PUB|t||1|1|x"),
        Err(ProtocolError::EmptyField("publisher"))
    ));
    assert!(matches!(
        parse("PUBLISH|t"),
        Err(ProtocolError::MissingFields("PUBLISH", 2))
    ));
    assert!(matches!(
        parse("PUB|t|p|notanumber|1|x"),
        Err(ProtocolError::BadField("seq"))
    ));
    assert!(matches!(
        parse("STORED|-1"),
        Err(ProtocolError::BadField("mid"))
    ));
    assert!(matches!(
        parse("HELLO|edgepair/1|king|1"),
        Err(ProtocolError::BadField("role"))
    ));
    assert!(matches!(
        parse("publish|t|x"),
        Err(ProtocolError::UnknownVerb(_))
    ));
    // None of these close the connection.
    for bad in ["", "NOPE", "PUBLISH||x", "PUB|t|p|x|1|y"] {
        assert!(!parse(bad).err().is_some_and(|e| e.is_fatal()), "{bad}");
    }
}

#[test]
fn a_very_long_unknown_verb_is_cut_in_the_error() {
    let verb = "X".repeat(10_000);
    match parse(&verb) {
        Err(e @ ProtocolError::UnknownVerb(_)) => assert!(e.to_string().len() < 100, "{e}"),
        other => panic!("{other:?}"),
    }
}

fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Result<Frame, String>> {
    let mut out = Vec::new();
    loop {
        match codec.decode(buf) {
            Ok(Some(f)) => out.push(Ok(f)),
            Ok(None) => return out,
            Err(e) => {
                let fatal = e.is_fatal();
                out.push(Err(e.to_string()));
                if fatal {
                    return out;
                }
            }
        }
    }
}

#[test]
fn codec_reassembles_frames_split_across_reads() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for chunk in ["PUB|t|p|", "1|5|he", "llo\nPI", "NG\n", "PONG"] {
        buf.extend_from_slice(chunk.as_bytes());
        got.extend(decode_all(&mut codec, &mut buf));
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(matches!(&got[0], Ok(Frame::Pub { payload, .. }) if payload == "hello"));
    assert_eq!(got[1], Ok(Frame::Ping));
    // "PONG" without its newline is a half frame: nothing yet, an error at EOF.
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(ProtocolError::Incomplete)
    ));
}

#[test]
fn codec_yields_every_frame_of_one_buffer_and_survives_bad_lines() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&b"PING\nBOGUS\n\xff\xfe\nPONG\n"[..]);
    let got = decode_all(&mut codec, &mut buf);
    assert_eq!(got.len(), 4);
    assert_eq!(got[0], Ok(Frame::Ping));
    assert!(got[1].as_ref().is_err_and(|e| e.contains("unknown verb")));
    assert!(got[2].as_ref().is_err_and(|e| e.contains("UTF-8")));
    assert_eq!(got[3], Ok(Frame::Pong));
}

#[test]
fn over_long_frames_are_refused_with_or_without_a_newline() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(vec![b'a'; MAX_FRAME + 10].as_slice());
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtocolError::TooLong)
    ));

    let mut codec = FrameCodec::default();
    let mut line = vec![b'a'; MAX_FRAME];
    line.push(b'\n');
    let mut buf = BytesMut::from(line.as_slice());
    let err = codec.decode(&mut buf);
    assert!(matches!(err, Err(ProtocolError::TooLong)));
    assert!(err.err().is_some_and(|e| e.is_fatal()));

    // Just under the limit is fine.
    let mut codec = FrameCodec::default();
    let mut line = b"PUBLISH|t|".to_vec();
    line.extend(std::iter::repeat_n(b'x', MAX_FRAME - line.len() - 1));
    line.push(b'\n');
    let mut buf = BytesMut::from(line.as_slice());
    assert!(matches!(
        codec.decode(&mut buf),
        Ok(Some(Frame::Publish { .. }))
    ));
}

#[test]
fn lines_written_from_borrowed_parts_equal_the_frames_they_stand_for() {
    let id = MsgId {
        publisher: "p".into(),
        seq: 9,
    };
    let entry = edgepair::log::Entry {
        offset: 5,
        epoch: 3,
        id: id.clone(),
        sent_us: 7,
        received_us: 8,
        payload: "a|b".into(),
    };
    let repl = Frame::Repl {
        mid: 42,
        topic: "t".into(),
        id: id.clone(),
        sent_us: 7,
        stamps: Stamps {
            offset: 5,
            epoch: 3,
            received_us: 8,
            ..Stamps::default()
        },
        payload: "a|b".into(),
    };
    let line = edgepair::protocol::repl_line(42, "t", &entry);
    assert_eq!(
        String::from_utf8(line).as_deref(),
        Ok(repl.encode().as_str())
    );
    for ack_id in [Some(id), None] {
        let mut out = Vec::new();
        edgepair::protocol::write_ack(ack_id.as_ref(), &mut out);
        let frame = Frame::Ack { id: ack_id };
        assert_eq!(
            String::from_utf8(out).as_deref(),
            Ok(frame.encode().as_str())
        );
    }
}

#[test]
fn time_asks_for_a_nodes_clock_and_its_answer_carries_two_stamps() {
    assert_eq!(parse("TIME").ok(), Some(Frame::TimeQuery));
    let t = Frame::Time {
        received_us: 1_700_000_000_000_001,
        sent_us: 1_700_000_000_000_002,
    };
    assert_eq!(t.encode(), "TIME|1700000000000001|1700000000000002\n");
    assert_eq!(parse(t.encode().trim_end()).ok(), Some(t));
    assert!(parse("TIME|1").is_err());
    assert!(parse("TIME|x|2").is_err());
}
