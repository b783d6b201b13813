//! Privileged tests of `tracer::pods` on the running kernel's cgroup2 mount: processes
//! started in kubelet-like cgroups (`tracer::lab::kubepods`), some inside their own network
//! namespace, are named by `PodIndex` from their cgroup's inode, their network namespace and
//! their pid, and the trees are gone afterwards. They need root; they fail, never skip.

mod common;

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tracer::{
    lab::kubepods::{self, LabPod, LabPodCgroups, Layout, PodSpec},
    netns::{self, Netns, NetnsChild},
    pods::{parse_cgroup_path, NodePaths, PodIndex, QosClass, Runtime, WorkloadKind},
    preflight,
};

fn require_root() {
    assert!(
        netns::is_root(),
        "the pod mapping tests make cgroups under the cgroup2 mount and network namespaces: \
         run them as root"
    );
}

/// The `0::` path of a `/proc/PID/cgroup` text.
fn v2_path(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in {text:?}"))
        .to_string()
}

/// Runs `sh -c 'cat /proc/self/cgroup'` in the pod's container cgroup.
fn cgroup_seen_from(pod: &LabPod) -> String {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "cat /proc/self/cgroup"]);
    pod.enter(&mut cmd);
    let out = netns::run_command(&mut cmd, None, netns::DEFAULT_TIMEOUT)
        .unwrap_or_else(|e| panic!("running a shell in {}: {e:#}", pod.cgroup));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_removed(top: &Path) {
    assert!(!top.exists(), "{} left behind", top.display());
    assert!(
        !kubepods::leftovers().iter().any(|p| p == top),
        "{} listed as a leftover",
        top.display()
    );
}

/// Waits until `pid` is in the network namespace with inode `inode` (`ip netns exec` joins
/// it after it was spawned).
fn wait_in_netns(pid: u32, inode: u64) {
    let deadline = Instant::now() + common::bound(5);
    let want = format!("net:[{inode}]");
    loop {
        let link = fs::read_link(format!("/proc/{pid}/ns/net"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        if link == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} not in {want} after {:?} ({link})",
            common::bound(5)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn processes_in_kubelet_cgroups_are_named_by_cgroup_id() {
    require_root();
    let lab = LabPodCgroups::create(&[
        PodSpec::new("default", "web-7d9f", Layout::Systemd),
        PodSpec::new("kube-system", "coredns-5d78c", Layout::Cgroupfs).qos(QosClass::Burstable),
        PodSpec::new("shop", "cart-0", Layout::Systemd)
            .qos(QosClass::Guaranteed)
            .runtime(Runtime::CriO),
        PodSpec::new("legacy", "api-1", Layout::Cgroupfs)
            .qos(QosClass::Guaranteed)
            .runtime(Runtime::CriO),
    ])
    .expect("creating the lab's pod cgroups");
    let mut index = PodIndex::new(lab.node_paths());
    for pod in lab.pods() {
        let seen = v2_path(&cgroup_seen_from(pod));
        assert_eq!(seen, pod.cgroup, "{}", pod.label());
        let c = parse_cgroup_path(&seen).unwrap_or_else(|| panic!("{seen} not a pod path"));
        assert_eq!(c.pod_uid, pod.uid);
        assert_eq!(c.container_id.as_deref(), Some(pod.container_id.as_str()));
        assert_eq!(c.qos, pod.qos);

        let id = pod.cgroup_id().expect("stat of the container cgroup");
        let w = index.resolve(id, 0, None);
        assert_eq!(w.kind, WorkloadKind::Pod, "{w:?}");
        assert_eq!(w.label(), pod.label(), "{w:?}");
        assert_eq!(w.uid.as_deref(), Some(pod.uid.as_str()));
        assert_eq!(w.container_id.as_deref(), Some(pod.container_id.as_str()));
        assert_eq!(w.cgroup.as_deref(), Some(pod.cgroup.as_str()));
        let runtime_in_name = pod.layout == Layout::Systemd || pod.runtime == Runtime::CriO;
        if runtime_in_name {
            assert_eq!(w.runtime.as_deref(), Some(pod.runtime.name()), "{w:?}");
        }
        // The processes ran and left.
        assert!(pod.pids().is_empty(), "{:?}", pod.pids());
    }
    let top = lab.top().to_path_buf();
    let root = lab.node_root().to_path_buf();
    drop(lab);
    assert_removed(&top);
    assert!(!root.exists());
}

#[test]
fn a_pod_process_is_named_by_netns_and_pid_and_moved_out_on_drop() {
    require_root();
    let lab = LabPodCgroups::create(&[PodSpec::new("default", "client-0", Layout::Systemd)])
        .expect("creating the lab's pod cgroups");
    let pod = &lab.pods()[0];
    let ns = Netns::create("ctpod").expect("creating a netns");
    let mut cmd = ns.command("sleep");
    cmd.arg("30");
    pod.enter(&mut cmd);
    let mut child = NetnsChild::spawn(&mut cmd).expect("starting sleep in the pod");
    let pid = child.pid();
    wait_in_netns(pid, ns.inode());
    assert_eq!(pod.pids(), vec![pid]);

    let mut index = PodIndex::new(lab.node_paths());
    let netns = u32::try_from(ns.inode()).expect("netns inode fits in u32");
    // The network namespace alone (no cgroup id, no pid).
    let w = index.resolve(0, netns, None);
    assert_eq!(w.label(), "default/client-0", "{w:?}");
    assert_eq!(w.container_id.as_deref(), Some(pod.container_id.as_str()));
    // The pid alone.
    let w = index.resolve(0, 0, Some(pid));
    assert_eq!(w.label(), "default/client-0", "{w:?}");
    // All three.
    let w = index.resolve(pod.cgroup_id().unwrap(), netns, Some(pid));
    assert_eq!(w.label(), "default/client-0", "{w:?}");
    assert_eq!(w.runtime.as_deref(), Some("containerd"));

    // This test process is a host process.
    let cgroup2 = preflight::cgroup_root(None).unwrap();
    assert_eq!(
        NodePaths::for_root(Path::new("/")).unwrap().cgroup2,
        cgroup2
    );
    let own = v2_path(&fs::read_to_string("/proc/self/cgroup").unwrap());
    let own_dir: PathBuf = cgroup2.join(own.trim_start_matches('/'));
    let own_id = fs::metadata(&own_dir).unwrap().ino();
    let w = index.resolve(own_id, 0, Some(std::process::id()));
    assert_eq!(w.kind, WorkloadKind::Host, "{w:?}");
    let comm = fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(w.process.as_deref(), Some(comm.trim()));

    // Dropped while sleep is still in the pod: it is moved out and the tree removed.
    let top = lab.top().to_path_buf();
    drop(lab);
    assert_removed(&top);
    assert!(
        child.try_wait().unwrap().is_none(),
        "sleep should still run"
    );
    let now = v2_path(&fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap());
    assert_eq!(now, own, "sleep moved to the test's own cgroup");
    child.stop();
    drop(ns);
}
