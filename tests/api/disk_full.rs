//! The embedded queue's disk fills up: the gateway answers 503 (Salesforce retries), nothing
//! acknowledged is lost, and it recovers by itself when space returns: it accepts again,
//! and outcomes that met the full disk are written then, not left to their lease. The relay
//! runs as a child process in its own mount namespace (`unshare -rm`: an unprivileged user
//! namespace, so no root is needed) on a 2 MiB tmpfs, half of it taken by a ballast file that
//! the test deletes (through `/proc/<pid>/root`) to give space back.

use crate::admin::series;
use crate::helpers::{fixture, write_relay_config};
use fake_centercode::{FakeCentercode, FakeConfig};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "disk-full-admin-token-0123456789abcdef";

/// `relay serve` inside `unshare -rm`, its queue on a tmpfs mounted at `data` with `ballast`
/// bytes taken, its log (warnings and errors: never payloads) in `log`; returns the child
/// and its base URL.
fn relay_on_small_tmpfs(
    config: &std::path::Path,
    data: &std::path::Path,
    log: &std::path::Path,
) -> (std::process::Child, String) {
    let script = r#"mount -t tmpfs -o size=2m tmpfs "$DATA" || exit 97
head -c 1048576 /dev/zero > "$DATA/ballast"
exec "$RELAY" --config "$CONFIG" serve"#;
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .env("DATA", data)
        .env("RELAY", env!("CARGO_BIN_EXE_relay"))
        .env("CONFIG", config)
        .env("RELAY_CONFIG_DIR", config.parent().unwrap())
        .env("RELAY__QUEUE__PATH", data.join("relay.db"))
        .env("RUST_LOG", "warn")
        .env_remove("RELAY_ENV")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("create the relay's log file"))
        .spawn()
        .expect("run unshare (util-linux)");
    let address = crate::helpers::listening_address(&mut child).unwrap_or_else(|_| {
        let status = child.wait().ok();
        panic!(
            "the relay did not start in its own mount namespace ({status:?}); this test needs \
             `unshare --user --map-root-user --mount` (an unprivileged user namespace) or root"
        )
    });
    (child, address)
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_and_recovers() {
    full_disk(false).await;
}

/// Deliveries go on while the disk fills: outcomes that cannot be written then are written
/// once space returns, not left leased until their lease (120 s here) runs out.
#[tokio::test]
async fn outcomes_that_met_a_full_disk_are_recorded_once_space_returns() {
    full_disk(true).await;
}

async fn full_disk(deliver_while_full: bool) {
    // Arrange: a relay whose queue file sits on a nearly full tmpfs; unless
    // `deliver_while_full`, deliveries paused so the queue only grows while the disk fills.
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = write_relay_config(
        dir.path(),
        &format!("[server]\nbind = \"127.0.0.1:0\"\nworkers = 1\nprobe_cache_ms = 0\n[worker]\nretry_schedule_secs = [0.05]\npoll_interval_ms = 50\n[centercode]\napi_key = \"test-key\"\ntimeout_ms = 2000\n[admin]\ntoken = \"{ADMIN}\"\n"),
        &centercode.base_url(),
    );
    let log = dir.path().join("relay.log");
    let (child, base) = relay_on_small_tmpfs(&config, &data, &log);
    let child = KillOnDrop(child, log);
    let client = reqwest::Client::new();
    let admin = |path: &str| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
    };
    if !deliver_while_full {
        assert_eq!(
            admin("/admin/routes/gdpr/pause").await.unwrap().status(),
            200
        );
    }
    let template = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let filler = "x".repeat(16 * 1024);
    let message = |n: u32| {
        template
            .replace("04l8d0000100001AAA", &format!("04l{n:015}"))
            .replace(
                "marta.kowalska@example.org",
                &format!("user{n}@example.com"),
            )
            .replace("<sf:LastName>Kowalska", &format!("<sf:LastName>{filler}"))
    };
    let post = |n: u32| {
        client
            .post(format!("{base}/salesforce/outbound/gdpr"))
            .header("Content-Type", "text/xml")
            .body(message(n))
            .send()
    };

    // Act: send until the disk is full.
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..200u32 {
        let r = post(n)
            .await
            .unwrap_or_else(|e| panic!("POST #{n}: {e} (did the relay exit?)"));
        match r.status().as_u16() {
            200 => acked.push(n),
            503 => {
                refused += 1;
                assert!(!r.text().await.unwrap().contains("<Ack>true"));
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        refused >= 3,
        "the disk never filled ({} acked)",
        acked.len()
    );
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readiness reports the full disk");
    // Every acknowledged notification is stored (polled: a depth reading may trail a commit
    // by a moment under load; a lost job would never show).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = crate::scale_out::metrics_of(&client, &base).await;
        let stored: f64 = ["ready", "in_flight", "retrying", "parked"]
            .iter()
            .map(|s| series(&metrics, &format!(r#"relay_queue_depth{{state="{s}"}}"#)))
            .sum();
        // Stored, or already delivered (the pause is the test's way of keeping jobs in the
        // queue; a delivery that slipped through is not a loss).
        let delivered = centercode
            .requests()
            .iter()
            .filter_map(|r| r.query["find"].as_str().map(str::to_owned))
            .collect::<std::collections::HashSet<_>>()
            .len();
        if stored + delivered as f64 >= acked.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} stored and {delivered} delivered for {} acknowledged: {}",
            acked.len(),
            metrics
                .lines()
                .filter(|l| l.starts_with("relay_queue_depth"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }

    // Space returns (the ballast goes): the same process accepts again without a restart.
    let ballast = format!("/proc/{}/root{}/ballast", child.0.id(), data.display());
    std::fs::remove_file(&ballast).unwrap_or_else(|e| panic!("{ballast}: {e}"));
    let r = post(10_000)
        .await
        .unwrap_or_else(|e| panic!("POST after space returned: {e}"));
    assert_eq!(r.status(), 200);
    acked.push(10_000);

    // Assert: everything acknowledged reaches Centercode once deliveries resume.
    if !deliver_while_full {
        assert_eq!(
            admin("/admin/routes/gdpr/resume").await.unwrap().status(),
            200
        );
    }
    let expected: std::collections::HashSet<String> = acked
        .iter()
        .map(|n| format!("user{n}@example.com"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent: std::collections::HashSet<String> = centercode
            .requests()
            .iter()
            .filter_map(|r| r.query["find"].as_str().map(str::to_owned))
            .collect();
        if sent.is_superset(&expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged removals reached Centercode",
            expected.intersection(&sent).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
    // And every job's outcome is recorded: the queue drains long before a lease (120 s)
    // could bring back a job whose outcome met the full disk.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = crate::scale_out::metrics_of(&client, &base).await;
        let waiting: f64 = ["ready", "in_flight", "retrying"]
            .iter()
            .map(|s| series(&metrics, &format!(r#"relay_queue_depth{{state="{s}"}}"#)))
            .sum();
        if waiting == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} jobs still waiting or leased 20 s after space returned: {}",
            metrics
                .lines()
                .filter(|l| l.starts_with("relay_queue_depth")
                    || l.starts_with("relay_deliveries_total"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
    drop(child);
}

/// The relay child is killed when the test ends, also when it fails; a failing test shows
/// the end of the relay's log, so a failure in CI says what the relay saw.
struct KillOnDrop(std::process::Child, std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- the relay's last log lines ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}
