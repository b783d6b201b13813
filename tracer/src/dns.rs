//! A summary of the DNS message in a captured payload (id, flags, questions, answers).
//! Malformed or truncated payloads give an error string, never a panic.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsSummary {
    pub id: u16,
    /// A response (QR bit set).
    pub response: bool,
    pub rcode: String,
    pub truncated: bool,
    pub questions: Vec<Question>,
    pub answers: Vec<Answer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Question {
    pub name: String,
    pub qtype: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub name: String,
    pub rtype: String,
    pub data: String,
}

/// Parses a DNS message. `payload` may be a prefix of the datagram (capture limit).
pub fn summarize(payload: &[u8]) -> Result<DnsSummary, String> {
    let p = dns_parser::Packet::parse(payload).map_err(|e| e.to_string())?;
    Ok(DnsSummary {
        id: p.header.id,
        response: !p.header.query,
        rcode: format!("{:?}", p.header.response_code),
        truncated: p.header.truncated,
        questions: p
            .questions
            .iter()
            .map(|q| Question {
                name: q.qname.to_string(),
                qtype: format!("{:?}", q.qtype),
            })
            .collect(),
        answers: p
            .answers
            .iter()
            .map(|a| {
                use dns_parser::RData;
                let (rtype, data) = match &a.data {
                    RData::A(r) => ("A", r.0.to_string()),
                    RData::AAAA(r) => ("AAAA", r.0.to_string()),
                    RData::CNAME(r) => ("CNAME", r.0.to_string()),
                    RData::PTR(r) => ("PTR", r.0.to_string()),
                    _ => ("other", String::new()),
                };
                Answer {
                    name: a.name.to_string(),
                    rtype: rtype.into(),
                    data,
                }
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for example.com A with id 0x1234, as dig sends it (no EDNS).
    const QUERY: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";

    #[test]
    fn query() {
        let s = summarize(QUERY).unwrap();
        assert_eq!(s.id, 0x1234);
        assert!(!s.response);
        assert_eq!(
            s.questions,
            vec![Question {
                name: "example.com".into(),
                qtype: "A".into()
            }]
        );
    }

    #[test]
    fn truncated_is_an_error() {
        for n in 0..QUERY.len() {
            assert!(
                summarize(&QUERY[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
    }
}
