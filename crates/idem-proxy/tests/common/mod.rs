//! The `idem` binary started as a child process; the counting upstream and the
//! request helpers come from idem-test-support, shared with the other crates' tests.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_test_support::post;

/// Writes `idem.toml` in `dir`; returns its path.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("idem.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Writes an `idem.toml` in `dir` that sends to `upstream`, followed by `rest`
/// (more TOML); returns its path.
pub fn upstream_config(dir: &Path, upstream: SocketAddr, rest: &str) -> String {
    write_config(dir, &format!("upstream = \"http://{upstream}\"\n{rest}"))
}

/// A running `idem` child process.
pub struct Idem {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Idem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_idem")
}

/// Starts `idem serve` with the arguments, in `dir`, and waits until it listens.
pub fn start_idem(dir: &Path, args: &[&str]) -> Idem {
    start_idem_with_env(dir, args, &[])
}

/// Starts `idem serve` in front of `upstream` with the memory store.
pub fn start_in_memory(dir: &Path, upstream: SocketAddr) -> Idem {
    start_idem(
        dir,
        &[
            "--upstream",
            &format!("http://{upstream}"),
            "--store",
            "memory",
        ],
    )
}

/// [`start_idem`] with extra environment variables.
pub fn start_idem_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Idem {
    let mut child = Command::new(binary())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .current_dir(dir)
        .env("IDEM_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start idem");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let keep = lines.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("idem ready")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line.clone());
            }
            keep.lock().unwrap().push(line);
        }
    });
    let ready = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "idem did not start with {args:?}: {:?}",
                lines.lock().unwrap()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let addr = v["fields"]["listen"].as_str().unwrap().parse().unwrap();
    let admin = v["fields"]["admin"]
        .as_str()
        .and_then(|a| a.strip_prefix("Some("))
        .and_then(|a| a.strip_suffix(')'))
        .and_then(|a| a.parse().ok());
    Idem {
        child,
        addr,
        admin,
        stderr: lines,
    }
}

impl Idem {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a signal with kill(1) (no unsafe code in tests either).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A POST to /v1/slow that the upstream holds for `ms`.
pub fn slow_post(
    client: &reqwest::Client,
    idem: &Idem,
    key: &str,
    ms: u64,
) -> reqwest::RequestBuilder {
    post(client, idem.url("/v1/slow"), Some(key), "{}").header("x-delay-ms", ms.to_string())
}
