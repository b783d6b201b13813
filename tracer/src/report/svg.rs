//! One lookup as an SVG timeline: a row per query (send, answer, drop or clash, silence,
//! retry), the wait the application felt as a bracket on top, a time axis in ms from the
//! lookup's first query. The facts are those of the text timeline (`timeline::render`).

use std::fmt::Write as _;

use super::{dur, esc, verdict_colour};
use crate::{
    lookups::{Lookup, Outcome, Query},
    output::Clock,
    timeline,
    verdict::Verdict,
};

/// viewBox width; the picture scales to the page.
const W: f64 = 1160.0;
/// The plot, between the row labels and the right margin.
const LEFT: f64 = 150.0;
const RIGHT: f64 = 1130.0;
const ROW_H: f64 = 26.0;
/// Centre of the first row.
const FIRST_ROW: f64 = 66.0;
/// Advance of one character of the 12 px monospace font (0.602 em, DejaVu Sans Mono).
const CHAR_W: f64 = 7.3;
/// The least distance between the marks of one row, in px.
pub(super) const MIN_SEP: f64 = 11.0;
/// Rows drawn per lookup; the text timeline under the picture has every query.
pub(super) const MAX_ROWS: usize = 40;

const SEND: &str = "#24292f";
const ANSWER: &str = "#2e7d32";
const ANSWER_ERR: &str = "#b26a00";
const SILENCE: &str = "#8c959f";
const RETRY: &str = "#b26a00";
const WAIT_SLOW: &str = "#c62828";
const WAIT: &str = "#486581";
const LOST_TEXT: &str = "#c62828";

struct Scale {
    t0: u64,
    span_ns: f64,
}

impl Scale {
    fn x(&self, ts: u64) -> f64 {
        LEFT + ts.saturating_sub(self.t0) as f64 / self.span_ns * (RIGHT - LEFT)
    }
}

use crate::timeline::silent_until;

fn previous_attempt<'a>(l: &'a Lookup, q: &Query) -> Option<&'a Query> {
    l.queries
        .iter()
        .find(|p| p.qname == q.qname && p.qtype == q.qtype && p.attempt + 1 == q.attempt)
}

/// A piece of a label: text, colour, bold.
type Seg = (String, &'static str, bool);

fn seg_len(segs: &[Seg]) -> usize {
    segs.iter().map(|(t, _, _)| t.chars().count()).sum()
}

/// Cuts `segs` to `max` characters, ending with an ellipsis.
fn truncate(segs: &[Seg], max: usize) -> Vec<Seg> {
    if seg_len(segs) <= max {
        return segs.to_vec();
    }
    let mut left = max.saturating_sub(1);
    let mut out = Vec::new();
    for (t, c, b) in segs {
        if left == 0 {
            break;
        }
        let n = t.chars().count();
        if n <= left {
            out.push((t.clone(), *c, *b));
            left -= n;
        } else {
            out.push((t.chars().take(left).collect(), *c, *b));
            left = 0;
        }
    }
    out.push(("…".into(), SEND, false));
    out
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, class: &str, segs: &[Seg]) {
    let _ = write!(
        out,
        "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" class=\"{class}\" \
         paint-order=\"stroke\" stroke=\"#fff\" stroke-width=\"4\" stroke-linejoin=\"round\">"
    );
    for (t, colour, bold) in segs {
        let weight = if *bold { " font-weight=\"700\"" } else { "" };
        let _ = write!(out, "<tspan fill=\"{colour}\"{weight}>{}</tspan>", esc(t));
    }
    out.push_str("</text>");
}

/// Places a label next to what it describes: right of the row's last mark, left of its
/// first, centred over a long span, else on the roomier side, cut to fit.
fn place_label(out: &mut String, start: f64, end: f64, y: f64, segs: &[Seg]) {
    let width = seg_len(segs) as f64 * CHAR_W;
    let y = y + 4.0;
    if end + 10.0 + width <= W - 4.0 {
        text(out, end + 10.0, y, "start", "ev", segs);
    } else if start - 10.0 - width >= LEFT + 2.0 {
        text(out, start - 10.0, y, "end", "ev", segs);
    } else if end - start >= width + 24.0 {
        text(out, (start + end) / 2.0, y - 8.0, "middle", "ev", segs);
    } else {
        let right = W - 4.0 - (end + 10.0);
        let left = start - 10.0 - (LEFT + 2.0);
        if right >= left {
            let max = (right / CHAR_W).max(4.0) as usize;
            text(out, end + 10.0, y, "start", "ev", &truncate(segs, max));
        } else {
            let max = (left / CHAR_W).max(4.0) as usize;
            text(out, start - 10.0, y, "end", "ev", &truncate(segs, max));
        }
    }
}

/// Axis ticks in ms: a 1-2-5 step giving 5 to 10 ticks over `span_ms`, and the decimals
/// the labels need.
fn ticks(span_ms: f64) -> (Vec<f64>, usize) {
    let raw = (span_ms / 8.0).max(1e-6);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let mut v = Vec::new();
    let mut k = 0.0;
    while k * step <= span_ms * 1.000_001 && v.len() < 20 {
        v.push(k * step);
        k += 1.0;
    }
    (v, decimals.min(6))
}

/// A cross (lost packet) or a ring (a clash that lost nothing) in the verdict's colour.
fn verdict_mark(out: &mut String, x: f64, y: f64, v: Verdict, lost: bool) {
    let c = verdict_colour(v);
    if lost {
        let _ = write!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"8\" fill=\"#fff\" stroke=\"{c}\" stroke-width=\"1.5\"/>\
             <path d=\"M{:.1} {:.1}L{:.1} {:.1}M{:.1} {:.1}L{:.1} {:.1}\" stroke=\"{c}\" stroke-width=\"3\" stroke-linecap=\"round\"/>",
            x - 4.5,
            y - 4.5,
            x + 4.5,
            y + 4.5,
            x - 4.5,
            y + 4.5,
            x + 4.5,
            y - 4.5
        );
    } else {
        let _ = write!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"6.5\" fill=\"#fff\" stroke=\"{c}\" stroke-width=\"3\"/>"
        );
    }
}

