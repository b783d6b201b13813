//! What a privileged test must leave behind: nothing. Programs, maps and links of our eBPF
//! object (every one the loader knows, whichever the plan attached), lab namespaces and
//! their `/etc/netns` entries, pod cgroup trees, lab processes and temp dirs.
//!
//! Programs, maps and links are counted against a [`Baseline`] taken before the run: a
//! `tracer watch` a test runs beside a lab on purpose is the watcher's, checked when it
//! stops, and never excuses a program the lab left.

use std::{collections::BTreeSet, process::Command, time::Instant};

use serde_json::Value;

use super::{bound, PREFIX};

/// The kernel's BPF objects of ours that existed before a run, by id (ids are never
/// reused while the system runs).
pub struct Baseline {
    progs: BTreeSet<u64>,
    maps: BTreeSet<u64>,
    links: BTreeSet<u64>,
}

/// The names of our programs and maps, from the embedded object itself.
fn ours() -> (Vec<String>, Vec<String>) {
    let (progs, maps) = tracer::session::object_names().expect("the embedded eBPF object");
    // `.rodata`, `.bss`: section names any loader's objects have; not ours to judge.
    let maps = maps.into_iter().filter(|m| !m.starts_with('.')).collect();
    (progs, maps)
}

/// Whether the kernel's `name` (cut to 15 bytes; bpftool may print the full name from
/// BTF) is one of `names`.
fn named(name: &Value, names: &[String]) -> bool {
    let Some(name) = name.as_str() else {
        return false;
    };
    names
        .iter()
        .any(|n| n == name || (name.len() == 15 && n.starts_with(name)))
}

fn bpftool(what: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args([what, "show", "--json"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool {what} show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An empty list prints nothing on some versions.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let list: Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    list.as_array().expect("a JSON list").clone()
}

/// Ours now: (programs, maps, links) as bpftool shows them.
fn current() -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let (prog_names, map_names) = ours();
    let progs: Vec<Value> = bpftool("prog")
        .into_iter()
        .filter(|p| named(&p["name"], &prog_names))
        .collect();
    let ids: BTreeSet<u64> = progs.iter().filter_map(|p| p["id"].as_u64()).collect();
    let maps = bpftool("map")
        .into_iter()
        .filter(|m| named(&m["name"], &map_names))
        .collect();
    let links = bpftool("link")
        .into_iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .collect();
    (progs, maps, links)
}

fn id_set(list: &[Value]) -> BTreeSet<u64> {
    list.iter().filter_map(|v| v["id"].as_u64()).collect()
}

impl Baseline {
    /// Ours loaded now (normally none).
    pub fn take() -> Baseline {
        let (progs, maps, links) = current();
        Baseline {
            progs: id_set(&progs),
            maps: id_set(&maps),
            links: id_set(&links),
        }
    }

    /// Programs, maps and links of ours loaded now that were not there at
    /// [`Baseline::take`], as bpftool shows them.
    pub fn loaded_since(&self) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
        let (progs, maps, links) = current();
        let new = |list: Vec<Value>, before: &BTreeSet<u64>| -> Vec<Value> {
            list.into_iter()
                .filter(|v| v["id"].as_u64().is_some_and(|id| !before.contains(&id)))
                .collect()
        };
        (
            new(progs, &self.progs),
            new(maps, &self.maps),
            new(links, &self.links),
        )
    }

    /// Panics if a program, map or link of ours that was not there at [`Baseline::take`]
    /// is still there once `what` has exited. The kernel releases them asynchronously after
    /// the last file descriptor closes: a bounded moment (3 s, scaled) is allowed.
    pub fn assert_released(&self, what: &str) {
        let deadline = Instant::now() + bound(3);
        loop {
            let (progs, maps, links) = self.loaded_since();
            if progs.is_empty() && maps.is_empty() && links.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} exited {:?} ago and left BPF objects of ours loaded:\n\
                 programs: {progs:#?}\nmaps: {maps:#?}\nlinks: {links:#?}",
                bound(3)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// No lab namespace, `/etc/netns` entry, pod cgroup tree, lab process or temp dir left,
/// and no program, map or link of ours loaded since `before`.
pub fn assert_no_leftovers(before: &Baseline) {
    assert!(
        tracer::netns::leftovers(PREFIX).is_empty(),
        "lab namespaces left: {:?}",
        tracer::netns::leftovers(PREFIX)
    );
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "/etc/netns entries left: {etc:?}");
    let cgroups = tracer::lab::kubepods::leftovers();
    assert!(cgroups.is_empty(), "pod cgroup trees left: {cgroups:?}");
    // No process that ran in or for a lab namespace (dnsmasq, clients), no temp dir.
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&format!("{PREFIX}-")))
        .collect();
    assert!(procs.is_empty(), "lab processes left: {procs:?}");
    let tmp: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .collect();
    assert!(tmp.is_empty(), "lab temp dirs left: {tmp:?}");
    before.assert_released("the lab");
}
