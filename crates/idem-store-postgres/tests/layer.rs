//! The Tower layer over a real PostgreSQL: a duplicate storm over three instances
//! sharing one store, and a restart of a private PostgreSQL during traffic.

// One storm/restart harness for both shared stores (it was a copied file).
#[path = "../../idem-store-redis/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use idem_store_postgres::{PostgresOptions, PostgresStore};
use support::{Restartable, free_port, skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_three_instances() {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // A generous timeout: 256 requests in flight share 16 connections on a loaded
    // machine, and a 503 would fail the storm. It bounds hangs; nothing is timed.
    let options = PostgresOptions::default().with_op_timeout(Duration::from_secs(10));
    match PostgresStore::connect_with(&url, options).await {
        Ok(store) => support::storm(Arc::new(store)).await,
        Err(e) => skip(
            "storm_three_instances",
            &format!("no PostgreSQL at {url}: {e}"),
        ),
    }
}

/// A PostgreSQL cluster of this test's own (`initdb` into a temporary folder), on a
/// spare port, run as the `postgres` user when the test runs as root.
struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    as_postgres: bool,
}

impl PrivatePostgres {
    fn new() -> Option<Self> {
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
        let dir = tempfile::tempdir().unwrap();
        if as_postgres {
            // initdb refuses root; the folder must belong to the server's user.
            let ok = Command::new("chown")
                .args(["postgres:", dir.path().to_str().unwrap()])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        let pg = PrivatePostgres {
            bin,
            port: free_port(),
            dir,
            as_postgres,
        };
        let data = pg.data();
        let ok = pg
            .run("initdb")
            .args(["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "initdb failed");
        let mut pg = pg;
        pg.start();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_str().unwrap().to_owned()
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

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.path().join("server.log");
        let status = self
            .run("pg_ctl")
            .args(["-D", &self.data(), "-l", log.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl {args:?} failed; see {}",
            path(&log)
        );
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl Restartable for PrivatePostgres {
    fn kill(&mut self) {
        // Immediate: the server's processes quit at once, as in a crash.
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.pg_ctl(&["-o", &opts, "-w", "-t", "60", "start"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_traffic() {
    let Some(mut server) = PrivatePostgres::new() else {
        return skip(
            "restart_during_traffic",
            "initdb/pg_ctl not found under /usr/lib/postgresql/*/bin",
        );
    };
    let options = PostgresOptions::default().with_op_timeout(Duration::from_millis(500));
    let store = PostgresStore::connect_with(&server.url(), options)
        .await
        .expect("connect to the private PostgreSQL");
    support::restart_during_traffic(Arc::new(store), &mut server).await;
}
