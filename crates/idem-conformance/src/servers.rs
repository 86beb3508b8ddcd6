//! Store servers of a test's own, on spare ports, that can be crashed and restarted:
//! `redis-server` and a PostgreSQL cluster (`initdb`). The store crates' restart tests
//! and the chaos suite both use them. Every one is stopped when its handle is dropped.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends a signal with kill(1): the workspace forbids unsafe code, tests included.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A server's TLS files: its certificate and key, and the CA that client certificates
/// must chain to (Redis needs one even when clients send none).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM).
    pub ca: PathBuf,
    /// Whether clients must show a certificate.
    pub require_client_cert: bool,
}

/// A store server of a test's own that can be crashed and restarted.
pub trait PrivateStore: Send {
    /// The URL `idem --store` takes.
    fn url(&self) -> String;
    /// Crashes it (SIGKILL, or PostgreSQL's immediate stop).
    fn crash(&mut self) -> Result<(), String>;
    /// Starts it again on the same port with the same data; waits until it answers.
    fn start(&mut self) -> Result<(), String>;
    /// Stops it answering without closing connections (SIGSTOP), if supported.
    fn pause(&mut self) -> bool {
        false
    }
    /// Resumes after [`PrivateStore::pause`].
    fn resume(&mut self) {}
}

