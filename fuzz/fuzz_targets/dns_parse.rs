//! `tracer::dns` must never panic, on any bytes, whole or cut by the capture, and a capture
//! of a message it decodes must decode to a prefix of that message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::dns::{self, DnsError, Message};

fuzz_target!(|msg: &[u8]| {
    let whole = dns::parse(msg, msg.len());
    // Captures as the tracer makes them: the 64 bytes of a netfilter drop, and a cut chosen
    // by the message id (any value the fuzzer likes, without breaking the seeds' layout).
    let id_cut = match msg {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])) % (msg.len() + 1),
        _ => 0,
    };
    for cut in [msg.len(), msg.len().min(64), id_cut] {
        let captured = &msg[..cut];
        let _ = dns::header_and_question(captured);
        // The same bytes as a whole datagram: never cut by the capture.
        if let Ok(m) = dns::parse(captured, cut) {
            check(&m, captured.len(), cut);
            assert!(!m.capture_cut);
        }
        match (&whole, dns::parse(captured, msg.len())) {
            (_, Ok(part)) => check(&part, captured.len(), msg.len()),
            (Ok(_), Err(DnsError::ShortHeader { .. } | DnsError::TruncatedQuestion { .. })) => {}
            (Ok(_), Err(e)) => panic!("whole message decodes, {cut} bytes of it: {e}"),
            (Err(_), Err(_)) => {}
        }
        if let (Ok(whole), Ok(part)) = (&whole, dns::parse(captured, msg.len())) {
            assert_eq!(part.questions, whole.questions);
            assert!(whole.answers.starts_with(&part.answers));
            assert!(part.capture_cut || part.answers == whole.answers);
        }
    }
});

fn check(m: &Message, captured: usize, full: usize) {
    assert!(m.answers.len() <= usize::from(m.answer_count));
    assert!(m.capture_cut || m.answers.len() == usize::from(m.answer_count));
    assert!(!m.capture_cut || captured < full);
    // What the JSON and text output do with it.
    assert!(serde_json::to_string(m).is_ok());
    for a in &m.answers {
        let _ = a.data.to_string();
        let _ = dns::qtype_name(a.rtype);
    }
    let _ = m.rcode.name();
}
