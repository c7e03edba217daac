//! Pod networks: a bridge in the host namespace and one network namespace per pod on it, so
//! pods have addresses the API server accepts in EndpointSlices (it refuses loopback) and each
//! pod may listen on its own port 8000 as in a cluster. Everything is removed on drop.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use anyhow::bail;

use super::run;

/// Whether this machine lets the test make network namespaces (root and iproute2).
pub fn available() -> Result<(), String> {
    let probe = format!("spwprobe{}", std::process::id());
    run("ip", &["netns", "add", &probe])
        .map_err(|e| format!("cannot create a network namespace: {e:#}"))?;
    let _ = run("ip", &["netns", "del", &probe]);
    Ok(())
}

/// Removes the bridges and pod namespaces of earlier runs whose process is gone (a run killed
/// before it could clean up); names carry the run's pid: `spw<pid>`, `spw<pid>p<n>`.
pub fn remove_leftovers() {
    let dead = |name: &str| {
        let pid: String = name
            .strip_prefix("spw")
            .unwrap_or_default()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    };
    for ns in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if dead(name) {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
    for line in run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
    {
        // "12: spw123: <BROADCAST,...>" or "13: spw123p1h@if2: ..."
        let name = line.split(": ").nth(1).unwrap_or_default();
        let name = name.split('@').next().unwrap_or_default();
        if dead(name) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
}

/// The bridge: `<prefix>.0.1/16` on the host side; pods get `<prefix>.1.n`, and pods in the
/// host namespace (routers) `<prefix>.2.n` on the bridge itself.
pub struct Bridge {
    name: String,
    prefix: [u8; 2],
    next: Mutex<u8>,
    next_host: Mutex<u8>,
}

impl Bridge {
    /// Creates the bridge on the first 10.x.0.0/16 (x in 244..=254) no interface uses yet.
    pub fn create() -> anyhow::Result<Self> {
        let used = run("ip", &["-4", "-o", "addr", "show"])?;
        let Some(x) = (244u8..=254).find(|x| !used.contains(&format!(" 10.{x}."))) else {
            bail!("no free 10.x.0.0/16 subnet for the pod network");
        };
        let name = format!("spw{}", std::process::id());
        let _ = run("ip", &["link", "del", &name]);
        run("ip", &["link", "add", &name, "type", "bridge"])?;
        let bridge = Self {
            name,
            prefix: [10, x],
            next: Mutex::new(1),
            next_host: Mutex::new(1),
        };
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/16", bridge.gateway()),
                "dev",
                &bridge.name,
            ],
        )?;
        run("ip", &["link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], 0, 1)
    }

    /// A new pod network namespace with the next free address.
    pub fn pod_net(&self) -> anyhow::Result<PodNet> {
        let n = {
            let mut next = self.next.lock().expect("not poisoned");
            let n = *next;
            if n == 255 {
                bail!("pod network full");
            }
            *next += 1;
            n
        };
        let id = format!("{}p{n}", self.name);
        let ip = Ipv4Addr::new(self.prefix[0], self.prefix[1], 1, n);
        let net = PodNet { ns: id.clone(), ip };
        let host_if = format!("{id}h");
        run("ip", &["netns", "add", &net.ns])?;
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &net.ns,
            ],
        )?;
        run("ip", &["link", "set", &host_if, "master", &self.name, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", net.ns.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(net)
    }
}

impl Bridge {
    /// A new address in the host namespace, on the bridge, for a pod that must also reach the
    /// API server on 127.0.0.1: EndpointSlices list it, where they refuse loopback.
    pub fn host_addr(&self) -> anyhow::Result<HostAddr> {
        let n = {
            let mut next = self.next_host.lock().expect("not poisoned");
            let n = *next;
            if n == 255 {
                bail!("host addresses used up");
            }
            *next += 1;
            n
        };
        let ip = Ipv4Addr::new(self.prefix[0], self.prefix[1], 2, n);
        run(
            "ip",
            &["addr", "add", &format!("{ip}/32"), "dev", &self.name],
        )?;
        Ok(HostAddr {
            ip,
            dev: self.name.clone(),
        })
    }
}

/// An address on the bridge in the host namespace, removed on drop.
pub struct HostAddr {
    pub ip: Ipv4Addr,
    dev: String,
}

impl Drop for HostAddr {
    fn drop(&mut self) {
        let _ = run(
            "ip",
            &["addr", "del", &format!("{}/32", self.ip), "dev", &self.dev],
        );
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.name]);
    }
}

/// One pod's network namespace; deleting it removes its veth pair too.
pub struct PodNet {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}