fn diamond(out: &mut String, x: f64, y: f64, fill: &str) {
    let _ = write!(
        out,
        "<path d=\"M{x:.1} {:.1}L{:.1} {y:.1}L{x:.1} {:.1}L{:.1} {y:.1}Z\" fill=\"{fill}\" stroke=\"#fff\" stroke-width=\"1\"/>",
        y - 6.5,
        x + 6.5,
        y + 6.5,
        x - 6.5
    );
}

fn answer_colour(rcode: &str) -> &'static str {
    if rcode == "NOERROR" {
        ANSWER
    } else {
        ANSWER_ERR
    }
}

/// The timeline of one lookup.
pub(super) fn lookup(l: &Lookup, clock: &Clock) -> String {
    // Rows: the attempts of one name and type together, in the order the types were first
    // asked (A #1, A #2, AAAA #1, AAAA #2), so that a retry is right below what it repeats.
    let first = |q: &Query| {
        l.queries
            .iter()
            .position(|p| p.qname == q.qname && p.qtype == q.qtype)
            .unwrap_or(0)
    };
    let mut rows: Vec<&Query> = l.queries.iter().collect();
    rows.sort_by_key(|q| (first(q), q.attempt, q.ts_ns));
    rows.truncate(MAX_ROWS);
    let mut t_end = l.end_ns.max(l.start_ns);
    for q in &rows {
        t_end = t_end.max(q.ts_ns);
        if let Some(a) = &q.answer {
            t_end = t_end.max(a.ts_ns);
        }
        if let Some(f) = &q.fate {
            t_end = t_end.max(f.ts_ns);
        }
    }
    let s = Scale {
        t0: l.start_ns,
        span_ns: (t_end - l.start_ns).max(1_000) as f64,
    };
    let last_row = FIRST_ROW + (rows.len().max(1) - 1) as f64 * ROW_H;
    let axis_y = last_row + ROW_H / 2.0 + 6.0;
    let h = axis_y + 42.0;
    let mut out = String::with_capacity(8 * 1024);
    let _ = write!(
        out,
        "<svg class=\"tl\" viewBox=\"0 0 {W} {h:.0}\" \
         font-family=\"ui-monospace,'DejaVu Sans Mono',Menlo,Consolas,monospace\" font-size=\"12\" \
         role=\"img\" aria-label=\"timeline of the lookup of {} by {}\">",
        esc(&l.name),
        esc(&timeline::who(l))
    );
    let _ = write!(
        out,
        "<title>{} {}: {}, {}</title>",
        esc(&timeline::who(l)),
        esc(&l.name),
        dur(l.latency_ns),
        timeline::outcome_word(l)
    );

    // Row stripes, grid, axis.
    for (i, _) in rows.iter().enumerate() {
        if i % 2 == 1 {
            let y = FIRST_ROW + i as f64 * ROW_H - ROW_H / 2.0;
            let _ = write!(
                out,
                "<rect x=\"0\" y=\"{y:.1}\" width=\"{W}\" height=\"{ROW_H}\" fill=\"#f6f8fa\"/>"
            );
        }
    }
    let (ticks, decimals) = ticks(s.span_ns / 1e6);
    out.push_str("<g class=\"axis\">");
    for t in &ticks {
        let x = LEFT + t / (s.span_ns / 1e6) * (RIGHT - LEFT);
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{axis_y:.1}\" stroke=\"#d8dee4\" stroke-width=\"1\"/>\
             <line x1=\"{x:.1}\" y1=\"{axis_y:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#57606a\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#57606a\" font-size=\"11\">{t:.decimals$}</text>",
            FIRST_ROW - ROW_H / 2.0,
            axis_y + 5.0,
            axis_y + 17.0,
        );
    }
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{axis_y:.1}\" x2=\"{RIGHT}\" y2=\"{axis_y:.1}\" stroke=\"#57606a\"/>\
         <text x=\"{RIGHT}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#57606a\" font-size=\"11\">ms after the first query ({})</text></g>",
        axis_y + 34.0,
        esc(&timeline::clock_time(clock, l.start_ns))
    );

    // The wait the application felt: first query to the answer that ended the lookup (or to
    // when the resolver gave up).
    let (xs, xe) = (s.x(l.start_ns), s.x(l.end_ns));
    let slow = l.latency_ns >= 1_000_000_000
        || matches!(
            l.outcome,
            Outcome::Unanswered | Outcome::Error | Outcome::Shed
        );
    let wc = if slow { WAIT_SLOW } else { WAIT };
    let until = match l.outcome {
        Outcome::Answered => "first query → answer",
        Outcome::Negative => "first query → negative answer",
        Outcome::Error => "first query → error answer",
        Outcome::Unanswered => "first query → the resolver gave up",
        Outcome::Shed => "first query → closed early",
        Outcome::Incomplete => "first query → closed, records lost meanwhile",
    };
    let _ = write!(
        out,
        "<g class=\"gap\" data-gap-ns=\"{}\"><line x1=\"{xs:.1}\" y1=\"30\" x2=\"{:.1}\" y2=\"30\" stroke=\"{wc}\" stroke-width=\"4\"/>\
         <line x1=\"{xs:.1}\" y1=\"23\" x2=\"{xs:.1}\" y2=\"37\" stroke=\"{wc}\" stroke-width=\"2\"/>\
         <line x1=\"{xe:.1}\" y1=\"23\" x2=\"{xe:.1}\" y2=\"37\" stroke=\"{wc}\" stroke-width=\"2\"/>",
        l.latency_ns,
        xe.max(xs + 1.0),
    );
    let label: Vec<Seg> = vec![
        ("the application waited ".into(), "#57606a", false),
        (dur(l.latency_ns), wc, true),
        (format!("  ({until})"), "#57606a", false),
    ];
    let width = seg_len(&label) as f64 * CHAR_W;
    let (lx, anchor) = if xe - xs >= width + 20.0 {
        ((xs + xe) / 2.0, "middle")
    } else if xs + width <= W - 4.0 {
        (xs, "start")
    } else {
        (xe, "end")
    };
    text(&mut out, lx, 18.0, anchor, "gap-label", &label);
    out.push_str("</g>");

    // One row per query.
    for (i, q) in rows.iter().enumerate() {
        let y = FIRST_ROW + i as f64 * ROW_H;
        let x = s.x(q.ts_ns);
        let mut segs: Vec<Seg> = Vec::new();
        let mut end = x;
        // Where the drop and answer marks go: at their time, but never on top of the send
        // mark or of each other (the labels and tooltips carry the exact times).
        let xf = q.fate.as_ref().map(|f| s.x(f.ts_ns).max(x + MIN_SEP));
        let xa = q.answer.as_ref().map(|a| {
            let after_fate = match (&q.fate, xf) {
                (Some(f), Some(xf)) if f.ts_ns <= a.ts_ns => xf + MIN_SEP,
                _ => x + MIN_SEP,
            };
            s.x(a.ts_ns).max(after_fate)
        });
        let _ = write!(
            out,
            "<g class=\"query\" data-qtype=\"{}\" data-attempt=\"{}\">",
            esc(&q.qtype),
            q.attempt
        );
        // Row label: type, attempt, and the name when a search expansion changed it.
        let mut head: Vec<Seg> = vec![(format!("{} #{}", q.qtype, q.attempt), SEND, true)];
        if q.qname != l.name {
            head.push((format!(" {}", q.qname), "#57606a", false));
        }
        let max = ((LEFT - 14.0) / CHAR_W) as usize;
        text(
            &mut out,
            8.0,
            y + 4.0,
            "start",
            "row",
            &truncate(&head, max),
        );

        // Retry: an arrow from the previous attempt's row to this send.
        if let Some(p) = previous_attempt(l, q) {
            if let Some(j) = rows.iter().position(|r| std::ptr::eq(*r, p)) {
                let yp = FIRST_ROW + j as f64 * ROW_H;
                let _ = write!(
                    out,
                    "<g class=\"retry\"><path d=\"M{x:.1} {:.1}L{x:.1} {:.1}\" stroke=\"{RETRY}\" stroke-width=\"2\"/>\
                     <path d=\"M{:.1} {:.1}L{x:.1} {:.1}L{:.1} {:.1}Z\" fill=\"{RETRY}\"/></g>",
                    yp + 7.0,
                    y - 11.0,
                    x - 4.5,
                    y - 12.0,
                    y - 5.5,
                    x + 4.5,
                    y - 12.0,
                );
            }
            segs.push((
                format!("retry after {}", dur(q.ts_ns.saturating_sub(p.ts_ns))),
                RETRY,
                true,
            ));
        }

        // Silence: no answer until the next attempt or the end.
        if q.answer.is_none() && q.unanswered {
            let until = silent_until(l, q);
            let xe = s.x(until);
            let _ = write!(
                out,
                "<g class=\"silence\" data-silence-ns=\"{}\"><line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{xe:.1}\" y2=\"{y:.1}\" \
                 stroke=\"{SILENCE}\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>\
                 <line x1=\"{xe:.1}\" y1=\"{:.1}\" x2=\"{xe:.1}\" y2=\"{:.1}\" stroke=\"{SILENCE}\" stroke-width=\"2\"/></g>",
                until - q.ts_ns,
                y - 6.0,
                y + 6.0
            );
            end = end.max(xe);
        }

        // Answer: the round trip as a bar, and the answer mark.
        if let (Some(a), Some(xa)) = (&q.answer, xa) {
            let c = answer_colour(&a.rcode);
            let _ = write!(
                out,
                "<g class=\"answer\" data-rcode=\"{}\"><title>{} #{} answer {}{} {} at +{}</title>\
                 <line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{c}\" stroke-width=\"3\"/>",
                esc(&a.rcode),
                esc(&q.qtype),
                q.attempt,
                esc(&a.rcode),
                if a.truncated { " TC" } else { "" },
                esc(&a.answers.join(" ")),
                dur(a.ts_ns.saturating_sub(l.start_ns)),
                xa,
            );
            diamond(&mut out, xa, y, c);
            out.push_str("</g>");
            end = end.max(xa);
        }

        // The send mark (over the bars).
        let _ = write!(
            out,
            "<circle class=\"send\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{SEND}\" stroke=\"#fff\" stroke-width=\"1.5\">\
             <title>{} #{} sent id {:#06x} {} → {} {} at +{}{}</title></circle>",
            esc(&q.qtype),
            q.attempt,
            q.id,
            q.src,
            q.server,
            esc(&q.qname),
            dur(q.ts_ns.saturating_sub(l.start_ns)),
            if q.batch { " (sendmmsg)" } else { "" },
        );

        // Drop or clash, in its verdict's colour.
        if let (Some(f), Some(xf)) = (&q.fate, xf) {
            let class = if f.lost { "drop" } else { "clash" };
            let _ = write!(
                out,
                "<g class=\"{class}\" data-verdict=\"{}\" data-lost=\"{}\"><title>{} #{} {}{} in netns {}: {}</title>",
                f.verdict.name(),
                f.lost,
                esc(&q.qtype),
                q.attempt,
                if f.lost { "DROPPED " } else { "" },
                f.verdict.name(),
                f.netns,
                esc(&f.explanation),
            );
            verdict_mark(&mut out, xf, y, f.verdict, f.lost);
            out.push_str("</g>");
            end = end.max(xf);
            let name = f.verdict.name();
            segs.push(match (f.lost, f.reply) {
                (true, false) => (format!("DROPPED {name}"), verdict_colour(f.verdict), true),
                (true, true) => (
                    format!("answer DROPPED {name}"),
                    verdict_colour(f.verdict),
                    true,
                ),
                (false, _) => (
                    format!("{name} (nothing lost)"),
                    verdict_colour(f.verdict),
                    true,
                ),
            });
        }

        match &q.answer {
            Some(a) => {
                let mut t = a.rcode.clone();
                if a.truncated {
                    t.push_str(" TC");
                }
                if !a.answers.is_empty() {
                    let shown: Vec<&str> = a.answers.iter().take(2).map(String::as_str).collect();
                    let more = if a.answers.len() > 2 {
                        format!(" +{}", a.answers.len() - 2)
                    } else {
                        String::new()
                    };
                    let _ = write!(t, " {}{more}", shown.join(" "));
                }
                let _ = write!(t, " in {}", dur(a.ts_ns.saturating_sub(q.ts_ns)));
                segs.push((t, answer_colour(&a.rcode), false));
            }
            None if q.unanswered => {
                let until = silent_until(l, q);
                segs.push((
                    format!("no answer, {} of silence", dur(until - q.ts_ns)),
                    LOST_TEXT,
                    false,
                ));
            }
            None => segs.push(("no answer seen".into(), SILENCE, false)),
        }
        let mut joined: Vec<Seg> = Vec::new();
        for (k, sg) in segs.into_iter().enumerate() {
            if k > 0 {
                joined.push((" · ".into(), "#57606a", false));
            }
            joined.push(sg);
        }
        place_label(&mut out, x, end, y, &joined);
        out.push_str("</g>");
    }
    if l.queries.len() > rows.len() {
        let _ = write!(
            out,
            "<text x=\"8\" y=\"{:.1}\" fill=\"#57606a\" font-style=\"italic\">+{} more queries: see the text timeline</text>",
            axis_y + 34.0,
            l.queries.len() - rows.len()
        );
    }
    out.push_str("</svg>\n");
    out
}

