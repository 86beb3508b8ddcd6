//! Processes the suite starts: the real `idem` binary, and private Redis and PostgreSQL
//! servers on spare ports. Every one is killed when its handle is dropped.

pub use idem_conformance::servers::{
    PrivatePostgres, PrivateRedis, PrivateStore, free_port, signal,
};

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
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

/// How to start one `idem` instance (again and again, on the same port).
#[derive(Clone, Debug)]
pub struct IdemSpec {
    /// The `idem` executable (see [`idem_binary`]).
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

/// Whether something listens on a loopback address.
pub fn reachable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}