/// A `redis-server` on a spare port. With `durable`, an append-only file synced on
/// every write (`appendfsync always`), so that what was acknowledged survives a crash;
/// without it, no persistence at all, like the shared test server.
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    durable: bool,
    extra: Vec<String>,
    tls: Option<ServerTls>,
    cluster: bool,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one; `None` when `redis-server` is not installed.
    pub fn start_new(durable: bool) -> Option<Result<Self, String>> {
        Self::start_full(durable, &[], None, false)
    }

    /// Starts one with extra `redis-server` arguments (such as
    /// `["--maxmemory-policy", "allkeys-lru"]`), kept across restarts.
    pub fn start_with(durable: bool, extra: &[&str]) -> Option<Result<Self, String>> {
        Self::start_full(durable, extra, None, false)
    }

    /// Starts one serving TLS only (`--port 0 --tls-port N`); its URL is `rediss://`.
    /// `cluster`: a Redis Cluster node (`--cluster-enabled yes --tls-cluster yes`).
    pub fn start_tls(tls: ServerTls, cluster: bool) -> Option<Result<Self, String>> {
        Self::start_full(false, &[], Some(tls), cluster)
    }

    fn start_full(
        durable: bool,
        extra: &[&str],
        tls: Option<ServerTls>,
        cluster: bool,
    ) -> Option<Result<Self, String>> {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .ok()?;
        let mut r = PrivateRedis {
            port: free_port(),
            dir: match tempfile::tempdir() {
                Ok(d) => d,
                Err(e) => return Some(Err(e.to_string())),
            },
            durable,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            tls,
            cluster,
            child: None,
        };
        Some(r.start().map(|()| r))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn answers(&self) -> bool {
        if self.tls.is_some() {
            // Listening is enough: a server without persistence serves once it listens.
            return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl PrivateStore for PrivateRedis {
    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn crash(&mut self) -> Result<(), String> {
        if let Some(mut c) = self.child.take() {
            // A paused server must not stay stopped as a zombie-to-be.
            signal(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path());
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra);
        if let Some(tls) = &self.tls {
            let auth = if tls.require_client_cert { "yes" } else { "no" };
            cmd.args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                auth,
            ])
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca);
        }
        if self.cluster {
            // The bus port defaults to port + 10000, past 65535 for a high spare port.
            let bus = free_port().to_string();
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-port", &bus])
                .arg("--cluster-config-file")
                .arg(self.dir.path().join("nodes.conf"));
            if self.tls.is_some() {
                cmd.args(["--tls-cluster", "yes"]);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            if Instant::now() > deadline {
                return Err("private redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn pause(&mut self) -> bool {
        self.child.as_ref().is_some_and(|c| signal(c.id(), "STOP"))
    }

    fn resume(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "CONT");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

/// A Redis Cluster of three TLS-only masters of a test's own (`--tls-cluster yes`).
pub struct PrivateRedisCluster {
    nodes: Vec<PrivateRedis>,
    tls: ServerTls,
    client: Option<(PathBuf, PathBuf)>,
}

impl PrivateRedisCluster {
    /// Starts the nodes and creates the cluster with `redis-cli --tls --cluster create`;
    /// `client` is the certificate and key redis-cli shows when the nodes require one.
    /// `None` when `redis-server` is not installed.
    pub fn start_tls(
        tls: ServerTls,
        client: Option<(PathBuf, PathBuf)>,
    ) -> Option<Result<Self, String>> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            match PrivateRedis::start_tls(tls.clone(), true)? {
                Ok(n) => nodes.push(n),
                Err(e) => return Some(Err(e)),
            }
        }
        let cluster = PrivateRedisCluster { nodes, tls, client };
        Some(cluster.create().map(|()| cluster))
    }

    /// The nodes, as `127.0.0.1:PORT`.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    fn cli(&self, port: u16) -> Command {
        let mut c = Command::new("redis-cli");
        c.args(["--tls", "-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("--cacert")
            .arg(&self.tls.ca);
        if let Some((cert, key)) = &self.client {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c
    }

    fn create(&self) -> Result<(), String> {
        let ok = self
            .cli(self.nodes[0].port)
            .args(["--cluster", "create"])
            .args(self.nodes())
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("redis-cli --tls --cluster create failed".into());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                let info = self.cli(node.port).args(["cluster", "info"]).output();
                if info.is_ok_and(|o| o.stdout.starts_with(b"cluster_state:ok")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the private TLS cluster did not reach cluster_state:ok".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// A PostgreSQL cluster of a test's own (`initdb` into a temporary folder) on a
/// spare port, run as the `postgres` user when the suite runs as root.
pub struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    as_postgres: bool,
    tls: bool,
}

impl PrivatePostgres {
    /// Creates and starts one; `None` when `initdb`/`pg_ctl` are not installed.
    pub fn start_new() -> Option<Result<Self, String>> {
        Self::start_with(None)
    }

    /// Creates and starts one with `ssl = on`, serving these files (copied into its
    /// folder, for the server's user). `require_client_cert` is not enforced by the
    /// server; `ssl_ca_file` makes it ask for (and check) a client certificate.
    pub fn start_tls(tls: &ServerTls) -> Option<Result<Self, String>> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> Option<Result<Self, String>> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max_by_key(|b| {
                b.parent()
                    .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                    .unwrap_or(0)
            })?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        Some((|| {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            if as_postgres {
                // initdb refuses root; the folder must belong to the server's user.
                let ok = Command::new("chown")
                    .args(["postgres:", &dir.path().display().to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return Err("cannot chown the data folder to postgres".into());
                }
            }
            let mut pg = PrivatePostgres {
                bin,
                port: free_port(),
                dir,
                as_postgres,
                tls: tls.is_some(),
            };
            if let Some(tls) = tls {
                pg.install_tls(tls)?;
            }
            let ok = pg
                .run("initdb")
                .args([
                    "-D",
                    &pg.data(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("initdb failed".into());
            }
            pg.start()?;
            Ok(pg)
        })())
    }

    /// Copies the TLS files where the server's user may read them, the key 0600.
    fn install_tls(&self, tls: &ServerTls) -> Result<(), String> {
        for (from, to) in [
            (&tls.cert, "server.crt"),
            (&tls.key, "server.key"),
            (&tls.ca, "ca.crt"),
        ] {
            let to = self.dir.path().join(to);
            std::fs::copy(from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
            let mut chmod = Command::new("chmod");
            chmod.arg("600").arg(&to);
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(&to);
            let mut steps = vec![chmod];
            if self.as_postgres {
                steps.push(chown);
            }
            for mut step in steps {
                if !step.status().is_ok_and(|s| s.success()) {
                    return Err(format!("cannot prepare {}", to.display()));
                }
            }
        }
        Ok(())
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let ok = self
            .run("pg_ctl")
            .args(["-D", &self.data(), "-l", &log.display().to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err(format!("pg_ctl {args:?} failed; see {}", log.display()))
        }
    }
}

impl PrivateStore for PrivatePostgres {
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn crash(&mut self) -> Result<(), String> {
        // Immediate: every server process quits at once, as in a crash; committed
        // transactions are recovered from the WAL at the next start.
        self.pg_ctl(&["-m", "immediate", "-w", "stop"])
    }

    fn start(&mut self) -> Result<(), String> {
        let dir = self.dir.path().display();
        let mut opts = format!("-p {} -k {dir} -c listen_addresses=127.0.0.1", self.port);
        if self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key \
                 -c ssl_ca_file={dir}/ca.crt"
            ));
        }
        self.pg_ctl(&["-o", &opts, "-w", "-t", "60", "start"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .run("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
