//! The report page in a real browser: headless Chromium renders it (the screenshot is kept
//! as `target/artefacts/report-*.png`), its DOM has the pods, verdicts, hooks and the wait
//! label, and the page fetches nothing. No root needed; Chromium comes from
//! `cargo xtask setup` (Debian's `chromium`).

mod common;

use std::{
    fs,
    time::{Duration, Instant},
};

use common::chromium::*;
use tracer::report::{self, Page};

mod fixture {
    #![allow(dead_code, reason = "shared with the unit tests, which use all of it")]
    include!("../src/report/fixture.rs");
}

fn page(r: &fixture::Run) -> Page<'_> {
    Page {
        title: "DNS postmortem: worker-3, 20:25:45–20:26:05 UTC".into(),
        facts: r.facts.clone(),
        lookups: &r.lookups,
        findings: &r.findings,
        clock: r.clock,
    }
}

#[test]
fn the_report_renders_in_headless_chromium() {
    let work = Scratch::new("report");
    let r = fixture::run();
    let p = page(&r);
    let html = report::html(&p);
    let file = work.0.join("report.html");
    fs::write(&file, &html).unwrap();
    let artefacts = artefacts_dir();
    fs::write(artefacts.join("report-run.html"), &html).unwrap();
    let trace = serde_json::to_string_pretty(&report::perfetto(&p)).unwrap();
    fs::write(artefacts.join("report-run.perfetto.json"), trace).unwrap();

    let png = artefacts.join("report-run.png");
    let shot = screenshot(&file, &png, (1400, 2000), &work.0);
    let size = fs::metadata(&png).unwrap().len();
    assert!(
        size > 100_000,
        "a rendered page, not a blank one: {size} bytes"
    );
    assert_eq!(
        shot.console(),
        Vec::<&str>::new(),
        "the page logged nothing"
    );

    let dom = dump_dom(&file, &work.0);
    assert_eq!(dom.console(), Vec::<&str>::new(), "the page logged nothing");
    let dom = dom.stdout;
    assert!(dom.contains("id=\"summary\""));
    assert!(dom.contains("id=\"node-findings\""));
    for pod in ["ctlab/client-0", "ctlab/client-1", "ctlab/web-0"] {
        assert!(dom.contains(&format!("data-pod=\"{pod}\"")), "{pod}");
        assert!(dom.contains(&format!(">{pod}</")), "{pod} shown");
    }
    for v in [
        "snat-port-clash",
        "ruleset-drop",
        "insert-clash-resolved",
        "table-full",
        "early-drop",
    ] {
        assert!(dom.contains(v), "{v}");
    }
    assert!(dom.contains("data-verdict=\"snat-port-clash\""));
    assert!(dom.contains("data-verdict=\"ruleset-drop\""));
    assert!(dom.contains("data-verdict=\"insert-clash-resolved\""));
    for o in ["answered", "unanswered", "negative"] {
        assert!(dom.contains(&format!("data-outcome=\"{o}\"")), "{o}");
    }
    assert!(dom.contains(">the application waited </tspan><tspan fill=\"#c62828\" font-weight=\"700\">5.00 s</tspan>"));
    assert!(dom.contains(">2.00 s</tspan>"));
    assert!(dom.contains(
        "AAAA lost the SNAT port race on the node (insert failed), getent retried after 5.0 s"
    ));
    // Markup in names stayed text: the browser made no element of it.
    assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;.example"));
    assert!(!dom.contains("<script"));
    assert!(!dom.contains("<img"));
}

#[test]
fn the_report_fetches_nothing() {
    let work = Scratch::new("report-net");
    let r = fixture::run();
    let html = report::html(&page(&r));
    // In the source: a policy that forbids every fetch, and no reference to load.
    assert!(
        html.contains("content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"")
    );
    let lower = html.to_ascii_lowercase();
    for bad in [
        "http://", "https://", "url(", "@import", "<link", "<script", "<iframe", " src=\"",
        "//fonts",
    ] {
        assert!(!lower.contains(bad), "{bad}");
    }
    for href in lower.split(" href=\"").skip(1) {
        assert!(
            href.starts_with('#'),
            "a link out of the page: {}",
            &href[..60.min(href.len())]
        );
    }
    // In the browser: the page as it is logs nothing; the same page with an image from the
    // network added is refused by its own policy (and Chromium says so on the console).
    let file = work.0.join("report.html");
    fs::write(&file, &html).unwrap();
    assert_eq!(dump_dom(&file, &work.0).console(), Vec::<&str>::new());
    let bad = html.replacen(
        "<main>",
        "<main><img src=\"http://example.invalid/pixel.png\" alt=\"\">",
        1,
    );
    let bad_file = work.0.join("report-with-a-fetch.html");
    fs::write(&bad_file, bad).unwrap();
    let run = dump_dom(&bad_file, &work.0);
    let console = run.console();
    assert!(
        console
            .iter()
            .any(|l| l.contains("http://example.invalid/pixel.png")
                && l.contains("Content Security Policy")),
        "the policy refused the fetch: {console:?}"
    );
}

#[test]
fn a_busy_report_renders_with_its_timelines_capped() {
    let work = Scratch::new("report-busy");
    let r = fixture::busy(60, 3000);
    let html = report::html(&page(&r));
    let file = work.0.join("report.html");
    fs::write(&file, &html).unwrap();
    let png = artefacts_dir().join("report-busy.png");
    screenshot(&file, &png, (1400, 2000), &work.0);
    let dom = dump_dom(&file, &work.0).stdout;
    assert_eq!(dom.matches("<article class=\"lookup\"").count(), 50);
    assert!(dom.contains("10 more problem lookups of this pod are not drawn"));
    assert!(dom.contains("3000 lookups without a problem"));
    assert!(dom.contains("data-pod=\"ctlab/load-0\""));
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn a_chromium_that_hangs_is_killed_with_all_its_processes() {
    let work = Scratch::new("chromium-hang");
    // A page that never finishes loading: --dump-dom would wait for ever.
    let file = work.0.join("hang.html");
    fs::write(&file, "<!DOCTYPE html><p>x</p><script>for(;;){}</script>").unwrap();
    let t = Instant::now();
    let err = match try_chromium(&file, &["--dump-dom"], &work.0, Duration::from_secs(4)) {
        Ok(run) => panic!("a page that never loads was dumped: {}", run.stdout),
        Err(e) => e,
    };
    assert!(err.contains("did not finish in 4s"), "{err}");
    assert!(t.elapsed() < common::bound(15), "{:?}", t.elapsed());
    let marker = work.0.to_string_lossy().into_owned();
    assert_eq!(
        processes_mentioning(&marker),
        Vec::<u32>::new(),
        "no Chromium process left"
    );
}
