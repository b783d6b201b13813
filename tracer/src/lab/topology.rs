//! A small cluster in network namespaces: pods and backends (or a server) joined to a node
//! that routes and NATs between them, the way kube-proxy does. Everything it makes is
//! removed when it is dropped (namespaces, the processes in them, per-netns resolv.conf).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::netns::{self, Dnsmasq, Netns};

/// The service VIP pods query, DNATed by the node to the DNS backends.
pub const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The name every DNS backend answers.
pub const LAB_NAME: &str = "svc.lab.example";
pub const LAB_A: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
pub const LAB_AAAA: &str = "fd96::1";

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 2)
}
pub fn backend_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 245, j as u8, 2)
}
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 246, 0, 2);
pub const SERVER_PORT: u16 = 8080;
/// The node's interface toward the server (MASQUERADE's `oif`).
pub const NODE_SERVER_IF: &str = "srv";

/// How the node's NAT rules are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Rules {
    /// Native nftables (`numgen random`, `masquerade`).
    Nft,
    /// iptables (`-m statistic --mode random`, `-j MASQUERADE`), as kube-proxy writes them.
    Iptables,
}

/// `/etc/netns/NAME/resolv.conf`: what `ip netns exec` shows a pod's processes.
struct ResolvConf(PathBuf);

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub struct Cluster {
    // Field order is drop order: processes before the namespaces they run in.
    _dns: Vec<Dnsmasq>,
    _resolv: Vec<ResolvConf>,
    pub pods: Vec<Netns>,
    pub backends: Vec<Netns>,
    pub server: Option<Netns>,
    pub node: Netns,
}

/// Prefix of every namespace the lab makes (for leftover checks).
pub const PREFIX: &str = "ctlab";

impl Cluster {
    /// A node with `pods` pod namespaces, `backends` DNS backends (dnsmasq) and, if
    /// `server`, one server namespace behind the node.
    pub fn build(pods: usize, backends: usize, server: bool) -> anyhow::Result<Cluster> {
        anyhow::ensure!(pods <= 64 && backends <= 16, "lab too large");
        let node = Netns::create(PREFIX)?;
        node.sysctl_set("net.ipv4.ip_forward", "1")?;
        let mut c = Cluster {
            _dns: Vec::new(),
            _resolv: Vec::new(),
            pods: Vec::new(),
            backends: Vec::new(),
            server: None,
            node,
        };
        for i in 0..pods {
            let pod = Netns::create(PREFIX)?;
            netns::veth_pair_named(
                &pod,
                "eth0",
                &[&format!("{}/24", pod_ip(i))],
                &c.node,
                &format!("pod{i}"),
                &[&format!("10.244.{i}.1/24")],
            )?;
            pod.route_add(&format!("default via 10.244.{i}.1"))?;
            let dir = Path::new("/etc/netns").join(pod.name());
            fs::create_dir_all(&dir)?;
            c._resolv.push(ResolvConf(dir.clone()));
            fs::write(
                dir.join("resolv.conf"),
                format!("nameserver {DNS_VIP}\noptions timeout:2 attempts:2\n"),
            )?;
            c.pods.push(pod);
        }
        for j in 0..backends {
            let be = Netns::create(PREFIX)?;
            netns::veth_pair_named(
                &be,
                "eth0",
                &[&format!("{}/24", backend_ip(j))],
                &c.node,
                &format!("be{j}"),
                &[&format!("10.245.{j}.1/24")],
            )?;
            be.route_add(&format!("default via 10.245.{j}.1"))?;
            let dns = Dnsmasq::start(
                &be,
                &[IpAddr::V4(backend_ip(j))],
                53,
                &[(LAB_NAME, IpAddr::V4(LAB_A)), (LAB_NAME, LAB_AAAA.parse()?)],
            )
            .with_context(|| format!("DNS backend {j}"))?;
            c._dns.push(dns);
            c.backends.push(be);
        }
        if server {
            let srv = Netns::create(PREFIX)?;
            // No route back to the pods: replies reach them only through the node's NAT.
            netns::veth_pair_named(
                &srv,
                "eth0",
                &[&format!("{SERVER_IP}/24")],
                &c.node,
                NODE_SERVER_IF,
                &["10.246.0.1/24"],
            )?;
            c.server = Some(srv);
        }
        Ok(c)
    }

    pub fn server_addr() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(SERVER_IP), SERVER_PORT)
    }

    /// kube-proxy's service rule: the DNS VIP DNATed at random to the backends.
    pub fn dns_service(&self, rules: Rules) -> anyhow::Result<()> {
        let n = self.backends.len();
        anyhow::ensure!(n > 0, "no DNS backends");
        match rules {
            Rules::Nft => {
                let map: Vec<String> = (0..n).map(|j| format!("{j} : {}", backend_ip(j))).collect();
                self.node.nft(&format!(
                    "table ip lab {{\n  chain pre {{\n    type nat hook prerouting priority -100; policy accept;\n    \
                     ip daddr {DNS_VIP} udp dport 53 dnat to numgen random mod {n} map {{ {} }}\n  }}\n}}\n",
                    map.join(", ")
                ))
            }
            Rules::Iptables => {
                for j in 0..n {
                    let mut args: Vec<String> = [
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-d",
                        &DNS_VIP.to_string(),
                        "-p",
                        "udp",
                        "--dport",
                        "53",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    if j + 1 < n {
                        // kube-proxy's cascade: 1/n, then 1/(n-1), ... so every backend is equally likely.
                        let p = 1.0 / (n - j) as f64;
                        args.extend(
                            ["-m", "statistic", "--mode", "random", "--probability"]
                                .map(String::from),
                        );
                        args.push(format!("{p:.5}"));
                    }
                    args.extend(["-j", "DNAT", "--to-destination"].map(String::from));
                    args.push(format!("{}:53", backend_ip(j)));
                    self.node.run(&args)?;
                }
                Ok(())
            }
        }
    }

    /// MASQUERADE of pod traffic leaving toward the server; `fully_random` is
    /// `--random-fully` / `fully-random`.
    pub fn masquerade(&self, rules: Rules, fully_random: bool) -> anyhow::Result<()> {
        match rules {
            Rules::Nft => self.node.nft(&format!(
                "table ip lab {{\n  chain post {{\n    type nat hook postrouting priority 100; policy accept;\n    \
                 oifname \"{NODE_SERVER_IF}\" masquerade{}\n  }}\n}}\n",
                if fully_random { " fully-random" } else { "" }
            )),
            Rules::Iptables => {
                let mut args = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", NODE_SERVER_IF, "-j", "MASQUERADE"];
                if fully_random {
                    args.push("--random-fully");
                }
                self.node.run(&args).map(drop)
            }
        }
    }

    /// Makes conntrack track every flow through the node (it engages only once a rule
    /// needs it).
    pub fn track_everything(&self) -> anyhow::Result<()> {
        self.node.nft(
            "table inet labtrack {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             ct state new counter accept\n  }\n}\n",
        )
    }

    /// Every namespace, with its role, for reports.
    pub fn namespaces(&self) -> Vec<(String, &Netns)> {
        let mut v = vec![("node".to_string(), &self.node)];
        v.extend(
            self.pods
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("pod{i}"), n)),
        );
        v.extend(
            self.backends
                .iter()
                .enumerate()
                .map(|(j, n)| (format!("backend{j}"), n)),
        );
        if let Some(s) = &self.server {
            v.push(("server".to_string(), s));
        }
        v
    }
}
