//! The page and the trace JSON of a run built through the correlator from real DNS bytes.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use super::*;

mod fixture {
    use crate as tracer;
    include!("fixture.rs");
}

use fixture::{busy, run, Run, EVIL_COMM, EVIL_NAME};

fn page(r: &Run) -> Page<'_> {
    Page {
        title: "DNS postmortem: worker-3".into(),
        facts: r.facts.clone(),
        lookups: &r.lookups,
        findings: &r.findings,
        clock: r.clock,
    }
}

fn lookup<'a>(r: &'a Run, name: &str) -> &'a Lookup {
    r.lookups
        .iter()
        .find(|l| l.name == name && l.problem)
        .unwrap_or_else(|| panic!("no problem lookup of {name}"))
}

/// The markup of one lookup's article.
fn article<'a>(html: &'a str, l: &Lookup) -> &'a str {
    let start = html
        .find(&format!("<article class=\"lookup\" id=\"lookup-{}\"", l.id))
        .unwrap_or_else(|| panic!("lookup {} not drawn", l.id));
    let end = start + html[start..].find("</article>").unwrap();
    &html[start..end]
}

/// The text of the first element with `class="{class}"` in `s`, tags removed.
fn text_of(s: &str, class: &str) -> String {
    let at = s
        .find(&format!("class=\"{class}\""))
        .unwrap_or_else(|| panic!("no {class}"));
    let open = at + s[at..].find('>').unwrap() + 1;
    let close = open + s[open..].find("</text>").unwrap();
    let mut out = String::new();
    let mut tag = false;
    for c in s[open..close].chars() {
        match c {
            '<' => tag = true,
            '>' => tag = false,
            c if !tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html.find(&format!("id=\"{id}\"")).unwrap();
    let end = start + html[start..].find("</section>").unwrap();
    &html[start..end]
}

#[test]
fn the_fixture_is_the_run_the_page_is_judged_on() {
    let r = run();
    let snat = lookup(&r, "svc.lab.example");
    assert_eq!(snat.latency_ns, 5_001_490_000);
    assert_eq!(
        snat.cause,
        "AAAA lost the SNAT port race on the node (insert failed), getent retried after 5.0 s"
    );
    assert_eq!(snat.verdicts(), vec![Verdict::SnatPortClash]);
    let fw = lookup(&r, "api.lab.example");
    assert_eq!(fw.latency_ns, 2_001_210_000);
    assert_eq!(fw.verdicts(), vec![Verdict::RulesetDrop]);
    assert_eq!(
        lookup(&r, "db.lab.example").verdicts(),
        vec![Verdict::InsertClashResolved]
    );
    let evil = lookup(&r, EVIL_NAME);
    assert_eq!(evil.outcome, Outcome::Unanswered);
    assert_eq!(r.lookups.iter().filter(|l| l.problem).count(), 4);
    assert_eq!(r.lookups.len(), 4 + 36 + 2);
    // Attached to a pod: the three packet findings of lookups; on the node: the rest.
    let attached = r.findings.iter().filter(|(_, w)| w.is_some()).count();
    assert_eq!((attached, r.findings.len()), (3, 6));
}

#[test]
fn durations_read_like_the_terminal() {
    assert_eq!(dur(5_001_490_000), "5.00 s");
    assert_eq!(dur(2_001_210_000), "2.00 s");
    assert_eq!(dur(152_000_000), "152 ms");
    assert_eq!(dur(1_460_000), "1.5 ms");
    assert_eq!(dur(152_000), "152 µs");
    assert_eq!(dur(800), "800 ns");
}

#[test]
fn untrusted_text_is_escaped() {
    assert_eq!(
        esc(r#"<a href="x">'&"#),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
    );
    let r = run();
    let html = html(&page(&r));
    let lower = html.to_ascii_lowercase();
    assert!(!lower.contains("<script"), "no script, and none injected");
    assert!(!lower.contains("<img"), "the comm did not become markup");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;.example"));
    assert!(html.contains(&format!("data-pod=\"host:{}\"", esc(EVIL_COMM))));
    assert!(html.contains("host:&lt;img src=x onerror=alert(1)&gt;"));
    // The evil lookup is drawn, with its name escaped in the picture too.
    let a = article(&html, lookup(&r, EVIL_NAME));
    assert!(a.contains("aria-label=\"timeline of the lookup of &lt;script&gt;"));
    // A title with markup.
    let mut p = page(&r);
    p.title = "</title><script>x</script>".into();
    p.facts.push(("trace file".into(), "\"><b>".into()));
    let html = super::html(&p);
    assert!(html.contains("<title>&lt;/title&gt;&lt;script&gt;x&lt;/script&gt;</title>"));
    assert!(html.contains("<dd>&quot;&gt;&lt;b&gt;</dd>"));
}

#[test]
fn the_page_carries_stable_hooks() {
    let r = run();
    let html = html(&page(&r));
    assert!(html.starts_with("<!DOCTYPE html>"));
    for id in ["facts", "summary", "legend", "pods", "node-findings"] {
        assert!(html.contains(&format!("id=\"{id}\"")), "id {id}");
    }
    // Each pod: a summary row and a section (problem pods) or a collapsed one (healthy).
    for (i, pod) in [(1, "ctlab/client-0"), (2, "ctlab/client-1")] {
        assert!(html.contains(&format!("<tr class=\"problem\" data-pod=\"{pod}\">")));
        assert!(html.contains(&format!(
            "<section class=\"pod\" id=\"pod-{i}\" data-pod=\"{pod}\">\n<h3>{pod}</h3>"
        )));
    }
    assert!(html.contains("<tr class=\"healthy\" data-pod=\"ctlab/web-0\">"));
    assert!(html.contains("<details class=\"pod healthy\" id=\"pod-3\" data-pod=\"ctlab/web-0\">"));
    // Every problem lookup is drawn, with its outcome; the verdicts are on their marks.
    assert_eq!(html.matches("<article class=\"lookup\"").count(), 4);
    assert_eq!(html.matches("<svg class=\"tl\"").count(), 4);
    assert_eq!(
        html.matches("<g class=\"drop\" data-verdict=\"snat-port-clash\" data-lost=\"true\">")
            .count(),
        1
    );
    assert_eq!(
        html.matches("<g class=\"drop\" data-verdict=\"ruleset-drop\" data-lost=\"true\">")
            .count(),
        1
    );
    assert_eq!(
        html.matches(
            "<g class=\"clash\" data-verdict=\"insert-clash-resolved\" data-lost=\"false\">"
        )
        .count(),
        1
    );
    assert_eq!(
        html.matches(" data-verdict=\"").count(),
        3,
        "only marks carry data-verdict"
    );
    let snat = article(&html, lookup(&r, "svc.lab.example"));
    assert!(snat.contains("data-outcome=\"answered\" data-verdicts=\"snat-port-clash\""));
    assert!(article(&html, lookup(&r, EVIL_NAME)).contains("data-outcome=\"unanswered\""));
    // Healthy lookups are rows with their outcome too: 36 of web-0, 2 of client-0.
    assert_eq!(html.matches("<tr class=\"lookup-row\"").count(), 36 + 2);
    assert!(html.contains("data-outcome=\"negative\""));
    // The summary: worst first, with the verdict counts.
    let summary = section(&html, "summary");
    let order: Vec<usize> = [
        "data-pod=\"host:",
        "data-pod=\"ctlab/client-0\"",
        "data-pod=\"ctlab/client-1\"",
        "data-pod=\"ctlab/web-0\"",
    ]
    .iter()
    .map(|p| summary.find(p).unwrap())
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(summary.contains("snat-port-clash ×1"));
    assert!(summary.contains("<span class=\"lat slow\">5.00 s</span>"));
}

#[test]
fn the_wait_the_application_felt_is_drawn_and_labelled() {
    let r = run();
    let html = html(&page(&r));
    let snat = lookup(&r, "svc.lab.example");
    let a = article(&html, snat);
    assert!(a.contains("<g class=\"gap\" data-gap-ns=\"5001490000\">"));
    assert_eq!(
        text_of(a, "gap-label"),
        "the application waited 5.00 s  (first query → answer)"
    );
    let fw = article(&html, lookup(&r, "api.lab.example"));
    assert!(text_of(fw, "gap-label").contains("waited 2.00 s"));
    let evil = article(&html, lookup(&r, EVIL_NAME));
    assert_eq!(
        text_of(evil, "gap-label"),
        "the application waited 5.00 s  (first query → the resolver gave up)"
    );
    // Each query a row, labelled with type and attempt; the retries and the silence.
    let rows: Vec<String> = a
        .split("class=\"row\"")
        .skip(1)
        .map(|s| text_of(&format!("class=\"row\"{s}"), "row"))
        .collect();
    assert_eq!(
        rows,
        ["A #1", "A #2", "AAAA #1", "AAAA #2"],
        "attempts together"
    );
    assert_eq!(a.matches("<g class=\"retry\">").count(), 2);
    assert!(a.contains("DROPPED snat-port-clash"));
    assert!(a.contains("no answer, 5.00 s of silence"));
    assert!(a.contains("retry after 5.00 s"));
    assert!(a.contains("<g class=\"answer\" data-rcode=\"NOERROR\">"));
    // The time axis, in ms, and the cause under the picture.
    assert!(a.contains(">5000</text>"));
    assert!(a.contains("ms after the first query (20:25:45.051067)"));
    assert!(a.contains(&format!("<p class=\"cause\">{}</p>", snat.cause)));
    // The same facts as the terminal: its text timeline is under the picture.
    let text = timeline::render(snat, &r.clock, Default::default());
    assert!(a.contains(&esc(&text)), "{text}");
    assert!(a.contains("SNAT from 172.18.0.2:55888"));
}

#[test]
fn findings_on_no_lookup_are_node_findings() {
    let r = run();
    let html = html(&page(&r));
    let node = section(&html, "node-findings");
    let rows: Vec<&str> = node.split("<tr class=\"finding\"").skip(1).collect();
    assert_eq!(rows.len(), 3, "{node}");
    assert!(rows[0].starts_with(" data-finding=\"insert-clash-resolved\" data-count=\"2\""));
    assert!(rows[0].contains("2 insert race(s) resolved"));
    assert!(rows[1].starts_with(" data-finding=\"table-full\" data-count=\"1\""));
    assert!(rows[1].contains("tcp 10.244.3.2:40512 → 10.96.5.5:443"));
    assert!(rows[1].contains("<td class=\"mono\">20:25:51.551067</td>"));
    assert!(rows[2].starts_with(" data-finding=\"early-drop\" data-count=\"5\""));
    assert!(!node.contains("snat-port-clash"), "attached to a lookup");
}

#[test]
fn a_counter_finding_placed_on_lookups_names_them() {
    let r = run();
    let l = lookup(&r, "svc.lab.example");
    let mut findings = r.findings.clone();
    // As if the counter had been placed on the SNAT lookup's AAAA #2.
    let mut lookups = r.lookups.clone();
    let target = lookups.iter_mut().find(|x| x.id == l.id).unwrap();
    let (f, _) = findings
        .iter()
        .find(|(f, _)| f.verdict == Verdict::InsertClashResolved && f.count == 2)
        .unwrap()
        .clone();
    target.queries[3].fate = Some(crate::lookups::Fate {
        ts_ns: f.ts_ns,
        verdict: f.verdict,
        netns: f.netns,
        lost: false,
        attribution: "counter",
        reply: false,
        nat_to: None,
        nat_from: None,
        explanation: "clash_resolve rose".into(),
    });
    findings.retain(|(x, _)| x.verdict != Verdict::TableFull);
    let p = Page {
        title: "t".into(),
        facts: vec![],
        lookups: &lookups,
        findings: &findings,
        clock: r.clock,
    };
    let html = html(&p);
    let node = section(&html, "node-findings");
    assert!(node.contains(&format!(
        "placed on 1 lookup (ctlab/client-0): <a href=\"#lookup-{}\">#{}</a>",
        l.id, l.id
    )));
    assert!(article(&html, l).contains("[from the counter: not seen per packet]"));
}

#[test]
fn a_busy_pod_draws_at_most_50_timelines_and_says_how_many_are_left_out() {
    let r = busy(60, 120);
    assert_eq!(r.lookups.iter().filter(|l| l.problem).count(), 60);
    let html = html(&page(&r));
    assert_eq!(html.matches("<article class=\"lookup\"").count(), 50);
    assert!(html.contains(
        "<p class=\"note left-out\" data-left-out=\"10\">10 more problem lookups of this pod are not drawn"
    ));
    // The 10 left out are listed, then the healthy ones (capped).
    let listed = html.matches("<tr class=\"lookup-row\"").count();
    assert_eq!(listed, 10 + MAX_TABLE_ROWS);
    assert!(html.contains("120 lookups without a problem"));
    assert!(html.contains("70 more not listed (50 shown, the slowest)."));
}

#[test]
fn thousands_of_lookups_make_a_page_of_bounded_size() {
    // Its size is bounded; how fast it renders is not asserted (no test measures a speed:
    // docs/testing.md).
    let r = busy(300, 5000);
    let html = html(&page(&r));
    assert_eq!(
        html.matches("<svg class=\"tl\"").count(),
        MAX_TIMELINES_PER_POD
    );
    assert!(html.len() < 2_000_000, "{} bytes", html.len());
}

/// The attributes of a tag (the text after `<`), quotes honoured: (name, value).
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = tag.chars().peekable();
    // The tag name.
    while chars.peek().is_some_and(|c| !c.is_whitespace()) {
        chars.next();
    }
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == '/') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            name.push(c.to_ascii_lowercase());
            chars.next();
        }
        if name.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            match chars.peek().copied() {
                Some(q @ ('"' | '\'')) => {
                    chars.next();
                    for c in chars.by_ref() {
                        if c == q {
                            break;
                        }
                        value.push(c);
                    }
                }
                _ => {
                    while chars.peek().is_some_and(|c| !c.is_whitespace()) {
                        value.push(chars.next().unwrap());
                    }
                }
            }
        }
        out.push((name, value));
    }
}

