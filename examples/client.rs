//! The reference client end to end against a running keepd: an account, a
//! vault whose key only the client holds, encrypted log entries pushed and
//! pulled back, a device and a backup it signs.
//!
//!     cargo run --example client -- 127.0.0.1:8787

use std::net::SocketAddr;

use keepd::client::{DeviceKey, LogEntry, SyncClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8787".into())
        .parse()?;
    let email = format!("demo-{}@example.org", uuid::Uuid::new_v4());
    let password = "a demo passphrase";
    let mut client = SyncClient::new(addr);
    let user = client.register(&email, password).await?;
    client.login(&email, password).await?;
    println!("registered and logged in as {} ({})", user.email, user.id);

    // The vault key is generated here and stored only wrapped.
    client.create_vault("notes", password).await?;
    let key = client.open_vault("notes", password).await?;
    let entries: Vec<LogEntry> = ["first", "second", "third"]
        .iter()
        .enumerate()
        .map(|(i, text)| LogEntry {
            data: text.as_bytes().to_vec(),
            haex_timestamp: format!("2026-11-24T00:00:0{i}Z-0001"),
        })
        .collect();
    let pushed = client
        .push("notes", &key, &entries, Some("demo-push-1"))
        .await?;
    println!(
        "pushed {} entries, sequences {:?}",
        pushed.count,
        pushed.logs.iter().map(|l| l.sequence).collect::<Vec<_>>()
    );
    let pulled = client.pull("notes", 0, 100).await?;
    for log in &pulled.logs {
        let plain = key.decrypt_entry(&log.encrypted_data, &log.nonce)?;
        println!("  #{} {}", log.sequence, String::from_utf8_lossy(&plain));
    }

    let device = DeviceKey::generate()?;
    let device_id = client.register_device("demo laptop", &device).await?;
    let backup_id = client
        .store_backup(
            &device_id,
            &device,
            &key,
            b"a whole-vault backup",
            "Confidential",
        )
        .await?;
    let restored = client.restore_backup(&backup_id, &key).await?;
    println!(
        "backup {backup_id} signed by {device_id} restored: {}",
        String::from_utf8_lossy(&restored)
    );

    client.delete_account(&email, password).await?;
    println!("account erased");
    Ok(())
}
