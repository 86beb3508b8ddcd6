//! Processes the suite starts: the real `idem` binary, and private Redis and PostgreSQL
//! servers on spare ports. Every one is killed when its handle is dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `idem` binary: `$IDEM_BIN`, else built (or found up to date) by cargo in the
/// profile of the running code, so that the suite always tests the current sources.
pub fn idem_binary() -> Result<PathBuf, String> {
    if let Ok(bin) = std::env::var("IDEM_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "idem-proxy", "--bin", "idem"])
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo to build idem: {e}"))?;
    if !out.status.success() {
        return Err("cargo build -p idem-proxy --bin idem failed".into());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "idem")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built no idem executable".to_owned())
}

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

/// How to start one `idem` instance (again and again, on the same port).
#[derive(Clone, Debug)]
pub struct IdemSpec {
    /// The binary.
    pub bin: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Working directory.
    pub dir: PathBuf,
    /// Extra environment (e.g. `IDEM_TENANT_SECRET`).
    pub env: Vec<(String, String)>,
}

/// A running `idem serve`.
pub struct Idem {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for Idem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Idem {
    /// Starts `idem serve` on `listen` and waits until it logs that it is ready.
    /// A port still held by the previous (killed) process is retried for a while.
    pub fn start(spec: &IdemSpec, listen: &str) -> Result<Idem, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Self::try_start(spec, listen) {
                Ok(idem) => return Ok(idem),
                Err(e) if Instant::now() < deadline && e.contains("cannot bind") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(spec: &IdemSpec, listen: &str) -> Result<Idem, String> {
        let mut child = Command::new(&spec.bin)
            .arg("serve")
            .arg("--config")
            .arg(&spec.config)
            .args(["--listen", listen, "--log-format", "json"])
            .current_dir(&spec.dir)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("IDEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.bin.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let keep = log.clone();
        // Drains stderr for the life of the process; keeps the last lines for reports.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("idem ready")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                let mut log = keep.lock().unwrap();
                if log.len() >= 200 {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log: Vec<String> = log.lock().unwrap().iter().cloned().collect();
                return Err(format!("idem did not start: {}", log.join("\n")));
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&ready).map_err(|e| format!("ready line: {e}"))?;
        let addr = v["fields"]["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no listen address in {ready}"))?;
        Ok(Idem { child, addr, log })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a clean shutdown).
    pub fn terminate(&self) -> bool {
        signal(self.pid(), "TERM")
    }

    /// Waits for the process to exit; its exit code, `None` if it did not exit in time
    /// (or died of a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines it logged.
    pub fn last_log(&self, n: usize) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().rev().take(n).rev().cloned().collect()
    }
}

/// A store server of the suite's own that can be crashed and restarted.
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
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one; `None` when `redis-server` is not installed.
    pub fn start_new(durable: bool) -> Option<Result<Self, String>> {
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
            child: None,
        };
        Some(r.start().map(|()| r))
    }

    fn answers(&self) -> bool {
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
        format!("redis://127.0.0.1:{}", self.port)
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

/// A PostgreSQL cluster of the suite's own (`initdb` into a temporary folder) on a
/// spare port, run as the `postgres` user when the suite runs as root.
pub struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Creates and starts one; `None` when `initdb`/`pg_ctl` are not installed.
    pub fn start_new() -> Option<Result<Self, String>> {
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
            };
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
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
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

/// Whether something listens on a loopback address.
pub fn reachable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}
