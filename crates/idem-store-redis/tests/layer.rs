//! The Tower layer over a real Redis: a duplicate storm over three instances sharing
//! one store (standalone and Cluster), and a restart of a private Redis during traffic.

mod support;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_store_redis::{RedisOptions, RedisStore};
use support::{Restartable, free_port, skip};

async fn connect(var: &str, default: &str) -> Option<Arc<RedisStore>> {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    // A generous timeout: on a loaded machine a 503 would fail the storm. It bounds
    // hangs; nothing is timed.
    let options = RedisOptions::default().with_op_timeout(Duration::from_secs(10));
    match RedisStore::connect_with(&url, options).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("no Redis at {url}: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances_standalone() {
    match connect("IDEM_REDIS_URL", "redis://127.0.0.1:6379").await {
        Some(store) => support::storm(store).await,
        None => skip("storm_three_instances_standalone", "Redis unreachable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances_cluster() {
    match connect(
        "IDEM_REDIS_CLUSTER",
        "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
    )
    .await
    {
        Some(store) => support::storm(store).await,
        None => skip("storm_three_instances_cluster", "Redis Cluster unreachable"),
    }
}

/// A redis-server of this test's own, on a spare port, with an append-only file so
/// that what was written before a kill is there after the restart.
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    fn new() -> Option<Self> {
        let mut r = PrivateRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .ok()?;
        r.start();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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

impl Restartable for PrivateRedis {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn start(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_traffic() {
    let Some(mut server) = PrivateRedis::new() else {
        return skip("restart_during_traffic", "redis-server is not installed");
    };
    let options = RedisOptions::default().with_op_timeout(Duration::from_millis(500));
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .expect("connect to the private redis");
    support::restart_during_traffic(Arc::new(store), &mut server).await;
}
