//! The embedded queue's disk fills up: the gateway answers 503 (Salesforce retries), nothing
//! acknowledged is lost, and it recovers by itself when space returns. Needs root to mount a
//! small tmpfs (the CI machine runs tests as root).

use crate::helpers::{fixture, spawn_app_with};
use std::process::Command;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Mount {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "this test mounts a small tmpfs to fill the disk and needs root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Mount(dir.to_owned())
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_and_recovers() {
    // Arrange: the queue file on a 1 MiB tmpfs.
    let dir = tempfile::tempdir().unwrap();
    let mount = mount_tmpfs(dir.path(), "1m");
    let db = dir.path().join("relay.db");
    let app = spawn_app_with(move |s| s.queue.path = db).await;
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
            .into_bytes()
    };

    // Act: send until the disk is full.
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..200u32 {
        let r = app.post_outbound("gdpr", message(n)).await;
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
    let ready = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readiness reports the full disk");
    assert_eq!(
        app.stats().await.ready,
        acked.len() as u64,
        "every acknowledged notification is stored"
    );

    // Space returns: the same process accepts again without a restart.
    let out = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mount.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = app.post_outbound("gdpr", message(10_000)).await;
    assert_eq!(r.status(), 200);
    acked.push(10_000);

    // Assert: everything acknowledged reaches Centercode.
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), acked.len());
    let sent: std::collections::HashSet<String> = app
        .centercode
        .requests()
        .iter()
        .map(|r| r.query["find"].as_str().unwrap().to_owned())
        .collect();
    for n in acked {
        assert!(
            sent.contains(&format!("user{n}@example.com")),
            "user{n} lost"
        );
    }
    drop(app);
}
