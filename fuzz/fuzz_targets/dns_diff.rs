//! The same datagram through `tracer::dns` and the candidate libraries. Every outcome is
//! tallied into `$DNS_DIFF_REPORT` (library panics included, which do not stop the run); the
//! run fails only on a disagreement that matters: ours panics, or ours accepts a message that
//! simple-dns and hickory-proto both decode identically on a field where ours says otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_fuzz::{differences, error_kind, hex, ours_view, Outcome, CANDIDATES, TALLY};

extern "C" fn write_tally() {
    if let Ok(mut t) = TALLY.lock() {
        t.write();
    }
}

fuzz_target!(
    init: {
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit(3) expects.
        unsafe { libc::atexit(write_tally) };
    },
    |data: &[u8]| {
        let ours = ours_view(data);
        let theirs: Vec<(&str, Outcome)> = CANDIDATES.iter().map(|(n, f)| (*n, f(data))).collect();
        let mut t = TALLY.lock().unwrap();
        t.add("inputs".into(), String::new);
        match &ours {
            Ok(_) => t.add("tracer::dns: accepts".into(), || hex(data)),
            Err(e) => {
                let kind = error_kind(&format!("{e:?}"));
                t.add(format!("tracer::dns: rejects: {kind}"), || format!("{} ({e})", hex(data)));
            }
        }
        for (lib, outcome) in &theirs {
            let (key, detail) = match (&ours, outcome) {
                (_, Outcome::Panicked(msg)) => ("panics".to_string(), msg.clone()),
                (Ok(o), Outcome::Accepted(v)) => {
                    let d = differences(o, v);
                    if d.is_empty() {
                        ("both accept, agree".into(), String::new())
                    } else {
                        (
                            format!("both accept, differ in {}", d.join(", ")),
                            format!("ours {o:?} / {lib} {v:?}"),
                        )
                    }
                }
                (Err(_), Outcome::Rejected(_)) => ("both reject".into(), String::new()),
                (Ok(_), Outcome::Rejected(e)) => {
                    (format!("ours accepts, {lib} rejects: {e}"), String::new())
                }
                (Err(e), Outcome::Accepted(v)) => {
                    let kind = error_kind(&format!("{e:?}"));
                    (format!("{lib} accepts, ours rejects: {kind}"), format!("{e} / {lib} {v:?}"))
                }
            };
            t.add(format!("{lib}: {key}"), || {
                if detail.is_empty() {
                    hex(data)
                } else {
                    format!("{} [{detail}]", hex(data))
                }
            });
        }
        t.maybe_write();
        drop(t);

        // What matters: the two maintained libraries agree with each other and not with us.
        let [_, (_, Outcome::Accepted(s)), (_, Outcome::Accepted(h))] = theirs.as_slice() else {
            return;
        };
        let o = match &ours {
            Ok(o) => o,
            Err(e) => panic!(
                "tracer::dns rejects what simple-dns and hickory-proto accept: {}\n{e}\n\
                 simple-dns {s:?}\nhickory {h:?}",
                hex(data)
            ),
        };
        let (ds, dh, agree) = (differences(o, s), differences(o, h), differences(s, h));
        if let Some(field) = ds.iter().find(|f| dh.contains(f) && !agree.contains(f)) {
            panic!(
                "tracer::dns differs from simple-dns and hickory-proto in {field}: {}\n\
                 ours {o:?}\nsimple-dns {s:?}\nhickory {h:?}",
                hex(data)
            );
        }
    }
);