/// What in the markup could make a browser fetch something: attributes that load or link
/// (other than links within the page), elements that load, CSS that loads. Text is escaped,
/// so every `<` opens a tag.
fn external_references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for tag in html.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or("");
        let name = tag
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if [
            "link", "iframe", "object", "embed", "script", "img", "image", "use", "base",
        ]
        .contains(&name.as_str())
        {
            found.push(format!("<{tag}>"));
        }
        for (attr, value) in attributes(tag) {
            let loads = [
                "src",
                "srcset",
                "action",
                "poster",
                "data",
                "background",
                "formaction",
            ]
            .contains(&attr.as_str());
            let links = (attr == "href" || attr == "xlink:href") && !value.starts_with('#');
            if loads || links || value.to_ascii_lowercase().contains("url(") {
                found.push(format!("<{tag}>"));
            }
        }
    }
    let css = html
        .split("<style>")
        .nth(1)
        .and_then(|s| s.split("</style>").next())
        .unwrap_or("");
    for bad in ["url(", "@import", "@font-face"] {
        if css.contains(bad) {
            found.push(format!("style: {bad}"));
        }
    }
    found
}

#[test]
fn the_page_fetches_nothing() {
    let r = run();
    let html = html(&page(&r));
    assert!(html.contains(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
    ));
    assert_eq!(external_references(&html), Vec::<String>::new());
    assert!(!html.contains("http://") && !html.contains("https://"));
    // The check itself finds what it should.
    let bad =
        "<p title=\"a src=x\"><video poster=x><a href=\"https://x\">x</a><a href=\"#ok\">ok</a>\
               <img src=x><style>a{background:url(x)}</style>";
    assert_eq!(
        external_references(bad),
        [
            "<video poster=x>",
            "<a href=\"https://x\">",
            "<img src=x>",
            "<img src=x>",
            "style: url("
        ]
    );
}

