//! Load generator for a running keepd, through the reference client.
//!
//! Runs five scenarios for `--seconds` each and prints requests/s,
//! entries/s and p50/p99 latency; after every push scenario it pulls each
//! vault back and checks the sequences are exactly 1..N (no gap, no
//! duplicate) and that every acknowledged entry is there.
//!
//!     cargo run --release --example loadgen -- --addr 127.0.0.1:8787
//!     cargo run --release --example loadgen -- --addr 127.0.0.1:8787 --events 200
//!
//! `--events N` measures live updates instead: a watcher holds
//! `GET /sync/events` open while another client pushes one entry N times;
//! the time from sending a push to the watcher's event for it bounds the
//! time from commit to event from above.
//!
//! `--logins N` measures logins instead: N on the password route and N
//! with OPAQUE, `--clients` at a time, each on its own account's right
//! password; it prints each method's logins/s and pauses between the two
//! (a line `logins: <method> done` on stdout) so that scripts/bench.sh can
//! read the server's CPU time around each.
//!
//! The account it creates needs two auth attempts (register, login).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use keepd::client::{LogEntry, SyncClient, VaultKey};

#[derive(Parser)]
struct Args {
    /// keepd's API address.
    #[arg(long, default_value = "127.0.0.1:8787")]
    addr: SocketAddr,
    /// Length of each scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients per scenario.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Instead of the scenarios: how long a watcher waits for the event of
    /// a push, over this many pushes one after another.
    #[arg(long, value_name = "PUSHES")]
    events: Option<usize>,
    /// Instead of the scenarios: this many logins by each method.
    #[arg(long, value_name = "LOGINS")]
    logins: Option<usize>,
}

const PUSH_BATCH: usize = 50;
const PULL_PAGE: i64 = 100;
const PASSWORD: &str = "load generator password";

struct Scenario {
    name: &'static str,
    /// Vaults the writers spread over (round robin).
    vaults: usize,
    /// Percent of operations that are pushes; the rest pull.
    push_percent: u64,
}