fn small(inner: &str) -> String {
    format!(
        "<svg class=\"mark\" width=\"44\" height=\"18\" viewBox=\"0 0 44 18\" aria-hidden=\"true\">{inner}</svg>"
    )
}

/// The marks of the timelines, for the legend: (key, svg, text).
pub(super) fn legend_marks() -> Vec<(&'static str, String, &'static str)> {
    let mut answer = String::new();
    let _ = write!(
        answer,
        "<line x1=\"6\" y1=\"9\" x2=\"34\" y2=\"9\" stroke=\"{ANSWER}\" stroke-width=\"3\"/>\
         <circle cx=\"6\" cy=\"9\" r=\"5\" fill=\"{SEND}\"/>"
    );
    diamond(&mut answer, 34.0, 9.0, ANSWER);
    vec![
        (
            "send",
            small(&format!("<circle cx=\"22\" cy=\"9\" r=\"5\" fill=\"{SEND}\"/>")),
            "query sent (row: type and attempt)",
        ),
        ("answer", small(&answer), "round trip and answer"),
        (
            "silence",
            small(&format!(
                "<line x1=\"4\" y1=\"9\" x2=\"38\" y2=\"9\" stroke=\"{SILENCE}\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>\
                 <line x1=\"38\" y1=\"3\" x2=\"38\" y2=\"15\" stroke=\"{SILENCE}\" stroke-width=\"2\"/>"
            )),
            "no answer: silence until the retry or the end",
        ),
        (
            "retry",
            small(&format!(
                "<path d=\"M22 1L22 11\" stroke=\"{RETRY}\" stroke-width=\"1.5\" stroke-dasharray=\"4 2\"/>\
                 <path d=\"M18 11L22 17L26 11Z\" fill=\"{RETRY}\"/>"
            )),
            "retry of the attempt above",
        ),
        (
            "wait",
            small(&format!(
                "<line x1=\"4\" y1=\"9\" x2=\"40\" y2=\"9\" stroke=\"{WAIT_SLOW}\" stroke-width=\"4\"/>\
                 <line x1=\"4\" y1=\"2\" x2=\"4\" y2=\"16\" stroke=\"{WAIT_SLOW}\" stroke-width=\"2\"/>\
                 <line x1=\"40\" y1=\"2\" x2=\"40\" y2=\"16\" stroke=\"{WAIT_SLOW}\" stroke-width=\"2\"/>"
            )),
            "what the application waited (red: 1 s or more, or failed)",
        ),
    ]
}

/// The mark of a verdict, for the legend: a cross when it loses the packet, a ring when not.
pub(super) fn legend_verdict(v: Verdict) -> String {
    let mut m = String::new();
    verdict_mark(&mut m, 22.0, 9.0, v, v.lost_packet());
    small(&m)
}
