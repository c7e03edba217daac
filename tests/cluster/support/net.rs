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

/// The bridge: `<prefix>.0.1/16` on the host side; pods get `<prefix>.1.n`.
pub struct Bridge {
    name: String,
    prefix: [u8; 2],
    next: Mutex<u8>,
}

impl Bridge {
    /// Creates the bridge on the first 10.x.0.0/16 (x in 244..=254) no interface uses yet.
    pub fn create() -> anyhow::Result<Self> {
        let used = run("ip", &["-4", "-o", "addr", "show"])?;
        let Some(x) = (244u8..=254).find(|x| !used.contains(&format!(" 10.{x}."))) else {
            bail!("no free 10.x.0.0/16 subnet for the pod network");
        };
        let name = format!("spwbr{}", std::process::id() % 100_000);
        let _ = run("ip", &["link", "del", &name]);
        run("ip", &["link", "add", &name, "type", "bridge"])?;
        let bridge = Self {
            name,
            prefix: [10, x],
            next: Mutex::new(1),
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