#[derive(Default)]
struct Tally {
    pushes: Vec<Duration>,
    pulls: Vec<Duration>,
    entries_pushed: u64,
    entries_pulled: u64,
    errors: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn batch(tag: usize, n: usize) -> Vec<LogEntry> {
    (0..n)
        .map(|i| LogEntry {
            // A typical small CRDT change, encrypted by the client.
            data: format!(
                "{{\"table\":\"notes\",\"row\":{tag},\"col\":{i},\"value\":\"{}\"}}",
                "x".repeat(64)
            )
            .into_bytes(),
            haex_timestamp: format!("{tag:08}-{i:04}"),
        })
        .collect()
}

async fn run(
    args: &Args,
    token: &str,
    key: &Arc<VaultKey>,
    scenario: &Scenario,
    round: usize,
) -> Tally {
    let vaults: Vec<String> = (0..scenario.vaults)
        .map(|v| format!("{}-{round}-{v}", scenario.name.replace(' ', "-")))
        .collect();
    let setup = {
        let mut client = SyncClient::new(args.addr);
        client.set_token(Some(token.to_string()));
        client
    };
    for vault in &vaults {
        setup
            .store_vault_key(vault, &key.wrap(PASSWORD).expect("wrap"))
            .await
            .expect("create vault");
    }
    if scenario.push_percent < 100 {
        // Something to pull from the start.
        for vault in &vaults {
            for i in 0..4 {
                setup
                    .push(vault, key, &batch(i, PUSH_BATCH), None)
                    .await
                    .expect("prefill");
            }
        }
    }
    let vaults = Arc::new(vaults);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let counter = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..args.clients {
        let mut client = SyncClient::new(args.addr);
        client.set_token(Some(token.to_string()));
        let (key, vaults, counter) = (key.clone(), vaults.clone(), counter.clone());
        let push_percent = scenario.push_percent;
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut cursor = 0;
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let vault = &vaults[(n as usize + w) % vaults.len()];
                let started = Instant::now();
                if n % 100 < push_percent {
                    match client
                        .push(vault, &key, &batch(n as usize, PUSH_BATCH), None)
                        .await
                    {
                        Ok(done) => {
                            tally.pushes.push(started.elapsed());
                            tally.entries_pushed += done.count as u64;
                        }
                        Err(_) => tally.errors += 1,
                    }
                } else {
                    match client.pull(vault, cursor, PULL_PAGE).await {
                        Ok(page) => {
                            tally.pulls.push(started.elapsed());
                            tally.entries_pulled += page.logs.len() as u64;
                            cursor = if page.has_more {
                                page.logs.last().map_or(0, |l| l.sequence)
                            } else {
                                0
                            };
                        }
                        Err(_) => tally.errors += 1,
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.expect("worker");
        total.pushes.extend(tally.pushes);
        total.pulls.extend(tally.pulls);
        total.entries_pushed += tally.entries_pushed;
        total.entries_pulled += tally.entries_pulled;
        total.errors += tally.errors;
    }
    verify(&setup, &vaults, scenario, total.entries_pushed).await;
    total
}

/// Every vault holds exactly sequences 1..N, and N adds up to what was
/// acknowledged (plus the prefill).
async fn verify(client: &SyncClient, vaults: &[String], scenario: &Scenario, acknowledged: u64) {
    let prefill = if scenario.push_percent < 100 {
        4 * PUSH_BATCH as u64
    } else {
        0
    };
    let mut stored = 0u64;
    for vault in vaults {
        let mut expected = 1;
        let mut after = 0;
        loop {
            let page = client.pull(vault, after, 1000).await.expect("verify pull");
            for log in &page.logs {
                assert_eq!(log.sequence, expected, "vault {vault}: gap or duplicate");
                expected += 1;
            }
            after = expected - 1;
            if !page.has_more {
                break;
            }
        }
        stored += after as u64;
    }
    assert_eq!(
        stored,
        acknowledged + prefill * vaults.len() as u64,
        "acknowledged entries missing"
    );
}

/// `count` logins with `method`, `clients` at a time, each on one of the
/// accounts in `emails`; the seconds they took.
async fn logins(addr: SocketAddr, emails: &[String], method: &str, count: usize) -> f64 {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = emails
        .iter()
        .cloned()
        .map(|email| {
            let (next, method) = (next.clone(), method.to_string());
            tokio::spawn(async move {
                let mut client = SyncClient::new(addr);
                while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                    let done = match method.as_str() {
                        "password" => client.login_with_password(&email, PASSWORD).await,
                        _ => client.login(&email, PASSWORD).await,
                    };
                    done.expect("login");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("login worker");
    }
    started.elapsed().as_secs_f64()
}

async fn login_throughput(args: &Args, count: usize) {
    let mut by_method = Vec::new();
    for method in ["password", "opaque"] {
        let mut emails = Vec::new();
        for _ in 0..args.clients {
            let email = format!("loadgen-{}@example.org", uuid::Uuid::new_v4());
            let client = SyncClient::new(args.addr);
            match method {
                "password" => client.register_with_password(&email, PASSWORD).await,
                _ => client.register(&email, PASSWORD).await,
            }
            .expect("register");
            emails.push(email);
        }
        println!("logins: {method} start");
        let secs = logins(args.addr, &emails, method, count).await;
        println!("logins: {method} done");
        by_method.push((method, secs));
    }
    for (method, secs) in by_method {
        println!(
            "logins: {method}: {count} in {secs:.2} s, {:.1}/s ({} clients)",
            count as f64 / secs,
            args.clients
        );
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(count) = args.logins {
        login_throughput(&args, count).await;
        return;
    }
    let email = format!("loadgen-{}@example.org", uuid::Uuid::new_v4());
    let mut client = SyncClient::new(args.addr);
    client.register(&email, PASSWORD).await.expect("register");
    client.login(&email, PASSWORD).await.expect("login");
    let token = client.token().expect("token").to_string();
    let key = Arc::new(VaultKey::generate().expect("key"));
    if let Some(pushes) = args.events {
        event_latency(&client, args.addr, pushes).await;
        return;
    }

    let scenarios = [
        Scenario {
            name: "push 50, own vaults",
            vaults: args.clients,
            push_percent: 100,
        },
        Scenario {
            name: "pull 100",
            vaults: args.clients,
            push_percent: 0,
        },
        Scenario {
            name: "80/20 pull/push",
            vaults: args.clients,
            push_percent: 20,
        },
        Scenario {
            name: "push 50, 1 vault",
            vaults: 1,
            push_percent: 100,
        },
        Scenario {
            name: "push 50, 100 vaults",
            vaults: 100,
            push_percent: 100,
        },
    ];
    println!(
        "{} clients, {}s per scenario, against {}\n",
        args.clients, args.seconds, args.addr
    );
    println!(
        "{:<22} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "scenario",
        "req/s",
        "pushed/s",
        "pulled/s",
        "push p50",
        "push p99",
        "pull p50",
        "pull p99",
        "errors"
    );
    for (round, scenario) in scenarios.iter().enumerate() {
        let mut tally = run(&args, &token, &key, scenario, round).await;
        tally.pushes.sort();
        tally.pulls.sort();
        let secs = args.seconds as f64;
        println!(
            "{:<22} {:>9.0} {:>11.0} {:>11.0} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7}",
            scenario.name,
            (tally.pushes.len() + tally.pulls.len()) as f64 / secs,
            tally.entries_pushed as f64 / secs,
            tally.entries_pulled as f64 / secs,
            percentile(&tally.pushes, 0.5),
            percentile(&tally.pushes, 0.99),
            percentile(&tally.pulls, 0.5),
            percentile(&tally.pulls, 0.99),
            tally.errors,
        );
    }
    println!("\ncorrectness: every vault holds exactly 1..N, every acknowledged entry stored");
}

/// p50, p99 and max of push-sent → event-received over `pushes` pushes.
async fn event_latency(client: &SyncClient, addr: SocketAddr, pushes: usize) {
    let key = client
        .create_vault("events", PASSWORD)
        .await
        .expect("vault");
    let mut events = client.events("events", None).await.expect("stream");
    events.next().await.expect("head").expect("head");
    let mut pusher = SyncClient::new(addr);
    pusher.set_token(client.token().map(str::to_string));
    let mut waits = Vec::with_capacity(pushes);
    for i in 0..pushes {
        let entry = batch(i, 1);
        let sent = Instant::now();
        let push = pusher.push("events", &key, &entry, None);
        let heard = async {
            let event = events.next().await.expect("event").expect("stream open");
            (event.sequence, sent.elapsed())
        };
        let (pushed, (sequence, waited)) = tokio::join!(push, heard);
        pushed.expect("push");
        assert_eq!(sequence, i as i64 + 1, "every commit, in order");
        waits.push(waited);
    }
    waits.sort();
    println!(
        "events: {pushes} pushes, push sent -> event received p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
        percentile(&waits, 1.0)
    );
}