#[test]
fn the_markup_is_balanced() {
    let r = run();
    let html = html(&page(&r));
    for tag in [
        "svg", "g", "text", "tspan", "title", "section", "article", "table", "tr", "details", "ul",
        "li", "p",
    ] {
        let open =
            html.matches(&format!("<{tag}>")).count() + html.matches(&format!("<{tag} ")).count();
        let close = html.matches(&format!("</{tag}>")).count();
        assert_eq!(open, close, "<{tag}>");
    }
}

#[test]
fn an_empty_run_still_makes_a_page() {
    let p = Page {
        title: "nothing".into(),
        facts: vec![("node".into(), "n".into())],
        lookups: &[],
        findings: &[],
        clock: Clock::fixed(0),
    };
    let html = html(&p);
    assert!(html.contains("No DNS lookups were recorded."));
    assert!(html.contains("No lookup had a problem"));
    let v = perfetto(&p);
    assert_eq!(v["traceEvents"].as_array().unwrap().len(), 0);
}

#[test]
fn the_perfetto_trace_is_valid_trace_event_json() {
    let r = run();
    let v = perfetto(&page(&r));
    let text = serde_json::to_string(&v).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["displayTimeUnit"], "ns");
    assert_eq!(
        v["otherData"]["time_origin"],
        "2026-11-22T20:25:45.051067000Z"
    );
    assert_eq!(v["otherData"]["node"], "worker-3 (fixture)");
    let ev = v["traceEvents"].as_array().unwrap();
    for e in ev {
        let ph = e["ph"].as_str().unwrap();
        assert!(["M", "X", "i"].contains(&ph), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        if ph != "M" {
            let ts = e["ts"].as_f64().unwrap();
            assert!(ts.is_finite() && ts >= 0.0, "{e}");
        }
        if ph == "i" {
            assert_eq!(e["s"], "t");
        }
    }
    // One process per pod, named, in label order; then the node's findings.
    let procs: Vec<(u64, &str)> = ev
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| {
            (
                e["pid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    let host = format!("host:{EVIL_COMM}");
    assert_eq!(
        procs,
        [
            (1, "ctlab/client-0"),
            (2, "ctlab/client-1"),
            (3, "ctlab/web-0"),
            (4, host.as_str()),
            (5, "node findings")
        ]
    );
    // Lookups as complete events, with outcome and cause; never overlapping on one thread.
    let x: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(x.len(), r.lookups.len());
    let snat = x
        .iter()
        .find(|e| e["name"] == "svc.lab.example" && e["args"]["problem"] == true)
        .unwrap();
    assert_eq!(snat["pid"], 1);
    assert_eq!(snat["ts"].as_f64().unwrap(), 0.0);
    assert_eq!(snat["dur"].as_f64().unwrap(), 5_001_490.0);
    assert_eq!(snat["args"]["outcome"], "answered");
    assert_eq!(
        snat["args"]["cause"],
        "AAAA lost the SNAT port race on the node (insert failed), getent retried after 5.0 s"
    );
    let mut by_thread: HashMap<(u64, u64), Vec<(f64, f64)>> = HashMap::new();
    for e in &x {
        let ts = e["ts"].as_f64().unwrap();
        by_thread
            .entry((e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
            .or_default()
            .push((ts, ts + e["dur"].as_f64().unwrap()));
    }
    for spans in by_thread.values_mut() {
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
    }
    // Queries and answers as instants; drops and clashes as instants with their verdict.
    let queries: usize = r.lookups.iter().map(|l| l.queries.len()).sum();
    assert_eq!(ev.iter().filter(|e| e["cat"] == "query").count(), queries);
    let drops: BTreeSet<(&str, &str)> = ev
        .iter()
        .filter(|e| e["cat"] == "drop" || e["cat"] == "clash")
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["args"]["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(drops.contains(&("snat-port-clash", "snat-port-clash")));
    assert!(drops.contains(&("ruleset-drop", "ruleset-drop")));
    assert!(drops.contains(&("insert-clash-resolved", "insert-clash-resolved")));
    let drop = ev
        .iter()
        .find(|e| e["name"] == "snat-port-clash" && e["pid"] == 1)
        .unwrap();
    assert_eq!(drop["ts"].as_f64().unwrap(), 172.0);
    assert_eq!(drop["args"]["query"], "AAAA #1");
    assert_eq!(drop["args"]["nat_from"], "172.18.0.2:55888");
    let node: Vec<&str> = ev
        .iter()
        .filter(|e| e["pid"] == 5 && e["ph"] == "i")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        node,
        ["insert-clash-resolved ×2", "table-full", "early-drop ×5"]
    );
}

#[test]
fn incomplete_lookups_are_counted_apart_from_failures() {
    let mut r = run();
    let healthy = r
        .lookups
        .iter()
        .position(|l| !l.problem && l.outcome == Outcome::Answered)
        .expect("a healthy lookup in the fixture");
    let before = html(&page(&r));
    let failed_before = text_of_card(&before, "failed");
    assert!(!before.contains("id=\"card-incomplete\""));
    let l = &mut r.lookups[healthy];
    l.outcome = Outcome::Incomplete;
    l.lost_records = 12;
    let after = html(&page(&r));
    assert_eq!(text_of_card(&after, "incomplete"), "1");
    assert_eq!(text_of_card(&after, "failed"), failed_before);
    assert!(after.contains("data-outcome=\"incomplete\""));
}

/// The number on an overview card.
fn text_of_card(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("id=\"card-{id}\"><b>"))
        .unwrap_or_else(|| panic!("no card {id}"));
    let start = at + html[at..].find("<b>").unwrap() + 3;
    let end = start + html[start..].find("</b>").unwrap();
    html[start..end].to_string()
}
